"""Every regime under both protocols, side by side with the paper's table.

    table = compare(Config.from_profile("cpu"), seeds=3)   # also written as CSV and Markdown
"""
from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd

from chameleon.backbones import load_backbone
from chameleon.config import PROTOCOLS, Config
from chameleon.model import build, svf_parameters
from chameleon.regimes import REGIMES
from chameleon.runs import METRICS, result_row
from chameleon.training import train

# The paper's WikiText-2 table (GPT-2 124M, rank 4): parameters, validation loss and perplexity.
PAPER_TABLE = pd.DataFrame([
    {"regime": "unadapted", "trainable_params": 124_439_808, "val_loss": 10.2513, "val_ppl": 28_319},
    {"regime": "lora", "trainable_params": 204_100, "val_loss": 1.3528, "val_ppl": 3.8683},
    {"regime": "chameleon", "trainable_params": 6_786_596, "val_loss": 0.3753, "val_ppl": 1.4554},
])

# (regime, conditioning) pairs of a comparison: every regime, and the conditioning controls. For the SVF
# experts (Transformer²) the second element is the dispatch instead (`Config.dispatch`); `svf` reads neither.
RUNS = {
    "lm": [("unadapted", "batch_mean"), ("lora", "batch_mean"), ("lora_matched", "batch_mean"),
           ("chameleon", "batch_mean"), ("chameleon", "prefix"), ("chameleon", "shuffled"),
           ("lora_full", "batch_mean"), ("chameleon_full", "batch_mean"),
           ("svf", "batch_mean"), ("svf_experts", "oracle"), ("svf_experts", "classifier"), ("svf_experts", "cem")],
    "instructions": [("unadapted", "task"), ("lora", "task"), ("lora_matched", "task"), ("chameleon", "task"),
                     ("chameleon", "task_input"), ("chameleon", "batch_mean"), ("chameleon", "shuffled"),
                     ("svf", "task"), ("svf_experts", "oracle"), ("svf_experts", "classifier")],
}
SVF_RUNS = {task: [r for r in runs if REGIMES[r[0]].blocks == "svf"] for task, runs in RUNS.items()}
# Conditioning only matters to the hypernetwork; other regimes are labelled "-" in tables (regimes.conditioning_label).
KEYS = ["regime", "protocol", "conditioning"]


def compare(cfg: Config, seeds: int = 1, runs: list[tuple[str, str]] | None = None,
            protocols: tuple[str, ...] = PROTOCOLS, progress: bool = True, stem: str | None = None,
            command: str | None = None) -> pd.DataFrame:
    """Train every (regime, conditioning) of `runs` under each protocol for seeds cfg.seed ...
    cfg.seed + seeds - 1, and write the per-run rows and the summary table.

    stem names the files (default compare-seeds<N>: give another one for a subset of the runs, so the
    full table is not overwritten); command is what the Markdown file says produced it.

    Returns the summary: one row per regime x protocol x conditioning with the mean and the
    standard deviation over seeds.
    """
    rows = []
    for protocol in protocols:
        for regime, conditioning in runs or RUNS[cfg.task]:
            setting = {"dispatch": conditioning} if REGIMES[regime].experts else {"conditioning": conditioning}
            for seed in range(cfg.seed, cfg.seed + seeds):
                run = cfg.replace(regime=regime, protocol=protocol, seed=seed, **setting)
                rows.append(result_row(train(run, progress=progress)))
    per_run = pd.DataFrame(rows)
    table = summarise(per_run)
    out = Path(cfg.results_dir) / cfg.profile / cfg.task
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or f"compare-seeds{seeds}"
    per_run.to_csv(out / f"{stem}-runs.csv", index=False)
    table.to_csv(out / f"{stem}.csv", index=False)
    command = command or f"python -m chameleon compare --profile {cfg.profile} --task {cfg.task} --seeds {seeds}"
    (out / f"{stem}.md").write_text(
        f"Produced by `{command}`: mean ± standard deviation over seeds {cfg.seed}..{cfg.seed + seeds - 1}; "
        f"seconds = training wall time on the machine that ran it.\n\n{to_markdown(table)}\n")
    return table


def summary(runs: list[dict]) -> pd.DataFrame:
    """`summarise` of finished runs (runs.finished_runs): mean and std per regime x protocol x conditioning."""
    per_run = pd.DataFrame([result_row(r) for r in runs])
    return per_run if per_run.empty else summarise(per_run)


def summarise(per_run: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds, in the order the runs were made."""
    metrics = [c for c in METRICS if c in per_run]
    grouped = per_run.groupby(KEYS, sort=False)
    table = grouped.agg(trainable_params=("trainable_params", "first"), seeds=("seed", "count"),
                        **{m: (m, "mean") for m in metrics}, **{f"{m}_std": (m, "std") for m in metrics})
    return table.reset_index()


def to_markdown(table: pd.DataFrame, digits: int = 4) -> str:
    """A Markdown table; "mean ± std" where there is more than one seed."""
    metrics = [c for c in METRICS if c in table]
    header = KEYS + ["trainable params"] + [m.replace("_", " ") for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        cells = [str(row[k]) for k in KEYS] + [f"{int(row['trainable_params']):,}"]
        for m in metrics:
            std = row.get(f"{m}_std")
            cells.append(f"{row[m]:.{digits}g}" + (f" ± {std:.2g}" if row["seeds"] > 1 and pd.notna(std) else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parameter_table(cfg: Config) -> pd.DataFrame:
    """Trainable parameters of every regime on cfg.backbone (no training): the paper's counts
    on "gpt2-arch" at rank 4 are 124,439,808 (unadapted, total), 204,100 and 6,786,596."""
    model, _ = load_backbone(cfg.backbone, seed=cfg.seed, cache_dir=cfg.cache_dir)
    rows = []
    for name, regime in REGIMES.items():
        # only regimes that adapt the blocks change the backbone itself: they get a copy
        if regime.blocks == "svf":  # counted without the SVD: z has min(out, in) entries per matrix, per expert
            count = (cfg.n_experts if regime.experts else 1) * svf_parameters(model)
        else:
            count = build(cfg.replace(regime=name), model if regime.frozen_body else copy.deepcopy(model)).trainable()
        rows.append({"regime": name, "trainable_params": count})
    return pd.DataFrame(rows)
