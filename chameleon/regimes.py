"""The axes of the experiment, described once, as data: regimes, protocols, conditionings, levels, dispatches,
batchings and objectives.

Everything that depends on an axis reads its table: config validation, `model.build`, the
objectives, the embeddings, the parameter table, the colours and styles of the figures and the
labels of the results tables. Adding a regime is one row here and, if it needs a new kind of
adapter, its component in `chameleon.adapters.model`; adding a conditioning is one row here, and a new
way of embedding its text in `prepare._encode` if no row's fields describe it.

Code outside this module reads a row's fields and properties; it never compares an axis name or a field's
string value (tests/test_layout.py scans for such comparisons).

This module imports nothing heavy, so a bad `--regime` is refused before torch is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Regime:
    name: str
    head: str  # "base" (the frozen LM head), "lora" (one learned LoRA) or "hyper" (LoRA written by the hypernetwork)
    blocks: str  # "frozen"; "lora": LoRA on every linear / Conv1D layer of the blocks as well; "svf": Transformer²'s
    # SVF on the blocks' MLP matrices (their singular values rescaled by sigmoid(z), see chameleon.adapters.svf)
    colour: str  # its colour in every figure (Okabe-Ito, colour-blind safe)
    about: str  # one line for tables and the README
    matched_rank: bool = False  # head LoRA rank chosen so that its parameters match the hypernetwork's
    experts: str = ""  # "head" or "blocks": that adapter is held once per coarse group of the data (cfg.n_experts),
    # and cfg.dispatch picks one per batch at inference (adapters.experts.Experts); "": one adapter for all data

    @property
    def conditioned(self) -> bool:
        """Whether the hypernetwork reads a conditioning vector (cfg.conditioning applies)."""
        return self.head == "hyper"

    @property
    def expert_kind(self) -> str:
        """The kind of adapter held once per group ("svf", "lora"), or "" without experts."""
        return {"head": self.head, "blocks": self.blocks}.get(self.experts, "")

    @property
    def frozen_body(self) -> bool:
        """Nothing in the transformer blocks trains: the body's hidden states can be computed once."""
        return self.blocks == "frozen"

    @property
    def lora_blocks(self) -> bool:
        """The blocks carry LoRA of their own."""
        return self.blocks == "lora"

    @property
    def svf_blocks(self) -> bool:
        """The blocks run under SVF experts (one, or one per group)."""
        return self.blocks == "svf"

    @property
    def trains(self) -> bool:
        """Something trains: the head or the blocks are adapted (`unadapted` is the backbone itself)."""
        return self.head != "base" or not self.frozen_body

    @property
    def experts_in_blocks(self) -> bool:
        """The experts are held in the blocks (the body differs per group), not in the head."""
        return self.experts == "blocks"


REGIMES: dict[str, Regime] = {r.name: r for r in [
    Regime("unadapted", "base", "frozen", "#7f7f7f", "the frozen backbone (the paper reports its total parameters)"),
    Regime("lora", "lora", "frozen", "#0072B2",
           "LoRA on the LM head: the paper's effective 'LoRA' (its block LoRA wrapped nn.Linear, GPT-2's blocks are Conv1D)"),
    Regime("chameleon", "hyper", "frozen", "#E69F00",
           "the hypernetwork writes the head's LoRA from the batch: the paper's effective ChamaleonLLM"),
    Regime("lora_full", "lora", "lora", "#56B4E9", "what the paper describes: LoRA on every block layer and the head"),
    Regime("chameleon_full", "hyper", "lora", "#D55E00", "LoRA on every block layer + the hypernetwork head"),
    Regime("lora_matched", "lora", "frozen", "#009E73",
           "head LoRA with as many parameters as `chameleon`: the fair baseline the paper lacks", matched_rank=True),
    Regime("svf", "base", "svf", "#CC79A7",
           "Transformer²'s SVF: one expert z rescales the singular values of every MLP matrix, trained on all data"),
    Regime("svf_experts", "base", "svf", "#000000",
           "Transformer²: one SVF expert per coarse k-means group, chosen per batch (cfg.dispatch)",
           experts="blocks"),
    Regime("lora_experts", "lora", "frozen", "#882255",
           "the 'multiple expert models' the paper avoids: one head LoRA per coarse k-means group, chosen per batch "
           "(cfg.dispatch)", experts="head"),
]}


