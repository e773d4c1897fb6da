"""Does adapting to the batch help when the inputs differ? The `domains` experiment (PLAN.md says what is claimed).

    python -m chameleon domains --stage lr       # learning rate per regime at seed 0, on a dev split carved from train
    python -m chameleon domains --stage runs --seeds 5   # every row at its rate, seed after seed
    python -m chameleon domains --stage report   # RESULTS.md and the figure, from the committed CSVs alone

Six domains (data.DOMAINS), head-only regimes under the causal protocol, every run scored from the same token
(profile `domains`: score_from = prefix_tokens). Each finished run appends its row to runs.csv and its
validation lines' losses to lines/<row>-seed<S>.csv, both committed as they land: the experiment may span
sessions, and the report reads nothing else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from chameleon.config import Config
from chameleon.experiments.stats import detectable, holm, paired
from chameleon.regimes import BATCHINGS, REGIMES


@dataclass(frozen=True)
class Row:
    name: str  # its label in every table
    overrides: dict = field(default_factory=dict)  # Config fields on top of the profile
    tuned_as: str = ""  # the row whose learning rate it takes ("": its own, or none when nothing trains)
    about: str = ""
    seeds: int = 5  # at most this many seeds (rows that train through the body cost several times more)

    @property
    def conditioned(self) -> bool:
        """It trains the hypernetwork head (the recipe's fields apply: chameleon.experiments.domains_control)."""
        return REGIMES[self.overrides["regime"]].conditioned

    @property
    def body(self) -> bool:
        """It trains through the body (no cached hidden states): run after every head-only row."""
        return not REGIMES[self.overrides["regime"]].frozen_body


ROWS = {r.name: r for r in [
    Row("unadapted", dict(regime="unadapted"), about="the frozen backbone"),
    Row("lora", dict(regime="lora"), about="one head LoRA, rank 4, for all data"),
    Row("lora_matched", dict(regime="lora_matched"),
        about="head LoRA with the hypernetwork's parameter count (rank 133), alpha scaled so alpha / r = 0.25"),
    Row("lora_experts", dict(regime="lora_experts", dispatch="classifier"),
        about="one head LoRA per k-means group (k = 6), picked per batch by its prompt's nearest group"),
    Row("lora_experts_domain", dict(regime="lora_experts", dispatch="oracle", expert_groups="domain"),
        tuned_as="lora_experts", about="one head LoRA per true domain, picked by the true domain (an upper bound)"),
    Row("chameleon_prefix", dict(regime="chameleon", conditioning="prefix"),
        about="the hypernetwork on the batch's first 8 tokens per line (leak-free)"),
    Row("chameleon_batch_mean", dict(regime="chameleon", conditioning="batch_mean"), tuned_as="chameleon_prefix",
        about="the paper's conditioning: the batch's mean embedding, scored tokens included (leaks)"),
    Row("chameleon_batch_mean_excl", dict(regime="chameleon", conditioning="batch_mean_excl"),
        tuned_as="chameleon_prefix", about="the batch mean without the scored targets"),
    Row("chameleon_shuffled", dict(regime="chameleon", conditioning="shuffled"), tuned_as="chameleon_prefix",
        about="another batch's vector"),
    Row("chameleon_constant", dict(regime="chameleon", conditioning="constant"), tuned_as="chameleon_prefix",
        about="the training mean for every batch: the parametrisation alone"),
    Row("chameleon_oracle", dict(regime="chameleon", conditioning="oracle"), tuned_as="chameleon_prefix",
        about="each line's true domain's training mean (an upper bound)"),
    # Transformer²: one z for all data, and one per k-means group (k = 6) with the three dispatches; CEM's shots
    # are held out of the experts' training
    Row("svf", dict(regime="svf"), seeds=3, about="Transformer²'s SVF: one z rescales every MLP matrix's singular values"),
    Row("svf_experts", dict(regime="svf_experts", dispatch="classifier", cem_held_out=True), seeds=3,
        about="one SVF expert per k-means group, picked per batch by its prompt's nearest group"),
    Row("svf_experts_cem", dict(regime="svf_experts", dispatch="cem", cem_held_out=True), tuned_as="svf_experts",
        seeds=3, about="a mixture of the SVF experts fitted per group by CEM on 4 held-out shots"),
]}
LR_GRID = (1e-3, 3e-3, 1e-2)
# The comparisons claimed (difference = first - second, val loss in nats; negative: the first is better), on
# the heterogeneous incoming batches grouped at inference (PRIMARY_BATCHING), Holm-corrected as one family.
COMPARISONS = [("chameleon_prefix", "chameleon_constant"),  # the primary endpoint
               ("chameleon_prefix", "lora_experts_domain"), ("chameleon_prefix", "lora_matched"),
               ("chameleon_prefix", "lora_experts"), ("chameleon_prefix", "lora"),
               ("chameleon_prefix", "chameleon_shuffled"), ("chameleon_oracle", "chameleon_constant"),
               ("chameleon_batch_mean", "chameleon_batch_mean_excl")]
PRIMARY_BATCHING = "kmeans"
# Transformer²'s rows, added after the plan "without changing the claims" (PLAN.md): the same paired differences
# under every batching, described, outside the Holm family
DESCRIBED = [("svf", "chameleon_prefix"), ("svf_experts", "svf"), ("svf_experts_cem", "svf_experts")]
# why two rows can compute the same thing in this experiment (reported when their line losses are identical)
SAME_WHY = {frozenset(("chameleon_prefix", "chameleon_batch_mean_excl")):
            " (every row is scored from token 8, so the batch mean without the scored targets averages each line's "
            "first 8 tokens: the prefix row's vector; comparison 8 is therefore batch_mean - prefix)"}


def folder(cfg: Config) -> Path:
    return Path(cfg.results_dir) / cfg.profile / cfg.task


def row_config(cfg: Config, row: Row, seed: int, lr: float | None = None, dev: bool = False, **settings) -> Config:
    """cfg for `row` at `seed` (on the dev split if `dev`), at rate `lr` and with any other chosen `settings`."""
    return cfg.replace(seed=seed, dev_split=dev, **row.overrides, **({"lr": lr} if lr else {}), **settings)


def trains(row: Row) -> bool:
    return "regime" not in row.overrides or REGIMES[row.overrides["regime"]].trains


def tune(cfg: Config, progress: bool = True) -> pd.DataFrame:
    """Seed 0 of every row that takes its own rate, at each rate of LR_GRID, validated on the dev split;
    rows appended to lr-grid.csv as they land (a diverged run is a row marked so, never a choice)."""
    from chameleon.experiments.sweeps import train_plan
    from chameleon.training import TrainingDiverged

    path = folder(cfg) / "lr-grid.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    corpus_table(cfg).to_csv(folder(cfg) / "corpus.csv", index=False)
    done = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=["row", "lr", "dev_loss", "status"])
    for row in sorted(ROWS.values(), key=lambda r: r.body):  # head-only rows first
        if row.tuned_as or not trains(row):
            continue
        for lr in LR_GRID:
            if tried(done, row.name, lr):
                continue
            try:
                result = train_plan(row_config(cfg, row, 0, lr, dev=True), progress)[-1]  # experts: oracle run first
                entry = dict(row=row.name, lr=lr, dev_loss=result["val_loss"], status="ok")
            except TrainingDiverged as err:  # the divergence check: this rate is out
                entry = dict(row=row.name, lr=lr, dev_loss=math.nan, status=f"diverged: {str(err)[:80]}")
            done = pd.concat([done, pd.DataFrame([entry])], ignore_index=True)
            done.to_csv(path, index=False)
    return done


