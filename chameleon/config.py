"""One configuration object travels through the kit; profiles are small overrides of it.

    cfg = Config.from_profile("smoke", regime="chameleon", protocol="causal")
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from chameleon.regimes import BATCHINGS, CONDITIONINGS, DISPATCHES, LEVELS, MIXABLE_KINDS, OBJECTIVES, PROTOCOLS, REGIMES

# The checkout: data/, results/, figures/ live there. An installed copy (`pip install .`) sits in site-packages,
# which is no place for them: it works in the current directory instead.
_PARENT = Path(__file__).resolve().parent.parent
ROOT = _PARENT if (_PARENT / "pyproject.toml").is_file() else Path.cwd()


def outputs_root() -> Path:
    """Where results/ and figures/ are written: the checkout, or $CHAMELEON_OUTPUTS when set (`make test`
    points it at a temporary folder, so that executing the notebooks never changes tracked files)."""
    return Path(os.environ.get("CHAMELEON_OUTPUTS") or ROOT)


@dataclass
class Config:
    # --- reproducibility ---
    seed: int = 0  # the one seed: data subsampling, k-means, adapter init, batch order, dropout
    # --- backbone and data ---
    backbone: str = "smollm2"  # "smollm2" (embedded), "gpt2-arch", "gpt2-tiny", "gpt2" or any hub id / local dir
    task: str = "lm"  # "lm" (WikiText-style language modelling) or "instructions" (Alpaca-style)
    corpus: str = "wiki"  # lm: "wiki" (embedded), "wikitext-2-raw-v1" (hub) or a .txt/.jsonl/.parquet path
    instructions: str = "embedded"  # instructions: "embedded" (Alpaca stand-in), "chatterbot", "alpaca" (hub) or a .json/.jsonl path
    data_seed: int = 0  # which subset max_*_examples draws; fixed across --seeds, which vary the method only
    max_train_examples: int | None = None  # subsample the train split (None: all of it)
    max_eval_examples: int | None = None  # subsample the validation split (None: all of it)
    max_length: int = 256  # tokens per example; the paper right-pads every example to this length
    dev_split: bool = False  # validate on a dev split carved from train (data.DEV_SHARE of it, by a hash of the
    # text): how a learning rate is chosen without ever reading the validation split
    dev_key: str = "text"  # what the dev split is carved by: a hash of the "text" (the first domains experiment) or of
    # the example's "group" (its article, file or conversation: no source on both sides; corpora with that column)
    route_by: str = "full"  # what a validation line is routed to a training cluster by, and what k-means groups an
    # incoming batch by: the "full" text (continuation included, as the paper) or its first prefix_tokens ("prefix":
    # leak-free, against the training clusters' prefix centroids)
    # --- protocol and regime ---
    protocol: str = "causal"  # a row of regimes.PROTOCOLS: "authors" (the authors' code, exactly) or "causal"
    regime: str = "chameleon"  # a row of chameleon.regimes.REGIMES: unadapted, lora, chameleon, lora_matched, ...
    conditioning: str = "batch_mean"  # a row of regimes.CONDITIONINGS: batch_mean, prefix, shuffled, ...
    prefix_tokens: int = 16  # "prefix" conditioning: tokens the hypernetwork may see; loss starts after them
    score_from: int = 0  # tokens before this position are never scored, for every regime (0: all); compare sets it
    # to prefix_tokens for the baselines of a `prefix` row, so that both are scored on the same tokens
    # --- adapters ---
    rank: int = 4  # LoRA rank r (head and blocks)
    alpha: float = 1.0  # LoRA alpha: the update is scaled by alpha (authors) or alpha / r (causal)
    matched_alpha: str = "same"  # lora_matched: the "same" alpha as every regime (under "causal" its update is then
    # scaled by alpha / r_matched, 33x less than rank 4's), or "scaled" so its scaling equals the rank-`rank` LoRA's
    hyper_hidden: tuple[int, ...] = (64, 32)  # hypernetwork hidden widths, as in the paper
    hyper_dropout: float = 0.5  # hypernetwork dropout, as in the paper
    cond_level: str = "batch"  # a row of regimes.LEVELS: one generated adapter per "batch" (the paper), per "line" (each
    # line's own vector, in training and evaluation) or "line_eval" (the batch-trained head, one adapter per line at inference)
    cond_norm: str = "none"  # what the hypernetwork reads: the conditioning vector as it is ("none", the paper) or
    # "standardize"d, each dimension centred and scaled by the per-line training vectors' mean and std (stored with the
    # run, applied wherever a vector meets the hypernetwork: training, evaluation, serving, export)
    # --- experts (regimes svf, svf_experts, lora_experts; see adapters.experts and adapters.svf) ---
    n_experts: int = 3  # *_experts: k of the coarse k-means on the examples' cluster embeddings, one expert per group
    expert_groups: str = "kmeans"  # *_experts: groups by k-means ("kmeans") or by the corpus's true domain ("domain":
    # an oracle control; n_experts must equal the number of domains)
    dispatch: str = "oracle"  # *_experts at evaluation, a row of regimes.DISPATCHES: "oracle" (the batch's true group:
    # an upper bound), "classifier" (nearest group centroid of the prompt / first prefix_tokens tokens) or "cem"
    cem_shots: int = 4  # cem: examples of the group (from the train split) that score a mixture
    cem_held_out: bool = False  # cem: the shots are left out of the experts' training (Transformer²'s few-shot
    # examples are never trained on); otherwise the search scores examples its group's expert was trained on
    cem_population: int = 32  # cem: candidates per iteration (the reference's 32; elite ratio 0.2)
    cem_iters: int = 2  # cem: iterations (kept small for a CPU: every candidate runs the shots through the body)
    # --- clustering ---
    n_clusters: int | None = None  # k-means k; None: N // batch_size, as in the paper
    # --- optimisation ---
    epochs: int = 10  # passes over the train split
    batch_size: int = 32  # examples per batch; every batch is drawn from one cluster
    lr: float = 5e-4  # AdamW learning rate
    weight_decay: float = 0.01  # AdamW weight decay (torch's default)
    eval_every: int = 0  # also evaluate every K optimizer steps (0: once per epoch only)
    accumulate: int = 1  # batches per optimizer step in each process: a step sums the gradients of processes x
    # accumulate consecutive batches, each batch's mean loss divided by that count (chameleon.parallel)
    precision: str = "fp32"  # "fp32", or "bf16": CUDA autocast to bfloat16, float32 weights and AdamW (training.precision)
    batchings: tuple[str, ...] = ()  # after training, evaluate once per row of regimes.BATCHINGS (how validation
    # batches arrive at inference), keeping every line's loss (lines.csv in the run folder)
    cache_body: bool = True  # head-only regimes train on cached final hidden states of the frozen body
    # --- generation (instructions) ---
    max_new_tokens: int = 100  # greedy generation length for BLEU / ROUGE-L
    n_generate: int = 32  # validation examples generated for the metrics
    # --- REINFORCE (chameleon.reinforce; the fields below are read by it alone) ---
    objective: str = "loss"  # what trains an `svf` expert: "loss" (the protocol's next-token loss, training.train) or
    # "reinforce" (the ROUGE-L of sampled answers: batch_size answers a step, Adam at lr; `python -m chameleon reinforce`)
    reinforce_steps: int = 2000  # REINFORCE updates (the reference's; REINFORCE_OVERRIDES sets fewer on a CPU)
    max_grad_norm: float = 1e-3  # REINFORCE gradient-norm clip (the reference's)
    temperature: float = 1.0  # REINFORCE sampling temperature (the log-probs are the model's own, at 1)
    kl_coef: float = 0.0  # REINFORCE KL coefficient, KL to the unadapted backbone (the reference's 0)
    # --- where things go ---
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:N" or "mps"
    profile: str = "default"  # name of the profile this config came from; results are filed under it
    data_dir: Path = field(default=ROOT / "data")  # data/cache holds converted models, embeddings, hidden states
    # results/<profile>/<task>/<run>/ for every run; under $CHAMELEON_OUTPUTS when set (see outputs_root)
    results_dir: Path = field(default_factory=lambda: outputs_root() / "results")

    def __post_init__(self):
        # the names before "paper" was split into the authors' protocol and the `hub` profile (old run folders too)
        self.protocol = RENAMED["protocol"].get(self.protocol, self.protocol)
        self.profile = RENAMED["profile"].get(self.profile, self.profile)

    @property
    def route_prefix(self) -> int | None:
        """How many of a text's first tokens route it to a training cluster (route_by), None: all of them."""
        return self.prefix_tokens if self.routes_by_prefix else None

    @property
    def routes_by_prefix(self) -> bool:
        """Validation lines meet the training clusters through their first prefix_tokens tokens (route_by)."""
        return self.route_by == "prefix"

    @property
    def groups_by_domain(self) -> bool:
        """The experts' groups are the corpus's true domains (expert_groups), not k-means groups."""
        return self.expert_groups == "domain"

    @property
    def cache_dir(self) -> Path:
        return Path(self.data_dir) / "cache"

    @classmethod
    def from_profile(cls, name: str | None = None, **overrides) -> "Config":
        """The named profile with `overrides` applied; name None reads $CHAMELEON_PROFILE (default "cpu")."""
        name = name or os.environ.get("CHAMELEON_PROFILE", "cpu")
        name = RENAMED["profile"].get(name, name)
        if name not in PROFILES:
            raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
        task = overrides.get("task", PROFILES[name].get("task", "lm"))
        reinforce = {**REINFORCE, **REINFORCE_OVERRIDES.get(name, {})} if overrides.get("objective") == "reinforce" else {}
        values = {**PROFILES[name], **TASK_OVERRIDES.get((name, task), {}), **reinforce, **overrides}
        return cls(profile=name, **values).validated()

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes).validated()

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items()}

    def validated(self) -> "Config":
        choices = {"task": TASKS, "protocol": tuple(PROTOCOLS), "regime": tuple(REGIMES),
                   "matched_alpha": ("same", "scaled"), "expert_groups": ("kmeans", "domain"),
                   "conditioning": tuple(c for c, row in CONDITIONINGS.items() if self.task in row.tasks),
                   "dispatch": tuple(DISPATCHES), "objective": tuple(OBJECTIVES), "precision": PRECISIONS,
                   "cond_norm": COND_NORMS, "route_by": ("full", "prefix"), "dev_key": ("text", "group"),
                   "cond_level": tuple(LEVELS)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not valid here; choose one of {list(allowed)}")
        for name in self.batchings:
            if name not in BATCHINGS:
                raise ValueError(f"batchings: {name!r} is not a batching; choose among {list(BATCHINGS)}")
        kind = REGIMES[self.regime].expert_kind
        if kind and DISPATCHES[self.dispatch].mixes and kind not in MIXABLE_KINDS:
            raise ValueError(f"dispatch={self.dispatch!r} mixes experts, and {self.regime}'s {kind} experts cannot be "
                             f"mixed; choose one of {[d for d, row in DISPATCHES.items() if not row.mixes]}")
        if DISPATCHES[self.dispatch].per_line and REGIMES[self.regime].experts_in_blocks:
            raise ValueError(f"dispatch={self.dispatch!r} gives each line of a batch its own expert, which only head "
                             f"experts can (the body runs once per batch); {self.regime} holds its experts in the body: "
                             f"choose one of {[d for d, row in DISPATCHES.items() if not row.per_line]}")
        if self.cond_level != "batch" and CONDITIONINGS[self.conditioning].other_batch:
            raise ValueError(f"cond_level={self.cond_level!r} conditions each line on its own vector, and conditioning "
                             f"{self.conditioning!r} reads another batch's: set cond_level='batch'")
        objective = OBJECTIVES[self.objective]
        if (objective.regime or self.regime, objective.task or self.task) != (self.regime, self.task):
            raise ValueError(f"objective={self.objective!r} trains one {objective.regime} run on the {objective.task} "
                             f"task (its reward: {objective.reward}): set regime={objective.regime!r} and "
                             f"task={objective.task!r}, not {self.regime!r} and {self.task!r}")
        for name in ("rank", "batch_size", "epochs", "accumulate", "n_experts", "cem_shots", "cem_population", "cem_iters",
                     "reinforce_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.temperature <= 0:  # answers are sampled from logits / temperature
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.max_length < 2:  # one token has no next token to predict
            raise ValueError(f"max_length must be at least 2 tokens, got {self.max_length}")
        if self.n_clusters is not None and self.n_clusters < 1:
            raise ValueError(f"n_clusters must be a positive integer (or None: N // batch_size), got {self.n_clusters}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise ValueError(f"device={self.device!r} is not valid here; "
                             "choose 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        if not 0 <= self.score_from < self.max_length - 1:
            raise ValueError(f"score_from={self.score_from} must lie in [0, max_length - 1)")
        if (CONDITIONINGS[self.conditioning].prefix or self.routes_by_prefix) and \
                not 1 <= self.prefix_tokens < self.max_length - 1:
            raise ValueError(f"prefix_tokens={self.prefix_tokens} must lie in [1, max_length - 1)")
        return self


def field_help() -> dict[str, str]:
    """Each Config field's comment in this file, the command line's help for its option. A comment line of
    its own continues the field above it, or introduces the field below when that one has no comment."""
    import inspect

    helps: dict[str, list[str]] = {}
    field_line = re.compile(r"\s+(\w+): [^#]+?(?:#\s*(.*))?$")
    pending, last = [], None
    for line in inspect.getsource(Config).splitlines():
        text = line.strip()
        if text.startswith("# ---") or not text:
            continue
        if text.startswith("#"):
            pending.append(text.lstrip("# "))
        elif (m := field_line.match(line)) and m.group(1) in {f.name for f in dataclasses.fields(Config)}:
            own = [m.group(2)] if m.group(2) else []
            if pending and own and last:
                helps[last] += pending
            helps[m.group(1)] = own or pending
            pending, last = [], m.group(1)
    return {name: " ".join(parts) for name, parts in helps.items()}


class RunFailed(RuntimeError):
    """A run stopped for a reason the user can act on (e.g. training.TrainingDiverged). Defined
    here, free of torch, so that the command line can print it as one line."""


TASKS = ("lm", "instructions")
PRECISIONS = ("fp32", "bf16")
COND_NORMS = ("none", "standardize")
# Old names still accepted: "paper" once named the protocol, a profile and the publication's numbers at once.
# Now "paper" is the publication alone; the protocol of the authors' code is "authors", their setting `hub`.
RENAMED = {"protocol": {"paper": "authors"}, "profile": {"paper": "hub"}}
# Fields that only the SVF experts read: left out of other runs' names (runs.run_name), so they keep their folders.
EXPERT_FIELDS = ("n_experts", "dispatch", "cem_shots", "cem_population", "cem_iters", "expert_groups", "cem_held_out")
# Fields added after runs were committed: left out of a run's name at their default (runs.run_name), so those
# runs keep their folders; a value other than the default changes what a run computes, and its name.
ADDED_FIELDS = ("score_from", "dev_split", "matched_alpha", "expert_groups", "batchings", "cem_held_out", "accumulate",
                "precision", "cond_norm", "route_by", "dev_key", "cond_level")
# Fields that only REINFORCE reads: left out of next-token runs' names (runs.run_name) and of the other commands' options.
REINFORCE_FIELDS = ("objective", "reinforce_steps", "max_grad_norm", "temperature", "kl_coef")

# Profiles: plain overrides of the defaults above.
PROFILES: dict[str, dict] = {
    # seconds per step on 2 CPU cores: CI, the tests and the committed notebook outputs (one epoch: a loss curve is
    # before and after, and `make test` stays within its budget)
    "smoke": dict(backbone="smollm2", max_train_examples=64, max_eval_examples=32, max_length=32,
                  batch_size=8, epochs=1, lr=2e-3, max_new_tokens=16, n_generate=4, prefix_tokens=8),
    # the default of `make reproduce`: every regime on a 2-core machine in about half an hour
    # (the *_full regimes run the 30-layer body forward and backward: they set the budget)
    "cpu": dict(backbone="smollm2", max_train_examples=384, max_eval_examples=96, max_length=32,
                batch_size=8, epochs=2, lr=1e-3, max_new_tokens=32, n_generate=16),
    # enough data to tell the head-only regimes apart under the causal protocol (compare --experiment heads):
    # meant for about an hour on 2 CPU cores; `make reproduce` stays on cpu
    "study": dict(backbone="smollm2", max_train_examples=2000, max_eval_examples=500, max_length=64,
                  batch_size=8, epochs=2, lr=1e-3),
    # does adapting to the batch help when the inputs differ? six domains (data.DOMAINS), head-only regimes,
    # every run scored after the first prefix_tokens tokens (compare --experiment domains, chameleon.experiments.domains)
    "domains": dict(backbone="smollm2", corpus="domains", max_length=48, batch_size=8, epochs=2, lr=1e-3,
                    prefix_tokens=8, score_from=8, n_experts=6, matched_alpha="scaled",
                    batchings=("clustered", "kmeans", "mixed")),
    # the paper's setting: GPT-2 and WikiText-2 from the hub, for a CUDA machine (old name: "paper")
    "hub": dict(backbone="gpt2", corpus="wikitext-2-raw-v1", instructions="alpaca", max_length=256,
                  batch_size=32, epochs=10, lr=5e-4, rank=4, alpha=1.0),
}
# the positive control and the primary question again (chameleon.experiments.domains_control): the domains profile with lines
# routed and grouped by their prefix alone, and the dev split carved by article / file / conversation
PROFILES["domains_control"] = dict(PROFILES["domains"], route_by="prefix", dev_key="group")

# The paper's instruction-tuning runs used other hyper-parameters than its WikiText runs.
TASK_OVERRIDES: dict[tuple[str, str], dict] = {
    ("hub", "instructions"): dict(batch_size=16, max_length=512, lr=2e-4),
    ("smoke", "instructions"): dict(max_length=48, max_new_tokens=12),
    ("cpu", "instructions"): dict(max_length=64),
}

# objective="reinforce" over a profile: the reference's lr and batch (256 answers a step, for a GPU), and on
# the CPU profiles the steps and answers they can afford (the cpu run takes about 11 minutes on 2 cores)
REINFORCE = dict(lr=2e-3, batch_size=256)
REINFORCE_OVERRIDES: dict[str, dict] = {
    "smoke": dict(reinforce_steps=8, batch_size=4),
    "cpu": dict(reinforce_steps=24, batch_size=8),
}