def conditioning_label(regime: str, conditioning: str, dispatch: str | None = None) -> str:
    """The conditioning as results tables show it: "-" for regimes without a hypernetwork; for
    experts, how the expert is dispatched ("dispatch=oracle", ...)."""
    if REGIMES[regime].experts:
        return f"dispatch={dispatch or TRAINING_DISPATCH}"
    return conditioning_of(regime, conditioning).name


@dataclass(frozen=True)
class Protocol:
    """How a run is scored: the authors' code, exactly, or the corrected next-token loss (chameleon.objectives)."""
    name: str
    scores: str  # "last": the last position alone, padded to max_length (authors); "all": every real token
    target_offset: int  # the target of position t is token t + offset: 0 (the token itself, authors) or 1 (next)
    embeds_padding: bool  # example embeddings average every position, padding included (authors) or real tokens
    attends_nonzero: bool  # the backbone attends to `input_ids != 0` (authors' test of token 0) or to real tokens
    lora: str  # LoRA flavour (chameleon.adapters.lora): "authors" (A, B ~ N(0, 0.01^2), scale alpha) or "standard" (PEFT's)
    linestyle: str  # its line style in figures
    about: str

    @property
    def scores_padding(self) -> bool:
        """A padded example's scored target is the pad token (the authors' last position)."""
        return self.scores == "last"

    @property
    def scores_every_token(self) -> bool:
        """Every real token is scored (so a `prefix` conditioning's tokens must be left out)."""
        return self.scores == "all"


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in [
    Protocol("authors", "last", 0, True, True, "authors", "--",
             "the authors' code: the last of max_length right-padded positions, scored against the token there"),
    Protocol("causal", "all", 1, False, False, "standard", "-",
             "next-token loss on every real token, padding masked out of attention, loss and embeddings"),
]}


@dataclass(frozen=True)
class Conditioning:
    """What the hypernetwork's batch vector averages (chameleon.prepare computes it from these fields)."""
    name: str
    tasks: tuple[str, ...]  # the tasks it applies to
    text: str  # which text is embedded: "full" (what the backbone reads), "cluster" (what k-means sees: the
    # prompt for instructions), "task" (the instruction alone) or "prompt" (instruction + input)
    prefix: bool  # only the first cfg.prefix_tokens tokens are embedded, and no run scores them
    exclude_targets: bool  # tokens that are some position's scored target are left out of the mean
    other_batch: bool  # a batch is conditioned on another batch's examples (a control: the batch's own
    # content removed, the parametrisation kept)
    leaks: bool  # the vector can contain the very tokens being scored
    hatch: str  # bar hatch in figures
    linestyle: str | tuple  # line style in loss curves
    marker: str  # marker in loss curves
    about: str
    pool: str = "example"  # what a batch's vector averages: its examples' own embeddings ("example"), the
    # training split's mean for every example ("all": one vector for every batch, the parametrisation alone),
    # the mean of the example's true domain in the training split ("domain": reads the label), a fixed random
    # code per true domain ("code", drawn with the per-line vectors' per-dimension mean and std: chameleon.prepare)
    # or those codes permuted across the domains at inference ("code_permuted")
    trained_as: str = ""  # the conditioning whose trained run this row evaluates (runs.trained_by): a control
    # applied at inference alone ("": the row trains its own weights)

    def text_key(self, cluster_key: str) -> str:
        """The key of a split's texts (data.load_split_texts) that it embeds; `cluster_key` is what k-means sees."""
        return cluster_key if self.text == "cluster" else self.text