def tried(grid: pd.DataFrame, row: str, lr: float) -> bool:
    """Whether the grid holds `row` at rate `lr` (run to the end: ok or diverged)."""
    return bool(((grid.row == row) & np.isclose(grid.lr.astype(float), lr)).any())


def chosen_rates(grid: pd.DataFrame) -> dict[str, float]:
    """Each row's learning rate: the grid's lowest dev loss of the row it is tuned as, once every rate of LR_GRID
    was tried for it (NaN for a row that trains nothing; rows not tuned to the end yet are missing)."""
    complete = [r for r in grid.row.unique() if all(tried(grid, r, lr) for lr in LR_GRID)]
    done = grid[grid.row.isin(complete) & (grid.status == "ok")]
    best = done.sort_values("dev_loss").groupby("row").lr.first().to_dict()
    rates = {r.name: best.get(r.tuned_as or r.name) if trains(r) else math.nan for r in ROWS.values()}
    return {name: float(lr) for name, lr in rates.items() if lr is not None}


def run_seeds(cfg: Config, seeds: int, progress: bool = True, rows: dict[str, Row] | None = None,
              settings: dict[str, dict] | None = None) -> pd.DataFrame:
    """Every row of `rows` (default ROWS) with its chosen `settings` (default: its rate from lr-grid.csv), seed after
    seed (so each finished seed completes a paired set); runs.csv and lines/ grow as runs finish, and rows already
    there are not run again."""
    from chameleon.experiments.sweeps import train_plan
    from chameleon.runs import LINES, run_dir

    out, rows = folder(cfg), rows or ROWS
    if settings is None:
        grid_path = out / "lr-grid.csv"
        if not grid_path.exists():
            raise ValueError(f"{grid_path} is missing: run `python -m chameleon domains --stage lr` first")
        settings = {name: {} if math.isnan(lr) else {"lr": lr} for name, lr in chosen_rates(pd.read_csv(grid_path)).items()}
    path = out / "runs.csv"
    done = pd.read_csv(path) if path.exists() else pd.DataFrame()
    (out / "lines").mkdir(parents=True, exist_ok=True)
    order = [(seed, row) for body in (False, True) for seed in range(seeds) for row in rows.values()
             if row.body == body and seed < row.seeds]  # every head-only row first, seed after seed
    for seed, row in order:
        if not done.empty and ((done.row == row.name) & (done.seed == seed)).any():
            continue
        if row.name not in settings:
            raise ValueError(f"no learning rate for {row.name} in {out}: run --stage lr to the end")
        run = row_config(cfg, row, seed, **settings[row.name])
        result = train_plan(run, progress)[-1]
        lines = pd.read_csv(run_dir(run) / LINES)
        lines.to_csv(out / "lines" / f"{row.name}-seed{seed}.csv", index=False, float_format="%.6f")
        entry = dict(row=row.name, seed=seed, lr=run.lr if trains(row) else math.nan,
                     **{k: v for k, v in settings[row.name].items() if k != "lr"},
                     trainable_params=result["trainable_params"], seconds=result["seconds"],
                     **{f"loss_{b}": v for b, v in result["batchings"].items()}, run=run_dir(run).name)
        done = pd.concat([done, pd.DataFrame([entry])], ignore_index=True)
        done.to_csv(path, index=False)
    return done


