"""Can the hypernetwork read its input? The positive control first, then the paper's question again (the second
domains experiment; results/domains_control/lm/PLAN.md says what is claimed, and was committed before any result).

    python -m chameleon domains --profile domains_control --stage lr        # recipes, rates, control and epochs (dev)
    python -m chameleon domains --profile domains_control --stage runs      # every row, 5 seeds, the chosen settings
    python -m chameleon domains --profile domains_control --stage report    # RESULTS.md and figures, from the CSVs
    python -m chameleon domains --profile domains_control --stage diagnose  # what the hypernetwork reads and writes

The first experiment (chameleon.experiments.domains) found the batch-conditioned head no better than the same head on a constant
input, beside a positive control that also failed: the hypernetwork behaved as one static adapter. Here every
choice is made on a dev split carved from train by article / file / conversation: a recipe (RECIPES: the
conditioning standardized or not, dropout or not) passes when a control that cannot be blind to its input (a
random code per true domain, `oracle_separable`) beats the constant input by CONTROL_MARGIN; each trained row's
rate comes from a five-point half-decade grid, widened while the best rate sits at an edge; its epochs from one
longer run's per-epoch dev loss. Validation lines are routed and grouped by their prefix alone (profile
`domains_control`: route_by "prefix"). Every stage appends what it finishes to a CSV here, so it can span sessions.
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from chameleon.experiments import domains as first
from chameleon.config import Config
from chameleon.experiments.domains import (Row, by_batching, corpus_table, folder, fmt, identical_rows, line_table,
                                          over_lines, per_domain, row_config, trains)
from chameleon.experiments.stats import detectable, holm, paired, tost
from chameleon.regimes import BATCHINGS, DISPATCHES

# what the hypernetwork rows may be trained with (Config fields); the paper's first
RECIPES = {"paper": dict(cond_norm="none", hyper_dropout=0.5),
           "no_dropout": dict(cond_norm="none", hyper_dropout=0.0),
           "standardize": dict(cond_norm="standardize", hyper_dropout=0.5),
           "standardize_no_dropout": dict(cond_norm="standardize", hyper_dropout=0.0)}
NO_RECIPE = "-"  # the recipe column of rows without a hypernetwork
LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)  # half-decades; widened by WIDEN more at most where the best is at an edge
WIDEN = 2
MAX_EPOCHS = 6  # the longer dev run whose per-epoch loss picks each tuned row's epochs
SEEDS = 5

# The first experiment's rows it repeats, in its order; what this one says differently about three of them (its
# routing reads the prefix; the oracle rows are controls here, not bounds: the first experiment's rows beat them)
SHARED = ("unadapted", "lora", "lora_matched", "lora_experts", "lora_experts_domain", "chameleon_prefix",
          "chameleon_constant", "chameleon_oracle")
ABOUT = {"lora_experts": "one head LoRA per k-means group (k = 6), picked per batch by its prefix's nearest group",
         "lora_experts_domain": "one head LoRA per true domain, picked by the batch's majority true domain",
         "chameleon_oracle": "each line's true domain's training mean (reads the label; the realistic control)"}
ROWS = {r.name: r for r in [
    *(replace(first.ROWS[name], about=ABOUT.get(name, first.ROWS[name].about)) for name in SHARED),
    Row("chameleon_oracle_separable", dict(regime="chameleon", conditioning="oracle_separable"),
        tuned_as="chameleon_prefix", about="a fixed random code per true domain (reads the label; the positive control)"),
    Row("chameleon_oracle_permuted", dict(regime="chameleon", conditioning="oracle_permuted"),
        tuned_as="chameleon_prefix", about="oracle_separable's trained run, each domain given another's code"),
    # batch against line (PLAN-line.md, written before these rows ran): one adapter per line, and per-line experts
    Row("chameleon_prefix_line", dict(regime="chameleon", conditioning="prefix", cond_level="line"),
        about="the same hypernetwork trained and evaluated with one adapter per line, from the line's own prefix"),
    Row("chameleon_prefix_line_eval", dict(regime="chameleon", conditioning="prefix", cond_level="line_eval"),
        tuned_as="chameleon_prefix", about="chameleon_prefix's trained runs, one adapter per line at inference"),
    Row("lora_experts_line", dict(regime="lora_experts", dispatch="classifier_line"), tuned_as="lora_experts",
        about="lora_experts' experts, each line routed to its own nearest group inside a mixed batch"),
    Row("lora_experts_domain_line", dict(regime="lora_experts", dispatch="oracle_line", expert_groups="domain"),
        tuned_as="lora_experts", about="lora_experts_domain's experts, each line to its own true domain's expert"),
]}
RECIPE_ROW = "chameleon_prefix"  # the row every recipe is tuned for; other hypernetwork rows take the chosen recipe

# The fixed sequence (PLAN.md): (first, second, batching); difference = first - second in nats per scored token
CONTROL = ("chameleon_oracle_separable", "chameleon_constant", "clustered")
CONTROL_MARGIN = -0.013  # the control passes below this (and with its seed interval below 0): half of what one head
# LoRA per true domain gained over the constant-input head on `clustered` in the first experiment (-0.027)
PRIMARY = ("chameleon_prefix", "chameleon_constant", "kmeans")
EQUIVALENCE = 0.01  # a null is claimed when the primary's 90% seed interval lies inside +-EQUIVALENCE (TOST)
REST = [("chameleon_prefix", "lora", "kmeans"), ("chameleon_prefix", "lora_matched", "kmeans"),
        ("chameleon_prefix", "lora_experts", "kmeans"), ("chameleon_prefix", "lora_experts_domain", "kmeans"),
        ("chameleon_oracle", "chameleon_constant", "kmeans")]  # Holm-corrected as one family, after the control
CHECKS = [("chameleon_oracle_permuted", "chameleon_oracle_separable", "clustered"),  # must give back the gain
          ("chameleon_oracle_permuted", "chameleon_constant", "clustered")]
LINE_FAMILY = [("chameleon_prefix", "chameleon_prefix_line", "kmeans"),  # PLAN-line.md: Holm over these five
               ("chameleon_prefix", "chameleon_prefix_line", "mixed"),
               ("chameleon_prefix", "chameleon_prefix_line_eval", "kmeans"),
               ("chameleon_prefix", "lora_experts_line", "kmeans"),
               ("chameleon_prefix", "lora_experts_domain_line", "kmeans")]
ALPHA = 0.05


# ---------------------------------------------------------------------------- the dev stage: recipe, rates, epochs

def half_decade(lr: float, step: int) -> float:
    """The rate `step` half-decades from `lr` on the ladder 1, 3, 10, 30, ... (x 10^k)."""
    h = round(2 * math.log10(lr)) + step
    return float(f"{(1 if h % 2 == 0 else 3) * 10 ** (h // 2):.0e}")




def dev_runs(cfg: Config, row: Row, recipe: str, lr: float, progress: bool, **settings) -> list[dict]:
    """Seed 0 of `row` on the dev split: every run of its plan (the training run first), their results."""
    from chameleon.experiments.sweeps import train_plan

    return train_plan(row_config(cfg, row, 0, lr, dev=True, **RECIPES.get(recipe, {}), **settings), progress)


def _read(path: Path, columns: list[str]) -> pd.DataFrame:
    return pd.read_csv(path) if path.exists() else pd.DataFrame(columns=columns)


def _append(table: pd.DataFrame, entry: dict, path: Path) -> pd.DataFrame:
    table = pd.concat([table, pd.DataFrame([entry])], ignore_index=True) if len(table) else pd.DataFrame([entry])
    table.to_csv(path, index=False)
    return table


def _mine(grid: pd.DataFrame, row: str, recipe: str) -> pd.DataFrame:
    return grid[(grid.row == row) & (grid.recipe == recipe)]


def chosen_rate(grid: pd.DataFrame, row: str, recipe: str) -> float | None:
    """The rate of the lowest dev loss of `row` under `recipe` (diverged runs never chosen), None before any ran."""
    ok = _mine(grid, row, recipe).query("status == 'ok'")
    return None if ok.empty else float(ok.sort_values("dev_loss").lr.iloc[0])


def edge(grid: pd.DataFrame, row: str, recipe: str) -> int:
    """-1 / +1 when the chosen rate is the lowest / highest rate tried for (row, recipe), else 0."""
    tried, best = _mine(grid, row, recipe).lr.astype(float), chosen_rate(grid, row, recipe)
    if best is None or len(tried) < 2:
        return 0
    return -1 if np.isclose(best, tried.min()) else 1 if np.isclose(best, tried.max()) else 0


def sweep(cfg: Config, row: Row, recipe: str, grid: pd.DataFrame, path: Path, progress: bool) -> pd.DataFrame:
    """LR_GRID for (row, recipe), then one half-decade more beyond the edge where the best rate sits, WIDEN times
    at most; each run's dev loss appended to lr-grid.csv as it lands (a diverged run is marked so)."""
    from chameleon.training import TrainingDiverged

    rates = list(LR_GRID)
    for _ in range(WIDEN + 1):
        for lr in rates:
            if np.isclose(_mine(grid, row.name, recipe).lr.astype(float), lr).any():
                continue
            entry = dict(row=row.name, recipe=recipe, lr=lr, dev_loss=math.nan, status="ok")
            try:
                entry["dev_loss"] = dev_runs(cfg, row, recipe, lr, progress)[-1]["val_loss"]
            except TrainingDiverged as err:
                entry["status"] = f"diverged: {str(err)[:80]}"
            grid = _append(grid, entry, path)
        side = edge(grid, row.name, recipe)
        if not side:
            break
        tried = _mine(grid, row.name, recipe).lr.astype(float)
        rates = [half_decade(tried.min() if side < 0 else tried.max(), side)]
    return grid


