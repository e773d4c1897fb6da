"""The kit's written results, generated from the committed tables under results/: RESULTS.md, the README's
answers block and the paired tables of the cpu runs (`python -m chameleon report`); and the check that closes
`make reproduce`, a user's numbers beside the committed ones (`python -m chameleon report --check runs/reproduce`).

Every sentence that quotes a number is a template filled from those tables, so text and tables cannot drift
apart; tests/test_results_text.py regenerates the text and fails when a committed file differs.

    write()                                   # RESULTS.md, README.md's answers, results/cpu/*/compare-seeds3-paired.*
    check_reproduced(Path("runs/reproduce"))  # one row per reproduced table: runs compared, largest difference
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from chameleon.experiments import domains as domains_experiment, domains_control
from chameleon.experiments.compare import PAPER_TABLE, WIKITEXT2_PAD_SHARE_256
from chameleon.config import ROOT, Config
from chameleon.experiments.report import paired_differences, to_markdown
from chameleon.regimes import PROTOCOLS

# The committed tables the text is written from (each as <stem>.csv, <stem>-runs.csv).
TABLES = {"lm": "results/cpu/lm/compare-seeds3", "instructions": "results/cpu/instructions/compare-seeds3",
          "paper_length": "results/cpu/lm/paper-length-seeds3", "heads": "results/study/lm/heads-seeds3",
          "svf": "results/cpu/lm/svf-seeds3"}
PAIRED = {task: f"{TABLES[task]}-paired" for task in ("lm", "instructions")}  # written by `report` from the runs
ANSWERS = ("<!-- answers: written by `python -m chameleon report` from results/; edit chameleon/experiments/results.py -->",
           "<!-- /answers -->")
DOMAINS_FOLDER = "results/domains/lm"  # the domains experiment's CSVs (chameleon.experiments.domains)
DOMAINS = f"{DOMAINS_FOLDER}/RESULTS.md"
CONTROL_FOLDER = "results/domains_control/lm"  # the second domains experiment's CSVs (chameleon.experiments.domains_control)
CONTROL = f"{CONTROL_FOLDER}/RESULTS.md"


def load(root: Path = ROOT) -> dict[str, pd.DataFrame]:
    """Every table of TABLES by name, its runs as "<name>_runs", the study's paired differences and the
    paper-length padded shares."""
    t = {}
    for name, stem in TABLES.items():
        t[name] = pd.read_csv(root / f"{stem}.csv")
        t[f"{name}_runs"] = pd.read_csv(root / f"{stem}-runs.csv")
    t["heads_paired"] = pd.read_csv(root / f"{TABLES['heads']}-paired.csv")
    t["shares"] = pd.read_csv(root / f"{TABLES['paper_length']}-shares.csv")
    t["control_folder"] = root / CONTROL_FOLDER
    if (root / CONTROL_FOLDER / "runs.csv").exists():  # read by the README's, RESULTS.md's and the key's answers
        t["control_verdicts"] = domains_control.verdicts(domains_experiment.line_table(root / CONTROL_FOLDER))
    if (root / DOMAINS_FOLDER / "runs.csv").exists():
        t["domains_lines"] = domains_experiment.line_table(root / DOMAINS_FOLDER)
    return t


# --- reading and formatting -------------------------------------------------------------------

def select(table: pd.DataFrame, *regimes: str, unless: dict | None = None, **match) -> pd.DataFrame:
    """The rows of `table` whose regime is one of `regimes` (any, where none is named), whose columns equal `match`
    and equal none of the values `unless` gives (a value or a tuple of them): how every template picks named rows.

        select(s, "lora", "chameleon", protocol="authors", unless={"conditioning": "prefix"})
    """
    keep = table.regime.isin(regimes) if regimes else pd.Series(True, index=table.index)
    for k, v in match.items():
        keep &= table[k] == v
    for k, v in (unless or {}).items():
        keep &= ~table[k].isin(v if isinstance(v, tuple) else (v,))
    return table[keep]


def one(table: pd.DataFrame, **match) -> pd.Series:
    """The one row of `table` whose columns equal `match` (a missing or repeated row is an error)."""
    rows = select(table, **match)
    if len(rows) != 1:
        raise ValueError(f"{len(rows)} rows match {match}")
    return rows.iloc[0]


def ci(row: pd.Series) -> str:
    """A paired difference as text: "-0.092 [-0.111, -0.073], significant"."""
    verdict = "significant" if row["significant"] else "not significant"
    return f"{row['difference']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}], {verdict}"


def span(values: pd.Series, digits: int = 3) -> str:
    """"lo-hi" of some values, or the one value when they agree to `digits` decimals."""
    lo, hi = f"{values.min():.{digits}f}", f"{values.max():.{digits}f}"
    return lo if lo == hi else f"{lo}-{hi}"


def pm(row: pd.Series, metric: str = "val_loss", digits: int = 3) -> str:
    """mean ± std of a summary row."""
    return f"{row[metric]:.{digits}f} ± {row[f'{metric}_std']:.{digits}f}"


def head_paired(per_run: pd.DataFrame) -> pd.DataFrame:
    """Paired differences of the head adapters (lora, lora_matched, chameleon) against `lora_matched` and
    against the `shuffled` control; `prefix` rows are left out: they score other tokens."""
    heads = select(per_run, "lora", "lora_matched", "chameleon", unless={"conditioning": "prefix"})
    return pd.concat([paired_differences(heads, {"regime": "lora_matched"}),
                      paired_differences(heads, {"regime": "chameleon", "conditioning": "shuffled"})],
                     ignore_index=True)


def paired_table(paired: pd.DataFrame) -> str:
    return paired.assign(**{c: paired[c].map(lambda v: f"{v:+.4f}") for c in ("difference", "low", "high")}
                         ).to_markdown(index=False)


def paired_markdown(task: str, paired: pd.DataFrame) -> str:
    """results/cpu/<task>/compare-seeds3-paired.md."""
    return (f"Produced by `python -m chameleon report` from {TABLES[task]}-runs.csv (the committed 3-seed cpu "
            "runs): paired per-seed differences of val loss (run - reference, same seed), 95% t-intervals over "
            "the seeds; significant: the interval excludes 0. `prefix` rows are left out: they score other "
            f"tokens.\n\n{paired_table(paired)}\n")


def _losses(table: pd.DataFrame) -> str:
    """The summary table without the timing columns (they stay in the committed .md)."""
    return to_markdown(table.drop(columns=[c for c in table if c.startswith("seconds")]))


# --- the sections of RESULTS.md ---------------------------------------------------------------

def paper_section(t) -> str:
    rows = "\n".join(f"| {r.regime} | {r.trainable_params:,} | {r.val_loss} | {r.val_ppl:,g} |"
                     for r in PAPER_TABLE.itertuples())
    return ("## The paper's table\n\nGPT-2 124M on WikiText-2, rank 4, the authors' protocol (`compare.PAPER_TABLE`):"
            "\n\n| regime | trainable params | val loss | val ppl |\n|---|---|---|---|\n" + rows +
            "\n\n`python -m chameleon params --model gpt2-arch --rank 4` reproduces the three parameter counts. The "
            "losses are the authors' protocol's: see [the paper's length](#the-papers-length) and "
            "[docs/protocol.md](docs/protocol.md).\n")


def lm_section(t) -> str:
    cfg, s, p = Config.from_profile("cpu"), t["lm"], head_paired(t["lm_runs"])
    pad_share = one(t["svf"], regime="svf", protocol="authors").pad_share
    a = {c: one(s, regime=r, protocol="authors", conditioning=c_) for c, (r, c_) in
         {"unadapted": ("unadapted", "-"), "lora_full": ("lora_full", "-")}.items()}
    heads = select(s, "lora", "lora_matched", "chameleon", protocol="authors")
    c = {r: one(s, regime=r, protocol="causal", conditioning=k) for r, k in
         [("unadapted", "-"), ("lora", "-"), ("lora_matched", "-"), ("lora_full", "-"), ("chameleon_full", "batch_mean")]}
    cham = {k: one(s, regime="chameleon", protocol="causal", conditioning=k) for k in ("batch_mean", "shuffled", "prefix")}
    vs_matched = {k: one(p, regime="chameleon", protocol="causal", conditioning=k, reference="lora_matched")
                  for k in ("batch_mean", "shuffled")}
    vs_shuffled = one(p, regime="chameleon", protocol="causal", conditioning="batch_mean", reference="chameleon / shuffled")
    separated = vs_matched["shuffled"]["significant"] and vs_shuffled["significant"]
    return f"""## Language modelling, `cpu` profile