# ---------------------------------------------------------------------------- analysis: CSVs in, tables out

def line_table(out: Path) -> pd.DataFrame:
    """Every committed line loss: row, seed, line, domain, tokens, loss_<batching>."""
    frames = []
    for p in sorted((out / "lines").glob("*-seed*.csv")):
        name, seed = p.stem.rsplit("-seed", 1)
        frames.append(pd.read_csv(p).assign(row=name, seed=int(seed)))
    return pd.concat(frames, ignore_index=True)


COLUMNS = ["first", "second", "batching", "seeds", "difference", "t_low", "t_high", "p_seeds", "boot_low", "boot_high",
           "p_holm"]


def comparisons(lines: pd.DataFrame) -> pd.DataFrame:
    """COMPARISONS under every batching; Holm's correction over COMPARISONS on PRIMARY_BATCHING (the claims).
    A difference is `significant` when its Holm-adjusted p < 0.05 and its bootstrap interval excludes 0."""
    rows = [r for b in BATCHINGS for f, s in COMPARISONS if (r := paired(lines, f, s, b))]
    table = pd.DataFrame(rows, columns=COLUMNS)
    if table.empty:  # fewer than 2 seeds of every pair so far
        return table.assign(significant=pd.Series(dtype=bool))
    claim = table.batching == PRIMARY_BATCHING
    table.loc[claim, "p_holm"] = holm(table.loc[claim, "p_seeds"].to_numpy())
    table["significant"] = claim & (table.p_holm < 0.05) & ((table.boot_low > 0) | (table.boot_high < 0))
    return table