def check_controls(cfg: Config, grid: pd.DataFrame, progress: bool) -> pd.DataFrame:
    """Each recipe at chameleon_prefix's rate under it: the positive control and the constant input on the dev split
    (`clustered` batches: val_loss); recipes.csv gets one row per recipe."""
    from chameleon.training import TrainingDiverged

    path = folder(cfg) / "recipes.csv"
    table = _read(path, ["recipe", "lr", "prefix", "constant", "separable", "control", "passes"])
    for recipe in RECIPES:
        if recipe in set(table.recipe):
            continue
        lr = chosen_rate(grid, "chameleon_prefix", recipe)
        losses = {}
        for name in (CONTROL[0], CONTROL[1]):
            try:
                losses[name] = dev_runs(cfg, ROWS[name], recipe, lr, progress)[-1]["val_loss"]
            except TrainingDiverged:
                losses[name] = math.nan
        prefix = float(_mine(grid, "chameleon_prefix", recipe).set_index("lr").dev_loss.loc[lr])
        control = losses[CONTROL[0]] - losses[CONTROL[1]]
        table = _append(table, dict(recipe=recipe, lr=lr, prefix=prefix, constant=losses[CONTROL[1]],
                                    separable=losses[CONTROL[0]], control=control,
                                    passes=bool(control < CONTROL_MARGIN)), path)
    return table