CONDITIONINGS: dict[str, Conditioning] = {c.name: c for c in [
    Conditioning("batch_mean", ("lm", "instructions"), "full", False, False, False, True, "", "-", "o",
                 "the paper: the batch's mean embedding, targets included"),
    Conditioning("prefix", ("lm",), "full", True, False, False, False, "//", "--", "s",
                 "leak-free: the first prefix_tokens tokens of each text; the loss starts after them"),
    Conditioning("shuffled", ("lm", "instructions"), "cluster", False, False, True, False, "xx", ":", "^",
                 "control: another batch's mean embedding (half an epoch away, mostly another cluster)"),
    Conditioning("batch_mean_excl", ("lm",), "full", False, True, False, False, "..", "-.", "P",
                 "control for the leak: the batch mean without any token that is a scored target"),
    Conditioning("task", ("instructions",), "task", False, False, False, False, "\\\\", (0, (6, 2, 1, 2, 1, 2)), "D",
                 "the batch's instructions alone (never a response)"),
    Conditioning("task_input", ("instructions",), "prompt", False, False, False, False, "++", "-.", "v",
                 "the batch's instructions and inputs (never a response)"),
    Conditioning("constant", ("lm",), "full", False, False, False, False, "--", (0, (1, 1)), "X",
                 "control: the training split's mean embedding, the same for every batch (the parametrisation alone)",
                 pool="all"),
    Conditioning("oracle", ("lm",), "full", False, False, False, False, "oo", (0, (3, 1, 1, 1)), "*",
                 "upper bound: the mean training embedding of each example's true domain (reads the domain label)",
                 pool="domain"),
    Conditioning("oracle_separable", ("lm",), "full", False, False, False, False, "**", (0, (5, 1)), "d",
                 "positive control: a fixed random code per true domain, as spread as single lines are (reads the label)",
                 pool="code"),
    Conditioning("oracle_permuted", ("lm",), "full", False, False, False, False, "||", (0, (1, 2)), "v",
                 "negative check: oracle_separable's trained run, each domain given another domain's code at inference",
                 pool="code_permuted", trained_as="oracle_separable"),
]}
NO_CONDITIONING = Conditioning("-", ("lm", "instructions"), "full", False, False, False, False, "", "-", "o",
                               "a regime without a hypernetwork")


@dataclass(frozen=True)
class Level:
    """How many lines share one generated adapter (Config.cond_level): the paper's batch, or each line its own."""
    name: str
    trains_per_line: bool  # training gives every line its own adapter, from its own vector
    evaluates_per_line: bool  # evaluation does (a batch-trained head evaluated per line evaluates the batch run)
    about: str


LEVELS: dict[str, Level] = {lv.name: lv for lv in [
    Level("batch", False, False, "the paper: one adapter per batch, from the batch's mean vector"),
    Level("line", True, True, "one adapter per line, from the line's own vector, in training and evaluation"),
    Level("line_eval", False, True, "the batch-trained head (cond_level batch's run), one adapter per line at inference"),
]}


@dataclass(frozen=True)
class Dispatch:
    """How an experts regime picks its expert for a batch at inference. Training always routes a batch to
    its true group's expert, so runs that differ in the dispatch alone share their trained experts: they
    evaluate the weights of the run whose dispatch `trains` (runs.trained_by)."""
    name: str
    trains: bool  # the dispatch the experts are trained under (the true group)
    uses_truth: bool  # reads the batch's true group: an upper bound, not a deployable dispatch
    mixes: bool  # combines the experts (sum_k alpha_k z_k): only for experts that can be mixed (SVF's z)
    about: str
    per_line: bool = False  # each line of a batch gets its own expert (multi-adapter serving); head experts only


DISPATCHES: dict[str, Dispatch] = {d.name: d for d in [
    Dispatch("oracle", True, True, False, "the batch's true group (an upper bound)"),
    Dispatch("classifier", False, False, False,
             "the group centroid nearest the batch's mean prompt embedding: a lookup in the embedding table, "
             "no forward pass"),
    Dispatch("cem", False, True, True,
             "a mixture whose weights a few-shot CEM search fits on cfg.cem_shots train examples of the batch's "
             "true group (population x iterations forward passes of the shots, once per group)"),
    Dispatch("oracle_line", False, True, False, "each line's own true group, inside a mixed batch (an oracle)",
             per_line=True),
    Dispatch("classifier_line", False, False, False, "each line's own nearest group centroid (its prefix), inside a "
             "mixed batch, as multi-adapter servers route every request to its adapter", per_line=True),
]}