def described(lines: pd.DataFrame) -> pd.DataFrame:
    """DESCRIBED under every batching: the intervals of `comparisons`, no test (the pairs are not claims)."""
    rows = [r for f, s in DESCRIBED for b in BATCHINGS if (r := paired(lines, f, s, b))]
    return pd.DataFrame(rows, columns=COLUMNS[:-1])


def pick(table: pd.DataFrame, first: str, second: str, batching: str) -> pd.Series | None:
    """The row of a `comparisons` or `described` table for first - second under `batching`, or None."""
    hit = table[(table["first"] == first) & (table.second == second) & (table.batching == batching)]
    return None if hit.empty else hit.iloc[0]


def over_lines(c: pd.Series) -> str:
    """A row's bootstrap interval over lines, "[low, high]"."""
    return f"[{fmt(c.boot_low)}, {fmt(c.boot_high)}]"


def by_batching(table: pd.DataFrame, pairs: list[tuple[str, str]]) -> list[str]:
    """A markdown table: each pair's difference [bootstrap interval over lines] under every batching."""
    out = ["| first - second | " + " | ".join(BATCHINGS) + " |", "|---" * (1 + len(BATCHINGS)) + "|"]
    for f, s in pairs:
        cells = ["-" if (c := pick(table, f, s, b)) is None else f"{fmt(c.difference)} {over_lines(c)}"
                 for b in BATCHINGS]
        out.append(f"| {f} - {s} | " + " | ".join(cells) + " |")
    return out


def per_domain(lines: pd.DataFrame, batching: str = PRIMARY_BATCHING) -> pd.DataFrame:
    """Token-weighted val loss per row and domain (mean over seeds)."""
    col = f"loss_{batching}"
    sums = lines.groupby(["row", "seed", "domain"])[[col, "tokens"]].sum()
    loss = (sums[col] / sums.tokens).groupby(["row", "domain"]).mean().unstack("domain")
    return loss.reindex([r for r in ROWS if r in loss.index])


def corpus_table(cfg: Config) -> pd.DataFrame:
    """Lines per domain and split, and their length in the backbone's tokens (median, 90th percentile)."""
    from chameleon.backbones import load_backbone
    from chameleon.prepare import load_split_texts

    _, tokenizer = load_backbone(cfg.backbone, cache_dir=cfg.cache_dir)
    rows = []
    for split in ("train", "validation"):
        texts = load_split_texts(cfg, split)
        lengths = [len(ids) for ids in tokenizer(texts["full"])["input_ids"]]
        frame = pd.DataFrame({"domain": texts["domain"], "tokens": lengths})
        for domain, group in frame.groupby("domain"):
            rows.append(dict(split=split, domain=domain, lines=len(group), median_tokens=int(group.tokens.median()),
                             p90_tokens=int(group.tokens.quantile(0.9))))
    return pd.DataFrame(rows)


def minimum_detectable(study: pd.DataFrame, n: int = 5, alpha: float = 0.05 / len(COMPARISONS),
                       power: float = 0.8) -> pd.DataFrame:
    """The smallest difference a paired t-test over n seeds detects with `power` at level `alpha` (Holm's
    strictest), given the spread of per-seed differences in the study profile's committed paired table."""
    rows = []
    for _, r in study.iterrows():
        sd = float(np.std([float(x) for x in r.per_seed.split()], ddof=1))
        rows.append(dict(comparison=f"{r.regime} {r.conditioning} ({r.scored}) - {r.reference}", sd_per_seed=sd,
                         detectable=detectable(sd, n, alpha, power)))
    return pd.DataFrame(rows)


def fmt(x: float, digits: int = 3) -> str:
    return f"{x:+.{digits}f}"


