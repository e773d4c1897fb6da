"""The reporting of the experiments (chameleon.experiments.compare runs them): the summary table of runs over
seeds, its Markdown, paired per-seed differences with t-intervals, and the files a comparison writes.

    table = summarise(per_run)                 # per_run: one row per run (runs.result_row)
    print(to_markdown(table))
    paired_differences(per_run, {"regime": "lora_matched"})
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from chameleon.config import Config
from chameleon.experiments.stats import t_interval
from chameleon.runs import METRICS, result_row, results_folder

# Conditioning only matters to the hypernetwork; other regimes are labelled "-" in tables (regimes.conditioning_label).
# `scored`: which positions count ("last" under the authors' protocol, "all", or "from P", see runs.scored_label).
KEYS = ["regime", "protocol", "conditioning", "scored"]


def summary(runs: list[dict]) -> pd.DataFrame:
    """`summarise` of finished runs (runs.finished_runs): mean and std per regime x protocol x conditioning."""
    per_run = pd.DataFrame([result_row(r) for r in runs])
    return per_run if per_run.empty else summarise(per_run)

def summarise(per_run: pd.DataFrame, keys: list[str] = KEYS) -> pd.DataFrame:
    """Mean and standard deviation over seeds, in the order the runs were made."""
    metrics = [c for c in METRICS if c in per_run]
    keys = [k for k in keys if k in per_run]
    grouped = per_run.groupby(keys, sort=False, dropna=False)
    table = grouped.agg(trainable_params=("trainable_params", "first"), seeds=("seed", "count"),
                        **{m: (m, "mean") for m in metrics}, **{f"{m}_std": (m, "std") for m in metrics})
    return table.reset_index()

def to_markdown(table: pd.DataFrame, digits: int = 4) -> str:
    """A Markdown table; "mean ± std" where there is more than one seed; "-" where a metric does
    not apply (e.g. the loss on pad targets where none is scored)."""
    metrics = [c for c in METRICS if c in table]
    keys = [k for k in table.columns if k not in metrics and k not in ("trainable_params", "seeds")
            and not k.endswith("_std")]
    header = keys + ["trainable params"] + [m.replace("_", " ") for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        cells = [str(row[k]) for k in keys] + [f"{int(row['trainable_params']):,}"]
        for m in metrics:
            std = row.get(f"{m}_std")
            if pd.isna(row[m]):
                cells.append("-")
                continue
            cells.append(f"{row[m]:.{digits}g}" + (f" ± {std:.2g}" if row["seeds"] > 1 and pd.notna(std) else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

def paired_differences(per_run: pd.DataFrame, reference: dict, metric: str = "val_loss",
                       level: float = 0.95) -> pd.DataFrame:
    """Per-seed differences of every run group against a reference group, with a t-interval.

    Runs are paired by seed within the same protocol and scored positions (and max_length, when
    present): difference = metric(run) - metric(reference), one per seed; the interval is
    mean ± t_{(1+level)/2, n-1} * sd / sqrt(n). A difference is `significant` when the interval
    excludes 0. Groups without a reference run on the same seeds are left out.

    Args:
        per_run: one row per run (compare's *-runs.csv): KEYS, seed and the metric.
        reference: the reference group, e.g. {"regime": "lora_matched"} or
            {"regime": "chameleon", "conditioning": "shuffled"}.
    """
    strata = [k for k in ("protocol", "scored", "max_length") if k in per_run]
    keys = [k for k in KEYS + ["max_length"] if k in per_run]
    is_ref = pd.Series(True, index=per_run.index)
    for k, v in reference.items():
        is_ref &= per_run[k] == v
    ref = per_run[is_ref].set_index(strata + ["seed"])[metric]
    rows = []
    for key, group in per_run[~is_ref].groupby(keys, sort=False, dropna=False):
        group = group.set_index(strata + ["seed"])[metric]
        paired = group.index.intersection(ref.index)
        if len(paired) < 2:
            continue
        diff = (group[paired] - ref[paired]).to_numpy(dtype=float)
        mean, low, high, _ = t_interval(diff, level)
        rows.append({**dict(zip(keys, key)), "reference": " / ".join(str(v) for v in reference.values()),
                     "seeds": len(diff), "difference": mean, "low": low, "high": high,
                     "per_seed": " ".join(f"{d:+.4f}" for d in diff), "significant": bool(low > 0 or high < 0)})
    return pd.DataFrame(rows)

def write_tables(cfg: Config, name: str, per_run: pd.DataFrame, table: pd.DataFrame, command: str, seeds: int,
           extra: str = "") -> Path:
    out = results_folder(cfg)
    out.mkdir(parents=True, exist_ok=True)
    per_run.to_csv(out / f"{name}-runs.csv", index=False)
    table.to_csv(out / f"{name}.csv", index=False)
    (out / f"{name}.md").write_text(
        f"Produced by `{command}`: mean ± standard deviation over seeds {cfg.seed}..{cfg.seed + seeds - 1}; "
        f"seconds = training wall time on the machine that ran it.\n\n{to_markdown(table)}\n{extra}")
    return out / f"{name}.md"