[results/cpu/lm/compare-seeds3.md](results/cpu/lm/compare-seeds3.md), made by `python -m chameleon compare --profile
cpu --seeds 3`: SmolLM2-135M, {cfg.max_train_examples} training / {cfg.max_eval_examples} validation lines of the
embedded Wikipedia corpus, {cfg.max_length} tokens, batch {cfg.batch_size}, {cfg.epochs} epochs, lr {cfg.lr:g}, rank
{cfg.rank}. Training seconds are in that file.

{_losses(s)}

- Under the authors' protocol the head-only adapters barely move the loss ({a['unadapted'].val_loss:.3f} unadapted,
  {span(heads.val_loss)} for every head row), while LoRA in the blocks learns to echo its input
  ({a['unadapted'].val_loss:.3f} -> {a['lora_full'].val_loss:.3f}). At {cfg.max_length} tokens
  {pad_share:.0%} of the validation targets are the pad token (the `svf` table below, same data); the rest are the
  real tokens already at the last position, which a head cannot learn to copy. Why the heads do not learn the pad
  part at this length, as they do at 160 tokens, is not measured: this table predates the loss split by target kind.
- Under the causal protocol every regime lowers the loss a little: unadapted {c['unadapted'].val_loss:.3f}, head LoRA
  {c['lora'].val_loss:.3f}, `lora_matched` {c['lora_matched'].val_loss:.3f}, the ChamaleonLLM head
  {cham['batch_mean'].val_loss:.3f}, LoRA in the blocks {c['lora_full'].val_loss:.3f}, both
  {c['chameleon_full'].val_loss:.3f}.