def results_text(out: Path) -> str:
    """RESULTS.md: every number comes from the committed CSVs under `out` (lr-grid, runs, lines, corpus)."""
    runs, grid, lines = pd.read_csv(out / "runs.csv"), pd.read_csv(out / "lr-grid.csv"), line_table(out)
    corpus = pd.read_csv(out / "corpus.csv")
    table = comparisons(lines)
    losses = runs.groupby("row", sort=False).agg(
        seeds=("seed", "count"), lr=("lr", "first"), params=("trainable_params", "first"),
        **{f"{b} mean": (f"loss_{b}", "mean") for b in BATCHINGS}, **{f"{b} sd": (f"loss_{b}", "std") for b in BATCHINGS})
    losses = losses.reindex([r for r in ROWS if r in losses.index])
    main = ["| row | seeds | lr | trainable params | " + " | ".join(BATCHINGS) + " |", "|---" * (4 + len(BATCHINGS)) + "|"]
    for name, r in losses.iterrows():
        lr = "-" if pd.isna(r.lr) else f"{r.lr:g}"
        main.append(f"| {name} | {int(r.seeds)} | {lr} | {int(r.params):,} | "
                    + " | ".join(f"{r[f'{b} mean']:.3f}" + (f" ± {r[f'{b} sd']:.3f}" if r.seeds > 1 else " (one seed)")
                                 for b in BATCHINGS) + " |")
    claims = table[table.batching == PRIMARY_BATCHING]
    comp = ["| first - second | seeds | difference | 95% t-interval (seeds) | 95% bootstrap (lines) | Holm p | significant |",
            "|---|---|---|---|---|---|---|"]
    for _, c in claims.iterrows():
        comp.append(f"| {c['first']} - {c['second']} | {int(c.seeds)} | {fmt(c.difference)} | [{fmt(c.t_low)}, {fmt(c.t_high)}] | "
                    f"{over_lines(c)} | {c.p_holm:.3f} | {'yes' if c.significant else 'no'} |")
    extra = described(lines)
    dom = per_domain(lines)
    grid_md = grid.assign(dev_loss=grid.dev_loss.map(lambda v: "-" if pd.isna(v) else f"{v:.4f}"))
    rates = chosen_rates(grid)
    edge = sorted({r for r, lr in rates.items() if lr in (min(LR_GRID), max(LR_GRID)) and not ROWS[r].tuned_as})
    return "\n".join([
        "# Does adapting to the batch help when the inputs differ? (the `domains` experiment)", "",
        "Generated by `python -m chameleon domains --stage report` from the committed CSVs in this folder "
        "(runs.csv, lr-grid.csv, lines/, corpus.csv); the plan, written before the runs, is [PLAN.md](PLAN.md). "
        "Validation loss in nats per scored token (every row scored from token 8), mean ± sd over seeds.", "",
        "## Corpus", "", corpus.to_markdown(index=False), "",
        "## Learning rates (seed 0, dev split carved from train; the lowest dev loss is taken)", "",
        grid_md.to_markdown(index=False), "",
        *([f"Chosen at the grid's edge (a wider grid might do better): {', '.join(edge)}.", ""] if edge else []),
        "## Validation loss per row and batching", "",
        "`clustered`: each line routed to its nearest training cluster, one cluster per batch (as trained); "
        "`kmeans`: mixed incoming batches of 32 lines grouped by k-means at inference (k = 4); `mixed`: mixed "
        "batches of 8, one group.", "", *main, "",
        f"## The comparisons claimed ({PRIMARY_BATCHING} batching, Holm-corrected over {len(COMPARISONS)})", "",
        "Difference = first - second (negative: the first has the lower loss). Significant: Holm-adjusted p of the "
        "paired t-test over seeds below 0.05 and the paired bootstrap interval over validation lines excluding 0.",
        "", *comp, "",
        "## The same differences under every batching (bootstrap intervals over lines; descriptive)", "",
        *by_batching(table, COMPARISONS), "",
        f"![the claimed differences under each batching](../../../figures/{out.parent.name}/domains_comparisons.png)", "",
        *(["## Transformer²'s rows (added after the plan, outside its claims; bootstrap intervals over lines)", "",
           "SVF rescales the singular values of every MLP matrix of the body; the other rows adapt the head only.",
           "", *by_batching(extra, DESCRIBED), "",
           f"![Transformer²'s rows under each batching](../../../figures/{out.parent.name}/domains_transformer2.png)",
           ""] if len(extra) else []),
        f"## Per-domain validation loss ({PRIMARY_BATCHING} batching, mean over seeds)", "",
        dom.to_markdown(floatfmt=".3f"), "",
        *(["Rows with identical line losses on every seed: "
           + "; ".join(f"{a} = {b}{SAME_WHY.get(frozenset((a, b)), '')}" for a, b in same) + ".", ""]
          if (same := identical_rows(lines)) else []),
        "## Answer", "", *answer(table), *([f"- {said}"] if (said := transformer2_answer(extra)) else []), ""])