def chosen_recipe(recipes: pd.DataFrame) -> tuple[str, bool]:
    """The recipe of the lowest chameleon_prefix dev loss among those whose control passed on dev, and True; if none
    passed, the one whose control came closest, and False (the answer is then (a), PLAN.md)."""
    passed = recipes[recipes.passes.astype(bool)]
    if len(passed):
        return str(passed.sort_values("prefix").recipe.iloc[0]), True
    return str(recipes.sort_values("control").recipe.iloc[0]), False


def choose_epochs(cfg: Config, grid: pd.DataFrame, recipe: str, progress: bool) -> pd.DataFrame:
    """One MAX_EPOCHS dev run of every row that takes its own rate, at that rate (the hypernetwork under `recipe`):
    its dev loss after each epoch, in epochs.csv. With a constant rate and the sampler's order fixed per epoch, its
    first E epochs are the run of E epochs."""
    path = folder(cfg) / "epochs.csv"
    table = _read(path, ["row", "recipe", "lr", "epoch", "dev_loss"])
    for row in ROWS.values():
        if row.tuned_as or not trains(row) or row.name in set(table.row):
            continue
        mine = recipe if row.conditioned else NO_RECIPE
        lr = chosen_rate(grid, row.name, mine)
        history = dev_runs(cfg, row, mine, lr, progress, epochs=MAX_EPOCHS)[0]["history"]
        new = pd.DataFrame([dict(row=row.name, recipe=mine, lr=lr, epoch=int(h["epoch"]), dev_loss=h["val_loss"])
                            for h in history if h["epoch"] >= 1 and float(h["epoch"]).is_integer()])
        table = pd.concat([table, new], ignore_index=True) if len(table) else new
        table.to_csv(path, index=False)
    return table


def chosen_epochs(epochs: pd.DataFrame, row: str) -> int:
    mine = epochs[epochs.row == row]
    return int(mine.sort_values("dev_loss").epoch.iloc[0])


def tune(cfg: Config, progress: bool = True) -> pd.DataFrame:
    """The whole dev stage, resumable: rates (every recipe for the hypernetwork), the control per recipe, epochs."""
    out = folder(cfg)
    out.mkdir(parents=True, exist_ok=True)
    corpus_table(cfg).to_csv(out / "corpus.csv", index=False)
    path = out / "lr-grid.csv"
    grid = _read(path, ["row", "recipe", "lr", "dev_loss", "status"])
    own = [row for row in ROWS.values() if not row.tuned_as and trains(row)]
    for row in own:  # every recipe for the recipe row, none for rows without a hypernetwork
        for recipe in RECIPES if row.name == RECIPE_ROW else [] if row.conditioned else [NO_RECIPE]:
            grid = sweep(cfg, row, recipe, grid, path, progress)
    recipes = check_controls(cfg, grid, progress)
    recipe = chosen_recipe(recipes)[0]
    for row in own:  # the other hypernetwork rows, under the chosen recipe
        if row.conditioned and row.name != RECIPE_ROW:
            grid = sweep(cfg, row, recipe, grid, path, progress)
    choose_epochs(cfg, grid, recipe, progress)
    return recipes


def settings(out: Path) -> dict[str, dict]:
    """Every row's chosen Config fields (rate, epochs, the recipe for hypernetwork rows), from the dev stage's CSVs."""
    grid, epochs = pd.read_csv(out / "lr-grid.csv"), pd.read_csv(out / "epochs.csv")
    recipe, _ = chosen_recipe(pd.read_csv(out / "recipes.csv"))
    chosen = {}
    for row in ROWS.values():
        source = row.tuned_as or row.name
        mine = recipe if row.conditioned else NO_RECIPE
        chosen[row.name] = {} if not trains(row) else dict(
            lr=chosen_rate(grid, source, mine), epochs=chosen_epochs(epochs, source), **RECIPES.get(mine, {}))
    return chosen


def run_seeds(cfg: Config, seeds: int = SEEDS, progress: bool = True) -> pd.DataFrame:
    """Every row for seeds 0 .. seeds-1 under the dev stage's choices; rows appended to runs.csv as they land."""
    out = folder(cfg)
    if not (out / "epochs.csv").exists():
        raise ValueError(f"{out / 'epochs.csv'} is missing: run `python -m chameleon domains --profile "
                         f"{cfg.profile} --stage lr` to the end first")
    return first.run_seeds(cfg, seeds, progress, rows=ROWS, settings=settings(out))


# ---------------------------------------------------------------------------- analysis: CSVs in, verdicts out