@dataclass(frozen=True)
class Batching:
    """How validation examples arrive at inference and are grouped into the batches a regime adapts to
    (chameleon.clustering.incoming_batches). A k-means group may hold more or fewer than cfg.batch_size."""
    name: str
    incoming: int  # examples per incoming batch, in units of cfg.batch_size (0: the split routed to the training
    # clusters, one cluster per batch, as trained)
    grouped: bool  # an incoming batch is cut into groups by k-means on the regime's own batch embedding
    about: str

    @property
    def routed(self) -> bool:
        """Each example goes to its nearest training cluster (no incoming batch: the split arrives as trained)."""
        return self.incoming == 0


BATCHINGS: dict[str, Batching] = {b.name: b for b in [
    Batching("clustered", 0, False, "each example routed to its nearest training cluster; batches of one cluster"),
    Batching("kmeans", 4, True, "mixed incoming batches of 4 x batch_size, grouped by k-means at inference "
             "(k = 4, on the conditioning's own embedding, or the prompt's for experts)"),
    Batching("mixed", 1, False, "mixed incoming batches of batch_size, adapted to as one group"),
]}


# The words serving has for the batchings (Adapter.generate's `group`, `--group`, the server's "grouping"), kept
# for users' scripts; a batching's own name is accepted as well (`grouping`).
GROUP_WORDS = {"route": "clustered", "kmeans": "kmeans", "single": "mixed"}
GROUPINGS = (*GROUP_WORDS, *(b for b in BATCHINGS if b not in GROUP_WORDS))


def grouping(word: str) -> Batching:
    """The batching a serving word names: "route", "kmeans", "single" (GROUP_WORDS) or a batching's own name."""
    if word not in GROUPINGS:
        raise ValueError(f"group={word!r} is not valid; choose one of {list(GROUPINGS)}")
    return BATCHINGS[GROUP_WORDS.get(word, word)]


@dataclass(frozen=True)
class Objective:
    """What trains a run (Config.objective): the protocol's next-token loss, or a reward maximised by REINFORCE."""
    name: str
    reward: str  # "": the protocol's next-token loss (training.train); else the reward REINFORCE maximises
    # (chameleon.reinforce, a ROUGE-L of sampled answers); a rewarded run is named after its objective (runs.run_name)
    regime: str  # the one regime it trains ("": any)
    task: str  # the one task it trains on ("": any)
    about: str


OBJECTIVES: dict[str, Objective] = {o.name: o for o in [
    Objective("loss", "", "", "", "the protocol's next-token cross-entropy"),
    Objective("reinforce", "rouge_l", "svf", "instructions",
              "Transformer²'s REINFORCE: one SVF expert, rewarded by the ROUGE-L of its sampled answers"),
]}


# Expert kinds a mixture dispatch can combine: SVF's z vectors mix linearly (Transformer²'s CEM); LoRA's do not
# (a mix of the factors A and B is not the mix of the updates B A).
MIXABLE_KINDS = ("svf",)


def lookup(table: dict, name: str, what: str):
    """table[name], or a ValueError that names the choices."""
    if name not in table:
        raise ValueError(f"{what}={name!r} is not valid here; choose one of {list(table)}")
    return table[name]


TRAINING_DISPATCH = next(d.name for d in DISPATCHES.values() if d.trains)


def conditioning_of(regime: str, conditioning: str) -> Conditioning:
    """The conditioning row a run uses: NO_CONDITIONING for regimes without a hypernetwork."""
    return CONDITIONINGS[conditioning] if REGIMES[regime].conditioned else NO_CONDITIONING