def identical_rows(lines: pd.DataFrame) -> list[tuple[str, str]]:
    """Pairs of rows whose every line loss is equal under every batching on every seed they share."""
    cols = [f"loss_{b}" for b in BATCHINGS]
    by_row = {r: g.set_index(["seed", "line"])[cols].sort_index() for r, g in lines.groupby("row", sort=False)}
    pairs = []
    for i, a in enumerate(by_row):
        for b in list(by_row)[i + 1:]:
            both = by_row[a].index.intersection(by_row[b].index)
            if len(both) and by_row[a].loc[both].equals(by_row[b].loc[both]):
                pairs.append((a, b))
    return pairs


def answer(table: pd.DataFrame) -> list[str]:
    """The answer in sentences, each number read from the comparisons table (the claims on PRIMARY_BATCHING; one
    descriptive line on batches of one training cluster each, where per-domain experts are at home)."""
    def say(f: str, s: str, what: str, batching: str = PRIMARY_BATCHING) -> str:
        c = pick(table, f, s, batching)
        if c is None:
            return f"- {what}: not measured yet."
        if batching != PRIMARY_BATCHING:  # description: no test, the interval over lines only
            return f"- {what}: {fmt(c.difference)} nats (over lines {over_lines(c)})."
        verdict = ("lower loss (significant)" if c.significant and c.difference < 0 else
                   "higher loss (significant)" if c.significant else "no significant difference")
        return (f"- {what}: {fmt(c.difference)} nats (95% over {int(c.seeds)} seeds [{fmt(c.t_low)}, {fmt(c.t_high)}], "
                f"Holm p {c.p_holm:.3f}; over lines {over_lines(c)}): {verdict}.")
    return [say("chameleon_prefix", "chameleon_constant", "Conditioning on the batch (leak-free prefix) vs the same "
                "hypernetwork on a constant input (primary)"),
            say("chameleon_prefix", "lora_matched", "vs static head LoRA with the same parameter budget"),
            say("chameleon_prefix", "lora", "vs static head LoRA of rank 4"),
            say("chameleon_prefix", "lora_experts_domain", "vs one head LoRA per true domain (oracle dispatch)"),
            say("chameleon_prefix", "lora_experts", "vs one head LoRA per k-means group (classifier dispatch)"),
            say("chameleon_prefix", "lora_experts_domain", "Descriptive, on batches of one training cluster each "
                "(`clustered`) instead: vs one head LoRA per true domain", "clustered")]


def transformer2_answer(extra: pd.DataFrame) -> str | None:
    """One sentence on Transformer²'s rows, each number read from the `described` table; None before they ran."""
    if any(pick(extra, f, s, PRIMARY_BATCHING) is None for f, s in [("svf", "chameleon_prefix"), ("svf_experts", "svf")]):
        return None

    def diff(f: str, s: str, batching: str) -> str:
        c = pick(extra, f, s, batching)
        return f"{fmt(c.difference)} nats {over_lines(c)} on `{batching}`"
    return (f"On the six domains (descriptive: {int(extra.seeds.min())} seeds, rows added after the domains "
            f"plan, intervals over lines), one SVF expert against the hypernetwork head: "
            f"{diff('svf', 'chameleon_prefix', PRIMARY_BATCHING)}; one SVF expert per k-means group (classifier "
            f"dispatch) against that one expert: " + ", ".join(diff("svf_experts", "svf", b) for b in BATCHINGS) + ".")


def report(cfg: Config) -> Path:
    from chameleon.experiments import plots

    out = folder(cfg)
    path = out / "RESULTS.md"
    path.write_text(results_text(out))
    lines = line_table(out)
    plots.domains_comparisons(comparisons(lines), COMPARISONS, BATCHINGS, cfg.profile)
    if len(extra := described(lines)):
        plots.domains_comparisons(extra, DESCRIBED, BATCHINGS, cfg.profile, name="domains_transformer2")
    return path