- Paired against `lora_matched` (head LoRA with the hypernetwork's parameter count), causal: the ChamaleonLLM head
  {ci(vs_matched['batch_mean'])}; the `shuffled` control, conditioned on another batch's embedding,
  {ci(vs_matched['shuffled'])}; the batch's own embedding against `shuffled`: {ci(vs_shuffled)}.
  {"Three seeds of these runs separate the hypernetwork from its control." if separated else
   f"With {cfg.max_train_examples} lines and 3 seeds these runs cannot tell whether the batch's own embedding, or the "
   "hypernetwork at all, is what helps; the `study` profile below can."}
- `prefix` scores only the tokens after the first {cfg.prefix_tokens} of each line, so its loss
  ({cham['prefix'].val_loss:.3f}) is not comparable with the other rows.

Paired differences, both protocols ([results/cpu/lm/compare-seeds3-paired.md](results/cpu/lm/compare-seeds3-paired.md)):

{paired_table(p)}
"""


def heads_section(t) -> str:
    cfg, s, p, runs = Config.from_profile("study"), t["heads"], t["heads_paired"], t["heads_runs"]
    scored = f"from {cfg.prefix_tokens}"
    vs_unadapted = paired_differences(select(runs, scored=scored), {"regime": "unadapted"})
    bm = one(p, regime="chameleon", conditioning="batch_mean", reference="lora_matched")
    sh = one(p, regime="chameleon", conditioning="shuffled", reference="lora_matched")
    own = one(p, regime="chameleon", conditioning="batch_mean", reference="chameleon / shuffled")
    prefix = one(p, regime="chameleon", conditioning="prefix", reference="lora_matched")
    prefix_u = one(vs_unadapted, regime="chameleon", conditioning="prefix")
    static_u = [one(vs_unadapted, regime=r) for r in ("lora", "lora_matched")]
    verdict = ("the batch's own embedding helps beyond the hypernetwork itself" if own["significant"] and own.difference < 0
               else "on this data the kit cannot claim that the batch's own embedding helps; it can claim that a "
                    "hypernetwork-generated head adapter trains to a lower loss than a matched static one")
    return f"""## Does batch-aware adaptation help? `study` profile

[results/study/lm/heads-seeds3.md](results/study/lm/heads-seeds3.md), made by `python -m chameleon compare --profile
study --experiment heads --seeds 3`: head-only regimes, causal protocol, SmolLM2-135M on {cfg.max_train_examples}
training / {cfg.max_eval_examples} validation lines of {cfg.max_length} tokens, {cfg.epochs} epochs. Rows scored
`{scored}` count only the tokens after the first {cfg.prefix_tokens}, as `prefix` is scored.

{_losses(s)}

- The hypernetwork head beats `lora_matched`: {ci(bm)}.
- The `shuffled` control keeps {sh.difference / bm.difference:.0%} of that gain: {ci(sh)}. The batch's own embedding
  against `shuffled`: {ci(own)}. So {verdict}.
- Leak-free `prefix` conditioning (the hypernetwork sees the first {cfg.prefix_tokens} tokens, the loss counts the
  rest) against `lora_matched` on the same tokens: {ci(prefix)}; against the unadapted backbone: {ci(prefix_u)}.
  `lora` and `lora_matched` end above the unadapted backbone on those tokens ({ci(static_u[0])} and
  {ci(static_u[1])}), so beating them says little.

Paired differences ([results/study/lm/heads-seeds3-paired.csv](results/study/lm/heads-seeds3-paired.csv)):

{paired_table(p)}

Against the unadapted backbone, on the tokens after the first {cfg.prefix_tokens} (from
[heads-seeds3-runs.csv](results/study/lm/heads-seeds3-runs.csv)):

{paired_table(vs_unadapted)}
"""


def instructions_section(t) -> str:
    cfg, s = Config.from_profile("cpu", task="instructions"), t["instructions"]
    p = head_paired(t["instructions_runs"])
    authors = select(s, protocol="authors", unless={"regime": ("unadapted", "lora")})
    row = {(r, k): one(s, regime=r, protocol="causal", conditioning=k) for r, k in
           [("lora", "-"), ("lora_matched", "-"), ("chameleon", "task"), ("chameleon", "task_input"),
            ("chameleon", "shuffled")]}
    task_matched = one(p, regime="chameleon", protocol="causal", conditioning="task", reference="lora_matched")
    vs_shuffled = {k: one(p, regime="chameleon", protocol="causal", conditioning=k, reference="chameleon / shuffled")
                   for k in ("task", "task_input")}
    carries = vs_shuffled["task"]["significant"] and vs_shuffled["task"]["difference"] < 0
    return f"""## Instruction tuning, `cpu` profile

[results/cpu/instructions/compare-seeds3.md](results/cpu/instructions/compare-seeds3.md), made by `python -m chameleon
compare --task instructions --profile cpu --seeds 3`: the embedded stand-in for Alpaca, {cfg.max_train_examples}
training / {cfg.max_eval_examples} validation records, {cfg.max_length} tokens, loss on the response only; BLEU /
ROUGE-L / METEOR (0-100) of {cfg.max_new_tokens}-token greedy generations for {cfg.n_generate} validation prompts.

{_losses(s)}

- Authors' protocol: `lora` reaches {one(s, regime="lora", protocol="authors").val_loss:.4f}; `lora_matched` and
  every hypernetwork head, whatever it is conditioned on, {span(authors.val_loss, 4)}. All of them have learned to
  emit EOS at the padded last position, which is all that protocol scores; the adapters with 6.6 M parameters learn
  it further than the 0.2 M head LoRA (`lora` - `lora_matched`: {ci(one(p, regime="lora", protocol="authors",
  reference="lora_matched"))}).
- Causal protocol: the hypernetwork conditioned on the instruction alone (`task`, leak-free) has the lowest loss,
  {row['chameleon', 'task'].val_loss:.3f}, against {row['lora', '-'].val_loss:.3f} for LoRA and
  {row['lora_matched', '-'].val_loss:.3f} for `lora_matched` (paired: {ci(task_matched)}). But the control conditioned
  on another batch, `shuffled` ({row['chameleon', 'shuffled'].val_loss:.3f}), is close: `task` - `shuffled`
  {ci(vs_shuffled['task'])}, and `task_input`, which sees more of each example, {ci(vs_shuffled['task_input'])}.
  {"The batch's instruction carries information the adapter uses." if carries else
   "These runs do not show that the batch's instruction carries information the adapter uses."}
- The generation metrics of {cfg.n_generate} short generations are too noisy to rank the regimes (ROUGE-L standard
  deviations up to {s.rouge_l_std.max():.1f} points).

Paired differences ([results/cpu/instructions/compare-seeds3-paired.md](results/cpu/instructions/compare-seeds3-paired.md)):

{paired_table(p)}
"""


def paper_length_section(t) -> str:
    cfg, s, shares = Config.from_profile("cpu"), t["paper_length"], t["shares"]
    share = select(shares, lines="corpus").pivot_table(index="length", columns="tokenizer", values="padded_share")
    share_rows = "\n".join(f"| {n} | {r.gpt2:.4f} | {r.smollm2:.4f} |" for n, r in share.loc[[128, 160, 192, 256]].iterrows())
    lines = int(shares.n_lines.iloc[0])
    at = {n: select(s, max_length=n).set_index(["regime", "conditioning"]) for n in (160, 256)}

    def cell(n, key, metric):
        r = at[n].loc[key]
        return f"{r[metric]:.4g}" + (f" ± {r[f'{metric}_std']:.1g}" if r["seeds"] > 1 and r[f"{metric}_std"] > 1e-6 else "")
    table = "\n".join(f"| {k[0]} | {k[1]} | {cell(160, k, 'val_loss')} | {at[160].loc[k].val_loss_pad:.2g} | "
                      f"{at[160].loc[k].val_loss_real:.3f} | {cell(256, k, 'val_loss')} |" for k in at[160].index)
    u160, u256 = (one(s, max_length=n, regime="unadapted") for n in (160, 256))
    heads = select(s, max_length=160, unless={"regime": "unadapted"})
    lora, cham = (one(s, max_length=160, regime=r, conditioning=c) for r, c in [("lora", "-"), ("chameleon", "batch_mean")])
    p = WIKITEXT2_PAD_SHARE_256
    published = PAPER_TABLE.set_index("regime").val_loss
    real = u160.val_loss_real
    gpt2_pad = (published["unadapted"] - (1 - p) * real) / p
    lora_floor = p * lora.val_loss_pad + (1 - p) * lora.val_loss_real
    return f"""## The paper's length

The paper's "LoRA" and "ChamaleonLLM" were head-only (their block LoRA never reached GPT-2's `Conv1D`), scored under
the authors' protocol at 256 tokens, where most lines end in padding. `python -m chameleon compare --profile cpu
--experiment paper-length --seeds 3` reruns that setting: [results/cpu/lm/paper-length-seeds3.md](results/cpu/lm/paper-length-seeds3.md).

Share of the embedded corpus's lines shorter than L tokens (padded at the one scored position), all {lines:,} lines:

| L | GPT-2 tokenizer | SmolLM2 tokenizer |
|---|---|---|
{share_rows}

WikiText-2 at 256 tokens has about {p:.0%} of its non-empty lines padded (GPT-2 tokenizer, measured once; the hub is
unreachable here): the embedded corpus matches it at **160** tokens.

SmolLM2-135M, {cfg.max_train_examples} training / {cfg.max_eval_examples} validation lines, authors' protocol, loss
split by target kind (L_pad: the target is the pad token; L_real: a real token). At 160 tokens
{u160.pad_share * cfg.max_eval_examples:.0f} of the {cfg.max_eval_examples} validation targets are the pad token, so
L_real rests on {(1 - u160.pad_share) * cfg.max_eval_examples:.0f} lines; at 256 all of them are.

| regime | conditioning | val loss, 160 | L_pad, 160 | L_real, 160 | val loss, 256 (all pad) |
|---|---|---|---|---|---|
{table}

- Every adapted head removes the pad part (L_pad {u160.val_loss_pad:.3f} -> {heads.val_loss_pad.max():.2g} or less)
  and none learns the real part (L_real {span(heads.val_loss_real, 2)}, unadapted {real:.2f}). What is left is
  (1 - p_pad) * L_real, {span(heads.val_loss)}.
- `chameleon` ({cham.val_loss:.4f}) is {"below" if cham.val_loss < lora.val_loss else "not below"} `lora`
  ({lora.val_loss:.4f}) here. Its controls, `shuffled` (another
  batch's mean), `prefix` (the first {cfg.prefix_tokens} tokens) and `batch_mean_excl` (the mean without any scored
  token), land at the same loss and L_real; what differs is how far L_pad falls in {cfg.epochs} epochs
  ({lora.val_loss_pad:.1g} for `lora`, {select(heads, 'chameleon').val_loss_pad.max():.1g} or less for
  every hypernetwork head, whatever its conditioning).
- At 256 tokens every target is the pad token: the unadapted SmolLM2 scores {u256.val_loss:.2f} (its EOS after a longer
  run of EOS) and every adapted head {at[256].drop(index=('unadapted', '-')).val_loss.max():.3f} or less.

The paper's arithmetic, loss = p_pad * L_pad + (1 - p_pad) * L_real with p_pad = {p} (WikiText-2 at 256 tokens) and the
per-kind losses measured here at **160** tokens (those at 256 have no real targets):
- *Unadapted, {published['unadapted']}.* SmolLM2 gives {p} * {u160.val_loss_pad:.3f} + {1 - p:.2f} * {real:.3f} =
  {p * u160.val_loss_pad + (1 - p) * real:.2f} with its 160-token L_pad; with its 256-token L_pad ({u256.val_loss:.3f},
  after a longer run of EOS) {p * u256.val_loss + (1 - p) * real:.2f}. GPT-2's L_pad is not measured (no GPT-2 weights
  offline): worked back from the published {published['unadapted']} with SmolLM2's L_real, it is
  ({published['unadapted']} - {1 - p:.2f} * {real:.2f}) / {p} = **{gpt2_pad:.1f} nats**. That difference in the
  unadapted model's EOS loss, not the method, is the gap between the paper's {published['unadapted']:.2f} and the kit's
  numbers.
- *LoRA, {published['lora']}.* A head that removes the pad part reaches {p} * {lora.val_loss_pad:.4f} + {1 - p:.2f} *
  {lora.val_loss_real:.2f} = {lora_floor:.2f} here. The paper's number needs L_pad = ({published['lora']} -
  {lora_floor:.2f}) / {p} = {(published['lora'] - lora_floor) / p:.2f} nats left over: its LoRA had not finished
  unlearning GPT-2's EOS loss.
- *ChamaleonLLM, {published['chameleon']}.* Below that floor. It needs L_real <= {published['chameleon']} / {1 - p:.2f} =
  {published['chameleon'] / (1 - p):.2f} (the head predicting the real last tokens better, which the leak could do) or
  p_pad >= 1 - {published['chameleon']} / {real:.2f} = {1 - published['chameleon'] / real:.3f} (the {p:.0%} is an
  estimate).

The likeliest reading, an inference not measured on GPT-2: the hypernetwork head learns "emit EOS" faster than a head
LoRA, and so does its shuffled control; starting from GPT-2's large EOS loss with a fixed budget, that speed would
separate the paper's two numbers. See [docs/protocol.md](docs/protocol.md).
"""


def transformer2_section(t) -> str:
    main, svf, runs = t["lm"], t["svf"], t["svf_runs"]
    row = {r: one(main, regime=r, protocol="causal", conditioning=k) for r, k in
           [("unadapted", "-"), ("lora", "-"), ("lora_full", "-"), ("chameleon_full", "batch_mean")]}
    cham = one(main, regime="chameleon", protocol="causal", conditioning="batch_mean")
    one_expert = one(svf, regime="svf", protocol="causal")
    experts = select(svf, "svf_experts", protocol="causal")
    oracle = one(experts, conditioning="dispatch=oracle")
    accuracy = select(runs, conditioning="dispatch=classifier", protocol="causal").dispatch_accuracy
    authors = select(svf, protocol="authors")
    authors_experts = select(authors, "svf_experts")
    lines = [("unadapted", 0, "1", f"{row['unadapted'].val_loss:.3f}"),
             ("lora (head)", row["lora"].trainable_params, "1", pm(row["lora"])),
             ("chameleon (head, batch_mean)", cham.trainable_params, "1 + hypernetwork", pm(cham)),
             ("**svf** (one expert)", one_expert.trainable_params, "1", f"**{pm(one_expert)}**"),
             *[(f"svf_experts, {r.conditioning}", r.trainable_params, "2", pm(r)) for _, r in experts.iterrows()],
             ("lora_full (LoRA in every block)", row["lora_full"].trainable_params, "1", pm(row["lora_full"])),
             ("chameleon_full", row["chameleon_full"].trainable_params, "1 + hypernetwork", pm(row["chameleon_full"]))]
    table = "\n".join(f"| {name} | {n:,} | {passes} | {loss} |" for name, n, passes, loss in lines)
    return f"""## ChamaleonLLM or Transformer²?

[results/cpu/lm/svf-seeds3.md](results/cpu/lm/svf-seeds3.md), made by `python -m chameleon compare --profile cpu
--experiment svf --seeds 3`: Transformer²'s singular-value experts on the MLP matrices, the same data, seeds and
protocols as the `cpu` table above. Causal protocol, beside that table's rows:

| regime | trainable params | passes per request | val loss (causal) |
|---|---|---|---|
{table}

- One SVF expert beats both head adapters: {cham.val_loss - one_expert.val_loss:.3f} nats below the ChamaleonLLM head
  and {row['lora'].val_loss - one_expert.val_loss:.3f} below the head LoRA, with 1/{cham.trainable_params / one_expert.trainable_params:.0f}
  of the hypernetwork's parameters. It adapts the body, which the head regimes cannot; LoRA in every block
  (`lora_full`, {row['lora_full'].trainable_params / one_expert.trainable_params:.0f}x its parameters) is
  {one_expert.val_loss - row['lora_full'].val_loss:.3f} nats lower still.
- Three experts do worse than one ({oracle.val_loss:.3f} vs {one_expert.val_loss:.3f}): each trains on its group's
  batches only, about a third of the data and steps.
- The dispatch does not matter here: the classifier picks the oracle's group for {accuracy.mean():.1%} of the
  validation batches ({", ".join(f"{a:.0%}" for a in accuracy)} by seed) and the three dispatches' losses lie within
  {experts.val_loss.max() - experts.val_loss.min():.4f}. The CEM search scores mixtures on training examples of the
  batch's own group, so it finds that group's expert by construction ([docs/transformer2.md](docs/transformer2.md)).
- Under the authors' protocol (the last position, mostly padding) `svf` scores {pm(one(authors, regime="svf"))} and
  `svf_experts` {span(authors_experts.val_loss, 2)}: they learn the padding (L_pad {span(authors.val_loss_pad, 2)})
  but not the real last tokens (L_real {span(authors.val_loss_real, 1)}).
"""


def domains_section(t) -> str:
    return (f"## Across domains\n\nDoes adapting to the batch help across domains: see [{DOMAINS}]({DOMAINS}) (the "
            "`domains` experiment; its analysis plan, committed before any result, is "
            "[results/domains/lm/PLAN.md](results/domains/lm/PLAN.md)), and the second experiment, whose positive "
            f"control asks first whether the hypernetwork can read its input at all: [{CONTROL}]({CONTROL}) "
            f"([its plan]({CONTROL_FOLDER}/PLAN.md)).\n")


def results_md(t) -> str:
    """RESULTS.md."""
    head = ("# Results\n\nWritten by `python -m chameleon report` from the committed tables under `results/`; change "
            "the templates in `chameleon/experiments/results.py`, not this file (`tests/test_results_text.py` fails when the two "
            "disagree). Losses are validation losses in nats, mean ± standard deviation over seeds 0-2. A paired "
            "difference is run - reference on the same seed and scored tokens, with a 95% t-interval over the seeds; "
            "it is significant when the interval excludes 0. The protocols are in [docs/protocol.md](docs/protocol.md).\n")
    return "\n".join([head, paper_section(t), lm_section(t), heads_section(t), instructions_section(t),
                      paper_length_section(t), transformer2_section(t), domains_section(t)])


def answers(t) -> str:
    """The README's answers block, between the ANSWERS markers."""
    pl, svf, main, study = t["paper_length"], t["svf"], t["lm"], t["heads_paired"]
    at160 = select(pl, max_length=160)
    u = one(at160, regime="unadapted")
    adapted = select(at160, unless={"regime": "unadapted"})
    bm = one(study, regime="chameleon", conditioning="batch_mean", reference="lora_matched")
    sh = one(study, regime="chameleon", conditioning="shuffled", reference="lora_matched")
    own = one(study, regime="chameleon", conditioning="batch_mean", reference="chameleon / shuffled")
    cham = one(main, regime="chameleon", protocol="causal", conditioning="batch_mean")
    unadapted = one(main, regime="unadapted", protocol="causal")
    one_expert = one(svf, regime="svf", protocol="causal")
    experts = select(svf, "svf_experts", protocol="causal")
    published = PAPER_TABLE.set_index("regime").val_loss
    return f"""{ANSWERS[0]}
**Do the paper's numbers hold?** Its parameter counts do. Its losses ({published['unadapted']} -> {published['lora']}
-> {published['chameleon']}) measure the authors' protocol, which scores one position per line, mostly padding: at the
length where this corpus is padded as WikiText-2 is (160 tokens), every head-only adapter removes the pad part of the
loss (L_pad {u.val_loss_pad:.2f} -> {adapted.val_loss_pad.max():.2g} or less) and none learns the real last tokens
(L_real {u.val_loss_real:.2f} -> {span(adapted.val_loss_real, 2)}), whatever the
conditioning. As language modelling (the causal protocol, `cpu` profile) the ChamaleonLLM head lowers the loss from
{unadapted.val_loss:.3f} to {cham.val_loss:.3f}. [RESULTS.md](RESULTS.md#the-papers-length), [docs/protocol.md](docs/protocol.md).

**Does batch-aware adaptation help?** {"Yes" if own["significant"] and own.difference < 0 else "Not shown"}: a
hypernetwork-generated head adapter trains to a lower loss than LoRA with the same parameter count (`study`
profile, 3 seeds, difference in nats: {ci(bm)}), but so does the control conditioned on another batch's embedding
({ci(sh)}); the batch's own embedding against that control: {ci(own)}.
[RESULTS.md](RESULTS.md#does-batch-aware-adaptation-help-study-profile). Across six distinct domains, on
heterogeneous incoming batches grouped at inference ([{DOMAINS}]({DOMAINS}), plan committed before the runs):
{across_domains(t)}

{control_answer(t)}

{line_answer(t)}

**ChamaleonLLM or Transformer²?** On this data one SVF expert ({one_expert.trainable_params:,} parameters on the MLP
matrices) reaches {pm(one_expert)} causal, below the ChamaleonLLM head ({cham.trainable_params:,} parameters,
{pm(cham)}); three SVF experts reach {span(experts.val_loss)} whatever the dispatch.{transformer2_across_domains(t)}
[RESULTS.md](RESULTS.md), [docs/transformer2.md](docs/transformer2.md).
{ANSWERS[1]}"""


def across_domains(t) -> str:
    """The domains experiment's claimed comparisons, one line each, or why there are none yet."""
    lines = t.get("domains_lines")
    if lines is None:
        return "not measured yet."
    return "\n".join(domains_experiment.answer(domains_experiment.comparisons(lines)))


def control_answer(t, up: str = "") -> str:
    """The second domains experiment's answer, or where it stands (links relative to a file `up` from the root)."""
    out = t["control_folder"]
    said = domains_control.answer_of(out, t.get("control_verdicts")) if (out / "recipes.csv").exists() else \
        "its dev stage (recipes, rates, epochs) has not finished."
    return (f"But this experiment's positive control failed too, so a second one asks first whether the hypernetwork "
            f"can read its input ([{CONTROL}]({up}{CONTROL}), plan committed before its runs): {said}")


def line_answer(t, up: str = "") -> str:
    """Batch against line in the second domains experiment: its five differences and what each level costs."""
    out = t["control_folder"]
    v = t.get("control_verdicts")
    if v is None or not v["lines"]:
        return "**One adapter per batch or one per line?** Not measured yet."
    said = domains_control.line_answer(v)
    if (out / "costs.csv").exists():
        said += " " + domains_control.cost_sentence(pd.read_csv(out / "costs.csv"))
    return (f"**One adapter per batch or one per line?** {said} [{CONTROL}]({up}{CONTROL}), "
            f"[PLAN-line.md]({up}{CONTROL_FOLDER}/PLAN-line.md).")


def transformer2_across_domains(t) -> str:
    """The domains experiment's sentence on Transformer²'s rows, after a space, or nothing before they ran."""
    lines = t.get("domains_lines")
    said = None if lines is None else domains_experiment.transformer2_answer(domains_experiment.described(lines))
    return f" {said}" if said else ""


def readme_with_answers(readme: str, block: str, markers: tuple[str, str] = ANSWERS, name: str = "README.md") -> str:
    """A file's text (README.md's by default) with its generated block, between `markers`, replaced by `block`."""
    start, end = (re.escape(m) for m in markers)
    if not re.search(f"{start}.*{end}", readme, flags=re.S):
        raise ValueError(f"{name} has no generated block (its two markers: {markers})")
    return re.sub(f"{start}.*{end}", lambda _: block, readme, flags=re.S)


WORKSHOP_KEY = ("<!-- domains: written by `python -m chameleon report` from results/domains*/; edit chameleon/experiments/results.py -->",
                "<!-- /domains -->")


def workshop_domains(t) -> str:
    """docs/workshop.md's key on the domains experiments: their primary comparisons and the second one's answer."""
    lines = t.get("domains_lines")
    first = "the first domains experiment has not landed." if lines is None else (
        "On six domains (`domains`, 5 seeds, `kmeans` batching) the batch's leak-free prefix against a constant "
        "input: " + domains_experiment.answer(domains_experiment.comparisons(lines))[0].split(": ", 1)[1].rstrip("."))
    return (f"{WORKSHOP_KEY[0]}\n   {first}.\n   {control_answer(t, '../')}\n   {line_answer(t, '../')}\n"
            f"   {WORKSHOP_KEY[1]}")


def texts(root: Path = ROOT) -> dict[str, str]:
    """Every file `write` writes, by path relative to root, with its text."""
    t = load(root)
    files = {"RESULTS.md": results_md(t),
             "README.md": readme_with_answers((root / "README.md").read_text(), answers(t)),
             "docs/workshop.md": readme_with_answers((root / "docs/workshop.md").read_text(), workshop_domains(t),
                                                     WORKSHOP_KEY, "docs/workshop.md")}
    if "domains_lines" in t:
        files[DOMAINS] = domains_experiment.results_text(root / DOMAINS_FOLDER)
    if (root / CONTROL_FOLDER / "recipes.csv").exists():
        files[CONTROL] = domains_control.results_text(root / CONTROL_FOLDER)
    for task, stem in PAIRED.items():
        paired = head_paired(t[f"{task}_runs"])
        files[f"{stem}.csv"] = paired.to_csv(index=False)
        files[f"{stem}.md"] = paired_markdown(task, paired)
    return files


def write(root: Path = ROOT) -> list[Path]:
    """Write RESULTS.md, the README's answers and the cpu paired tables from the committed CSVs."""
    paths = []
    for name, text in texts(root).items():
        (root / name).write_text(text)
        paths.append(root / name)
    return paths


# --- make reproduce: a user's numbers beside the committed ones --------------------------------

def beside_committed(reproduced: pd.DataFrame, committed: pd.DataFrame, metric: str = "val_loss",
                 tolerance: float = 0.02) -> pd.DataFrame:
    """The runs present in both tables, matched by regime, protocol, conditioning, scored positions,
    max_length and seed, with both values of `metric` and whether they agree within `tolerance` (absolute).

    A committed table without a `scored` column predates it: its runs scored what their protocol scores (every token,
    or the last one: regimes.Protocol.scores), so only such reproduced runs are matched to it.
    """
    keys = [k for k in ("regime", "protocol", "conditioning", "scored", "max_length", "seed")
            if k in reproduced and k in committed]
    if "scored" in reproduced and "scored" not in committed:
        reproduced = reproduced[reproduced.scored.isin([p.scores for p in PROTOCOLS.values()])]
    both = reproduced[keys + [metric]].merge(committed[keys + [metric]], on=keys, suffixes=("_reproduced", "_committed"))
    both["difference"] = both[f"{metric}_reproduced"] - both[f"{metric}_committed"]
    both["within"] = both.difference.abs() <= tolerance
    return both


def check_reproduced(outputs: Path, root: Path = ROOT, tolerance: float = 0.02) -> pd.DataFrame:
    """Every per-run table under outputs/results/ beside the committed table of the same experiment
    (results/<profile>/<task>/<experiment>-seeds<N>-runs.csv, the one with the most seeds): one row per table."""
    rows = []
    for path in sorted((Path(outputs) / "results").glob("*/*/*-seeds*-runs.csv")):
        folder = path.parent.relative_to(Path(outputs))
        experiment = path.name.split("-seeds")[0]
        committed = sorted((root / folder).glob(f"{experiment}-seeds*-runs.csv"),
                           key=lambda p: int(p.name.split("-seeds")[1].split("-")[0]))
        if not committed:
            rows.append({"table": str(folder / path.name), "committed": "-", "runs": 0})
            continue
        both = beside_committed(pd.read_csv(path), pd.read_csv(committed[-1]), tolerance=tolerance)
        rows.append({"table": str(folder / path.name), "committed": str(committed[-1].relative_to(root)),
                     "runs": len(both), "largest difference": both.difference.abs().max() if len(both) else None,
                     "outside tolerance": int((~both.within).sum())})
    return pd.DataFrame(rows)