def verdicts(lines: pd.DataFrame) -> dict:
    """The fixed sequence of PLAN.md: the control's gate, then the primary, then the rest (Holm), and the negative
    checks; each comparison a dict of stats.paired's fields, with what was decided."""
    control = paired(lines, *CONTROL)
    out = {"control": control, "primary": None, "rest": [], "checks": [c for t in CHECKS if (c := paired(lines, *t))],
           "lines": [c for t in LINE_FAMILY if (c := paired(lines, *t))]}
    for c, p in zip(out["lines"], holm(np.array([c["p_seeds"] for c in out["lines"]]))):
        c["p_holm"] = float(p)
        c["significant"] = bool(p < ALPHA and (c["boot_low"] > 0 or c["boot_high"] < 0))
    if control is None:
        return out
    control["passes"] = bool(control["difference"] < CONTROL_MARGIN and control["t_high"] < 0)
    primary = paired(lines, *PRIMARY)
    if primary is not None:
        primary["tost_low"], primary["tost_high"] = tost(primary)
        primary["significant"] = bool(primary["p_seeds"] < ALPHA and (primary["boot_low"] > 0 or primary["boot_high"] < 0))
        primary["equivalent"] = bool(-EQUIVALENCE < primary["tost_low"] and primary["tost_high"] < EQUIVALENCE)
        out["primary"] = primary
    rest = [c for t in REST if (c := paired(lines, *t))]
    for c, p in zip(rest, holm(np.array([c["p_seeds"] for c in rest]))):
        c["p_holm"] = float(p)
        c["significant"] = bool(p < ALPHA and (c["boot_low"] > 0 or c["boot_high"] < 0))
    out["rest"] = rest
    return out


def seed_interval(c: dict) -> str:
    return f"[{fmt(c['t_low'])}, {fmt(c['t_high'])}]"


def answer(v: dict, dev_passed: bool) -> str:
    """Which of PLAN.md's three answers holds, in one paragraph whose every number is read from `v`."""
    c, p = v["control"], v["primary"]
    if c is None or p is None:
        return "Not answered yet: the control and the primary need at least 2 seeds of their rows."
    gate = (f"the positive control (a random code per true domain against the constant input, `{CONTROL[2]}`) "
            f"{fmt(c['difference'])} nats, 95% over {c['seeds']} seeds {seed_interval(c)}, margin {CONTROL_MARGIN:+.3f}")
    if not c["passes"]:
        tried = "under every recipe tried on dev" if not dev_passed else "on validation, though it passed on dev"
        return (f"**(a) The hypernetwork cannot use its input at this scale**: {gate}, does not pass ({tried}). "
                f"The primary comparison is not tested; its difference, for the record: {fmt(p['difference'])} nats "
                f"{seed_interval(p)}.{blind_or_not(v)}")
    primary = (f"conditioning on the batch's prefix against the constant input (`{PRIMARY[2]}`) {fmt(p['difference'])} "
               f"nats, 95% over {p['seeds']} seeds {seed_interval(p)}, p {p['p_seeds']:.3f}, over lines "
               f"{over_lines(pd.Series(p))}")
    if p["significant"] and p["difference"] < 0:
        return f"**(c) The control passes and the batch helps**: {gate}, passes; {primary}."
    bound = (f"equivalent within +-{EQUIVALENCE} (90% interval [{fmt(p['tost_low'])}, {fmt(p['tost_high'])}])"
             if p["equivalent"] else f"not shown equivalent within +-{EQUIVALENCE} (90% interval "
             f"[{fmt(p['tost_low'])}, {fmt(p['tost_high'])}])")
    return (f"**(b) The control passes and the leak-free batch still does not beat the constant input**: {gate}, "
            f"passes; {primary}: {bound}; the largest benefit the seed interval allows is {-p['t_low']:.3f} nats.")


def blind_or_not(v: dict) -> str:
    """Described beside a failed control (not claimed by the plan): whether the trained head reads the codes at all,
    from the negative check (the codes permuted across domains at inference against the right ones)."""
    check = next((c for c in v["checks"] if c["second"] == CONTROL[0]), None)
    if check is None or not check["t_low"] > 0:
        return ""
    return (f" Described, not claimed: it is not blind to its input, since giving each domain another's code costs "
            f"{fmt(check['difference'])} nats more {seed_interval(check)} (the negative check); what it reads does "
            f"not lower the validation loss below the constant input's.")


def line_answer(v: dict) -> str:
    """Batch against line in one sentence, every number read from `v`."""
    said = {(c["second"], c["batching"]): c for c in v["lines"]}
    if LINE_FAMILY[0][1:] not in said:
        return "Batch against line: not measured yet."

    def one(second: str, batching: str) -> str:
        c = said.get((second, batching))
        if c is None:
            return f"{second} ({batching}): not measured yet"
        verdict = "significant" if c["significant"] else "not significant"
        return (f"{fmt(c['difference'])} nats against {second} on `{batching}` ({c['seeds']} seeds {seed_interval(c)}, "
                f"Holm p {c['p_holm']:.3f}: {verdict})")
    return ("Batch against line (the batch-level prefix head minus each): " + "; ".join(
        one(second, b) for _, second, b in LINE_FAMILY) + ". Negative: the batch-level head has the lower loss.")


def cost_sentence(costs: pd.DataFrame) -> str:
    """costs.csv in one sentence: adapters per 1,000 lines on `kmeans`, and each row's step and evaluation per scored
    row against the batch-level hypernetwork's (the first of COST_ROWS)."""
    rows = costs.set_index("row")
    applied = rows[f"adapters per 1,000 lines ({PRIMARY[2]})"]
    each = "; ".join(f"{name} {applied[name]:,.0f} adapters, step x{r['step ratio']:.2f}, evaluation x{r['eval ratio']:.2f}"
                     for name, r in rows.iloc[1:].iterrows())
    return (f"Cost per 1,000 validation lines on `{PRIMARY[2]}` batches, against {rows.index[0]} ({applied.iloc[0]:,.0f} "
            f"adapters; time per scored row measured in one run): {each}.")


def answer_of(out: Path, v: dict | None = None) -> str:
    """`answer` from the committed CSVs under `out` (once the dev stage has finished); `v`: their verdicts, where the
    caller has them already."""
    _, dev_passed = chosen_recipe(pd.read_csv(out / "recipes.csv"))
    if not (out / "runs.csv").exists():
        return "its validation runs have not landed yet."
    return answer(verdicts(line_table(out)) if v is None else v, dev_passed)


def table_row(c: dict, *extra: str) -> str:
    return (f"| {c['first']} - {c['second']} | `{c['batching']}` | {c['seeds']} | {fmt(c['difference'])} | "
            f"{seed_interval(c)} | {over_lines(pd.Series(c))} | " + " | ".join(extra) + " |")


HEADER = "| first - second | batching | seeds | difference | 95% over seeds | 95% over lines |"


def loss_table(runs: pd.DataFrame) -> list[str]:
    """Mean ± sd over seeds of every row's validation loss under each batching, with its settings."""
    cols = [c for c in ("lr", "epochs", "cond_norm", "hyper_dropout") if c in runs]
    agg = runs.groupby("row", sort=False).agg(seeds=("seed", "count"), params=("trainable_params", "first"),
                                              **{c: (c, "first") for c in cols},
                                              **{f"{b} mean": (f"loss_{b}", "mean") for b in BATCHINGS},
                                              **{f"{b} sd": (f"loss_{b}", "std") for b in BATCHINGS})
    agg = agg.reindex([r for r in ROWS if r in agg.index])
    out = ["| row | seeds | trainable params | " + " | ".join(cols) + " | " + " | ".join(BATCHINGS) + " |",
           "|---" * (3 + len(cols) + len(BATCHINGS)) + "|"]
    for name, r in agg.iterrows():
        settings_ = ["-" if pd.isna(r[c]) else f"{r[c]:g}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        out.append(f"| {name} | {int(r.seeds)} | {int(r.params):,} | " + " | ".join(settings_) + " | "
                   + " | ".join(f"{r[f'{b} mean']:.3f}" + (f" ± {r[f'{b} sd']:.3f}" if r.seeds > 1 else "")
                                for b in BATCHINGS) + " |")
    return out


def results_text(out: Path) -> str:
    """RESULTS.md of the second experiment: every number from the committed CSVs under `out`."""
    grid, recipes = pd.read_csv(out / "lr-grid.csv"), pd.read_csv(out / "recipes.csv")
    epochs = pd.read_csv(out / "epochs.csv") if (out / "epochs.csv").exists() else None
    recipe, dev_passed = chosen_recipe(recipes)
    text = ["# Can the hypernetwork read its input? (the second `domains` experiment)", "",
            "Generated by `python -m chameleon domains --profile domains_control --stage report` from the CSVs in this "
            "folder; the plan, committed before any of them, is [PLAN.md](PLAN.md); the first experiment, unchanged, is "
            "[../../domains/lm/RESULTS.md](../../domains/lm/RESULTS.md). Loss in nats per scored token (every row "
            "scored from token 8).", "",
            "## The dev stage (seed 0, a dev split carved from train by article / file / conversation)", "",
            f"Recipes for the hypernetwork rows, each at chameleon_prefix's best rate under it; the control "
            f"(oracle_separable - constant on dev) passes below {CONTROL_MARGIN:+.3f}:", "",
            recipes.assign(**{c: recipes[c].map(lambda v: f"{v:.4f}") for c in ("prefix", "constant", "separable", "control")},
                           lr=recipes.lr.map(lambda v: f"{v:g}")).to_markdown(index=False), "",
            f"Chosen: **{recipe}** ({RECIPES[recipe]})" + ("" if dev_passed else ", though no recipe's control passed "
                                                             "on dev (the closest is run)") + ".", ""]
    rates = grid.assign(dev_loss=grid.dev_loss.map(lambda v: "-" if pd.isna(v) else f"{v:.4f}"), lr=grid.lr.map(lambda v: f"{v:g}"))
    at_edge = sorted({f"{r} ({k})" for r, k in zip(grid.row, grid.recipe) if edge(grid, r, k)})
    text += ["Learning rates (the lowest dev loss is taken; the grid widened past an edge where the best sat):", "",
             rates.to_markdown(index=False), "",
             f"Chosen at an edge of what was tried: {', '.join(at_edge)}." if at_edge else
             "Every chosen rate lies inside its grid.", ""]
    if epochs is None:
        text += ["Epochs: not chosen yet (the dev stage goes on).", ""]
    else:
        best = epochs.loc[epochs.groupby("row").dev_loss.idxmin()]
        text += [f"Epochs, from one {MAX_EPOCHS}-epoch dev run per tuned row at its rate (rows tuned as another take "
                 "its epochs): " + "; ".join(f"{r.row} {int(r.epoch)} (dev {r.dev_loss:.4f})" for r in best.itertuples())
                 + ".", ""]
    if (out / "diagnostics.csv").exists() and not (out / "runs.csv").exists():
        text += diagnostics_text(out)
    if not (out / "runs.csv").exists():
        return "\n".join(text + ["## Answer", "", "Not answered yet: the validation runs have not landed.", ""])
    runs_, lines = pd.read_csv(out / "runs.csv"), line_table(out)
    v = verdicts(lines)
    text += ["## Validation loss per row and batching (mean ± sd over seeds)", "",
             "`clustered`: each line routed by its prefix to the nearest training cluster's prefix centroid, one "
             "cluster per batch; `kmeans`: mixed incoming batches of 32 lines grouped by k-means on their prefix "
             "embeddings (k = 4); `mixed`: mixed batches of 8, one group.", "", *loss_table(runs_), "",
             "## The fixed sequence (PLAN.md)", ""]
    if v["control"] is not None:
        c = v["control"]
        text += ["**1. The positive control** (passes when its difference is below "
                 f"{CONTROL_MARGIN:+.3f} and its 95% seed interval below 0):", "", HEADER + " passes |",
                 "|---" * 7 + "|", table_row(c, "yes" if c["passes"] else "no"), ""]
    if v["primary"] is not None:
        p = v["primary"]
        text += [f"**2. The primary** (tested {'because' if v['control']['passes'] else 'only for the record: the control did not pass;'} "
                 f"significant: p < {ALPHA} and the interval over lines excluding 0; equivalent: the 90% seed "
                 f"interval inside ±{EQUIVALENCE}; detectable at this spread with 80% power: "
                 f"{detectable(p['sd'], p['seeds']):.4f} nats):", "",
                 HEADER + " p | 90% over seeds | significant | equivalent |", "|---" * 10 + "|",
                 table_row(p, f"{p['p_seeds']:.3f}", f"[{fmt(p['tost_low'])}, {fmt(p['tost_high'])}]",
                           "yes" if p["significant"] else "no", "yes" if p["equivalent"] else "no"), ""]
    if v["rest"]:
        text += ["**3. The rest** (Holm over these five):", "", HEADER + " Holm p | significant |", "|---" * 8 + "|",
                 *[table_row(c, f"{c['p_holm']:.3f}", "yes" if c["significant"] else "no") for c in v["rest"]], ""]
    if v["lines"]:
        text += ["## Batch against line ([PLAN-line.md](PLAN-line.md); Holm over these five)", "",
                 "One adapter per batch (the paper) against one per line: the hypernetwork trained per line, the "
                 "batch-trained hypernetwork evaluated per line, and per-line expert routing inside mixed batches "
                 "(as multi-adapter servers route each request).", "", HEADER + " Holm p | significant |",
                 "|---" * 8 + "|", *[table_row(c, f"{c['p_holm']:.3f}", "yes" if c["significant"] else "no")
                                     for c in v["lines"]], "", f"- {line_answer(v)}", ""]
        if (out / "costs.csv").exists():
            text += ["What each costs (`--stage costs`: adapters generated per 1,000 validation lines under each "
                     "batching, and the head's training step and evaluation per scored row as ratios to the batch-level "
                     "hypernetwork's, measured in one run):", "",
                     pd.read_csv(out / "costs.csv").to_markdown(index=False, floatfmt=".2f"), "",
                     f"![loss against adapters generated per line](../../../figures/{out.parent.name}/lines.png)", ""]
    if v["checks"]:
        text += ["**The negative check** (described: the codes permuted across domains at inference must give back "
                 "what the control gained):", "", HEADER, "|---" * 6 + "|", *[table_row(c).rstrip(" |") + " |"
                                                                            for c in v["checks"]], ""]
    table = pd.DataFrame([c for t in [CONTROL, PRIMARY, *REST] for b in BATCHINGS
                          if (c := paired(lines, t[0], t[1], b))])
    text += ["## The same differences under every batching (95% over lines; descriptive)", "",
             *(by_batching(table, [(f, s) for f, s, _ in [CONTROL, PRIMARY, *REST]]) if len(table) else []), "",
             "## Per-domain validation loss (`kmeans` batching, mean over seeds)", "",
             per_domain(lines).reindex([r for r in ROWS if r in set(lines.row)]).to_markdown(floatfmt=".3f"), ""]
    if same := identical_rows(lines):
        text += ["Rows with identical line losses on every seed: " + "; ".join(f"{a} = {b}" for a, b in same) + ".", ""]
    if (out / "diagnostics.csv").exists():
        text += diagnostics_text(out)
    text += ["## Answer", "", answer_of(out, v), ""]
    return "\n".join(text)


def diagnostics_text(out: Path) -> list[str]:
    """The diagnostics section of RESULTS.md, from diagnostics.csv."""
    return ["## What the hypernetwork reads and writes (`--stage diagnose`)", "",
            "Per conditioned row and recipe (seed 0; `dev`: the dev stage's runs): the pairwise cosine of the "
            "domains' mean input vectors as the hypernetwork reads them (after cond_norm), the share of those "
            "vectors' second moment along their common direction, a probe's accuracy at telling the domain from "
            "one line's input, and how far the generated update moves with its input: the spread of the logits' "
            "update on 256 fixed rows across validation k-means groups and across domains, relative to its mean.", "",
            pd.read_csv(out / "diagnostics.csv").to_markdown(index=False, floatfmt=".3g"), "",
            f"![diagnostics](../../../figures/{out.parent.name}/diagnostics.png)", ""]


def report(cfg: Config) -> Path:
    """RESULTS.md, and the figure of loss against adapters per line once costs.csv and the line rows are there."""
    from chameleon.experiments import plots

    out = folder(cfg)
    path = out / "RESULTS.md"
    path.write_text(results_text(out))
    if (out / "costs.csv").exists() and (out / "runs.csv").exists():
        runs_ = pd.read_csv(out / "runs.csv").groupby("row").loss_kmeans.agg(["mean", "std"])
        cost = pd.read_csv(out / "costs.csv").set_index("row")["adapters per 1,000 lines (kmeans)"]
        points = pd.DataFrame([dict(row=r, adapters=cost[r], loss=runs_.loc[r, "mean"], sd=runs_.loc[r, "std"])
                               for r in cost.index if r in runs_.index])
        if len(points):
            plots.line_costs(points, cfg.profile)
    return path


def realised_spreads(first_out: Path, n: int = SEEDS) -> pd.DataFrame:
    """PLAN.md's power table: each planned comparison's per-seed spread in the first experiment (the control's taken
    from its nearest row there, chameleon_oracle) and the difference a paired t-test over n seeds detects with 80%
    power at ALPHA."""
    lines = line_table(first_out)
    stand_in = {"chameleon_oracle_separable": "chameleon_oracle"}
    rows = []
    for f, s, b in [CONTROL, PRIMARY, *REST]:
        c = paired(lines, stand_in.get(f, f), s, b)
        rows.append(dict(comparison=f"{f} - {s}", batching=b, first_experiment=f"{c['first']} - {c['second']}",
                         sd_per_seed=round(c["sd"], 4), detectable=round(detectable(c["sd"], n), 4)))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- diagnostics: run folders in, one CSV out

PROBE_ROWS = 256  # validation rows whose logits' update is compared across inputs


def diagnosed_runs(out: Path) -> list[tuple[str, str, str, dict]]:
    """(stage, recipe, row, Config fields) of every conditioned run the diagnostics read: on dev, each recipe's
    prefix, constant and separable runs at seed 0 (the control check); on validation, seed 0 of each conditioned
    row that trains (the permuted row reads the separable row's weights)."""
    grid, recipes = pd.read_csv(out / "lr-grid.csv"), pd.read_csv(out / "recipes.csv")
    runs = [("dev", recipe, name, dict(lr=chosen_rate(grid, "chameleon_prefix", recipe), dev_split=True,
                                       **RECIPES[recipe]))
            for recipe in recipes.recipe for name in ("chameleon_prefix", CONTROL[1], CONTROL[0])]
    if (out / "runs.csv").exists():
        done, chosen = set(pd.read_csv(out / "runs.csv").query("seed == 0").row), settings(out)
        recipe = chosen_recipe(recipes)[0]
        runs += [("validation", recipe, name, chosen[name]) for name, row in ROWS.items()
                 if row.conditioned and name in done]
    return runs


def geometry(x_train, train_domains, x_val, val_domains) -> dict:
    """How distinguishable the hypernetwork's inputs are: the mean pairwise cosine of the domains' mean inputs, the
    share of the inputs' second moment along their common (mean) direction, and a logistic probe's validation
    accuracy at telling the domain from one line's input."""
    from sklearn.linear_model import LogisticRegression

    names = sorted(set(train_domains))
    means = torch.stack([x_val[torch.from_numpy(val_domains == d)].mean(0) for d in names]).double()
    unit = means / means.norm(dim=1, keepdim=True).clamp(min=1e-12)
    cos = unit @ unit.T
    pairs = cos[~torch.eye(len(names), dtype=torch.bool)]
    common = float(x_val.double().mean(0).square().sum() / x_val.double().square().sum(1).mean().clamp(min=1e-30))
    probe = LogisticRegression(max_iter=2000).fit(x_train.double().numpy(), train_domains)
    return dict(domain_cosine=float(pairs.mean()), common_share=common,
                probe_accuracy=float((probe.predict(x_val.double().numpy()) == val_domains).mean()))


@torch.no_grad()
def update_spread(head, hidden: torch.Tensor, conds: torch.Tensor) -> float:
    """sqrt(mean_g ||D_g - mean D||^2) / ||mean D||, D_g = the logits' update on `hidden` for input conds[g]: how far
    the generated adapter moves with its input, relative to its common part (0: one static adapter)."""
    A, B = head.generate_adapter(conds)  # (G, r, d_in), (G, d_out, r)
    deltas = [head.scaling * (hidden @ a.T) @ b.T for a, b in zip(A, B)]
    mean = torch.stack(deltas).mean(0)
    spread = torch.stack([(d - mean).square().sum() for d in deltas]).mean().sqrt()
    return float(spread / mean.norm().clamp(min=1e-30))


@torch.no_grad()
def diagnose(cfg: Config) -> Path:
    """diagnostics.csv and its figure: for every run of `diagnosed_runs`, the geometry of what its hypernetwork reads
    (after cond_norm) and the spread of its generated update across validation k-means groups and across domains."""
    from chameleon.experiments import plots
    from chameleon.backbones import load_backbone
    from chameleon.clustering import incoming_batches
    from chameleon.prepare import prepare
    from chameleon.runs import load_trained, trained_by
    from chameleon.training import scored_rows

    out = folder(cfg)
    model, tokenizer = load_backbone(cfg.backbone, cache_dir=cfg.cache_dir)
    table = []
    for stage, recipe, name, chosen in diagnosed_runs(out):
        run = cfg.replace(seed=0, **ROWS[name].overrides, **chosen)
        if trained_by(run) is not None:  # it evaluates another row's weights: that row is diagnosed
            continue
        adapted = load_trained(run, model)
        train_split, val, _ = prepare(run, model, tokenizer)
        head = adapted.head
        read = {s.name: (s.cond_emb - head.cond_shift) / head.cond_scale for s in (train_split, val)}
        rows = scored_rows(adapted, val, True, run.cache_dir)
        hidden = rows.hidden[torch.arange(min(PROBE_ROWS, len(rows.target)))]
        groups = torch.stack([val.cond_emb[c].mean(0) for _, c in incoming_batches(val, run.batch_size,
                                                                                  run.conditioning, "kmeans")])
        names = sorted(set(val.domains))
        by_domain = torch.stack([val.cond_emb[torch.from_numpy(val.domains == d)].mean(0) for d in names])
        table.append(dict(stage=stage, recipe=recipe, row=name, label=f"{recipe} ({stage})", domains=len(names),
                          **geometry(read["train"], train_split.domains, read["validation"], val.domains),
                          spread_groups=update_spread(head, hidden, groups),
                          spread_domains=update_spread(head, hidden, by_domain)))
    frame = pd.DataFrame(table)
    frame.drop(columns=["label", "domains"]).to_csv(out / "diagnostics.csv", index=False, float_format="%.6g")
    plots.control_diagnostics(frame, cfg.profile)
    return out / "diagnostics.csv"


# ---------------------------------------------------------------------------- batch against line: what each costs

COST_ROWS = ("chameleon_prefix", "chameleon_prefix_line", "chameleon_prefix_line_eval", "lora_experts",
             "lora_experts_line")
TIMED_STEPS = 12  # training batches timed per row (after one warm-up batch)


def costs(cfg: Config) -> Path:
    """costs.csv: per row of COST_ROWS, the head adapters applied per 1,000 validation lines under each batching
    (generated by the hypernetwork, or picked among stored experts), and the head's training step and its
    evaluation per scored row as ratios to the batch-level hypernetwork's, all measured in this one process (run it
    with nothing else running). Weights are freshly initialised: the cost of a step does not depend on them."""
    import time

    from chameleon.adapters.model import build
    from chameleon.backbones import load_backbone
    from chameleon.clustering import ClusterBatchSampler, incoming_batches
    from chameleon.prepare import prepare
    from chameleon.regimes import LEVELS
    from chameleon.runs import trained_by
    from chameleon.training import batch_loss, line_losses, optimizer, scored_rows

    model, tokenizer = load_backbone(cfg.backbone, cache_dir=cfg.cache_dir)
    dev, table = torch.device("cpu"), []
    for name in COST_ROWS:
        run = cfg.replace(seed=0, **ROWS[name].overrides)
        trains = trained_by(run) or run  # the step an evaluation-only row pays is its trained run's
        train_split, val, _ = prepare(run, model, tokenizer)
        adapted = build(trains, model)
        adapted.bind(train_split, val)
        rows = {s.name: scored_rows(adapted, s, True, run.cache_dir) for s in (train_split, val)}
        opt = optimizer(trains, [p for p in adapted.parameters() if p.requires_grad])
        batches = list(ClusterBatchSampler(train_split.labels, run.batch_size, seed=0))[:TIMED_STEPS + 1]
        adapted.train()
        seconds, scored = 0.0, 0
        for i, batch in enumerate(batches):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss, n = batch_loss(adapted, train_split, rows["train"], batch, batch, dev,
                                 LEVELS[trains.cond_level].trains_per_line)
            (loss / n).backward()
            opt.step()
            if i:  # the first batch warms up
                seconds, scored = seconds + time.perf_counter() - t0, scored + n
        adapted = build(run, model)  # the evaluated configuration (a per-line dispatch, cond_level line_eval)
        adapted.bind(train_split, val)
        t0 = time.perf_counter()
        line_losses(adapted, val, rows["validation"], run, dev, "kmeans")
        evaluation = (time.perf_counter() - t0) / len(rows["validation"].target)
        per_line = LEVELS[run.cond_level].evaluates_per_line if adapted.conditioned else \
            adapted.experts is not None and DISPATCHES[run.dispatch].per_line
        applied = {b: 1000 * (len(val) if per_line else len(incoming_batches(val, run.batch_size, run.conditioning, b)))
                   / len(val) for b in BATCHINGS}
        table.append(dict(row=name, **{f"adapters per 1,000 lines ({b})": a for b, a in applied.items()},
                          step_per_row=seconds / scored, eval_per_row=evaluation))
    frame = pd.DataFrame(table)
    ref = frame.set_index("row").loc[COST_ROWS[0]]
    frame["step ratio"] = frame.step_per_row / ref.step_per_row
    frame["eval ratio"] = frame.eval_per_row / ref.eval_per_row
    path = folder(cfg) / "costs.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.drop(columns=["step_per_row", "eval_per_row"]).to_csv(path, index=False, float_format="%.4g")
    return path
