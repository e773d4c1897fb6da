"""Every regime under both protocols, side by side with the paper's table.

    table = compare(Config.from_profile("cpu"), seeds=3)   # also written as CSV and Markdown
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pandas as pd
from scipy import stats

from chameleon.backbones import load_backbone
from chameleon.config import Config
from chameleon.model import build, svf_parameters
from chameleon.regimes import CONDITIONINGS, PROTOCOLS, REGIMES
from chameleon.runs import METRICS, plan, result_row, results_folder
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
           ("svf", "batch_mean"), ("svf_experts", "oracle"), ("svf_experts", "classifier"), ("svf_experts", "cem"),
           ("lora_experts", "oracle"), ("lora_experts", "classifier")],
    "instructions": [("unadapted", "task"), ("lora", "task"), ("lora_matched", "task"), ("chameleon", "task"),
                     ("chameleon", "task_input"), ("chameleon", "batch_mean"), ("chameleon", "shuffled"),
                     ("svf", "task"), ("svf_experts", "oracle"), ("svf_experts", "classifier")],
}
SVF_RUNS = {task: [r for r in runs if REGIMES[r[0]].blocks == "svf"] for task, runs in RUNS.items()}
# The paper's length under the authors' protocol (compare --experiment paper-length): head-only regimes,
# where the paper's own "LoRA" and "ChamaleonLLM" were, with the conditioning controls.
PAPER_LENGTH_RUNS = [("unadapted", "batch_mean"), ("lora", "batch_mean"), ("lora_matched", "batch_mean"),
                     ("chameleon", "batch_mean"), ("chameleon", "shuffled"), ("chameleon", "prefix"),
                     ("chameleon", "batch_mean_excl")]
# Share of WikiText-2 lines (non-empty, GPT-2 tokenizer) shorter than 256 tokens: the paper's p_pad (issue 10).
WIKITEXT2_PAD_SHARE_256 = 0.94
# Does batch-aware adaptation help? (compare --experiment heads, the `study` profile): causal protocol.
HEAD_RUNS = [("unadapted", "batch_mean"), ("lora", "batch_mean"), ("lora_matched", "batch_mean"),
             ("chameleon", "batch_mean"), ("chameleon", "shuffled"), ("chameleon", "prefix")]
# Conditioning only matters to the hypernetwork; other regimes are labelled "-" in tables (regimes.conditioning_label).
# `scored`: which positions count ("last" under the authors' protocol, "all", or "from P", see runs.scored_label).
KEYS = ["regime", "protocol", "conditioning", "scored"]


def compare(cfg: Config, seeds: int = 1, runs: list[tuple[str, str]] | None = None,
            protocols: tuple[str, ...] = tuple(PROTOCOLS), progress: bool = True, stem: str | None = None,
            command: str | None = None) -> pd.DataFrame:
    """Train every (regime, conditioning) of `runs` under each protocol for seeds cfg.seed ...
    cfg.seed + seeds - 1, and write the per-run rows and the summary table.

    stem names the files (default compare-seeds<N>: give another one for a subset of the runs, so the
    full table is not overwritten); command is what the Markdown file says produced it.

    Where `runs` has a `prefix` row, the head-only baselines without a hypernetwork are also run
    with score_from = prefix_tokens (causal protocol; under "authors" every run scores the last
    position anyway), so that the prefix row stands beside baselines scored on the same tokens.

    Returns the summary: one row per regime x protocol x conditioning x scored with the mean and
    the standard deviation over seeds.
    """
    per_run = run_rows(cfg, seeds, runs or RUNS[cfg.task], protocols, progress)
    table = summarise(per_run)
    command = command or f"python -m chameleon compare --profile {cfg.profile} --task {cfg.task} --seeds {seeds}"
    _write(cfg, stem or f"compare-seeds{seeds}", per_run, table, command, seeds)
    return table


def run_rows(cfg: Config, seeds: int, runs: list[tuple[str, str]], protocols: tuple[str, ...],
             progress: bool = True) -> pd.DataFrame:
    """One result row per run (see `compare`), baselines on the prefix's tokens included."""
    rows = []
    for protocol in protocols:
        todo = [(regime, conditioning, 0) for regime, conditioning in runs]
        if PROTOCOLS[protocol].scores == "all" and any(c in CONDITIONINGS and CONDITIONINGS[c].prefix for _, c in runs):
            todo += [(regime, conditioning, cfg.prefix_tokens) for regime, conditioning in runs
                     if REGIMES[regime].frozen_body and not REGIMES[regime].conditioned]
        for regime, conditioning, score_from in todo:
            setting = {"dispatch": conditioning} if REGIMES[regime].experts else {"conditioning": conditioning}
            for seed in range(cfg.seed, cfg.seed + seeds):
                run = cfg.replace(regime=regime, protocol=protocol, seed=seed, score_from=score_from, **setting)
                for step in plan(run):  # the runs it depends on first (finished ones are read back)
                    result = train(step, progress=progress)
                rows.append(result_row(result))
    return pd.DataFrame(rows)


def _command(cfg: Config, experiment: str, seeds: int) -> str:
    """The command line that reproduces cfg's experiment: the profile and every field changed from it."""
    base = Config.from_profile(cfg.profile, task=cfg.task).to_dict()
    changed = "".join(f" --{k.replace('_', '-')} {v}" for k, v in cfg.to_dict().items()
                      if v != base[k] and k not in ("data_dir", "results_dir", "device"))
    return (f"python -m chameleon compare --profile {cfg.profile} --task {cfg.task} --experiment {experiment} "
            f"--seeds {seeds}{changed}")


def _write(cfg: Config, name: str, per_run: pd.DataFrame, table: pd.DataFrame, command: str, seeds: int,
           extra: str = "") -> Path:
    out = results_folder(cfg)
    out.mkdir(parents=True, exist_ok=True)
    per_run.to_csv(out / f"{name}-runs.csv", index=False)
    table.to_csv(out / f"{name}.csv", index=False)
    (out / f"{name}.md").write_text(
        f"Produced by `{command}`: mean ± standard deviation over seeds {cfg.seed}..{cfg.seed + seeds - 1}; "
        f"seconds = training wall time on the machine that ran it.\n\n{to_markdown(table)}\n{extra}")
    return out / f"{name}.md"


def padded_shares(cfg: Config, lengths: tuple[int, ...] = (32, 64, 96, 128, 160, 192, 256)) -> pd.DataFrame:
    """Share of lines shorter than L tokens (so padded at position L, the one the authors' protocol
    scores), with the SmolLM2 tokenizer and with GPT-2's, on every line of cfg.corpus's train and
    validation splits and on the profile's subsample (what the runs see)."""
    from chameleon.backbones import gpt2_tokenizer
    from chameleon.data import load_lm_corpus
    from chameleon.prepare import load_split_texts

    _, smollm2 = load_backbone("smollm2", cache_dir=cfg.cache_dir)
    corpus = load_lm_corpus(cfg.corpus)
    texts = {"corpus": [t for s in ("train", "validation") for t in corpus[s]["text"]],
             "subsample": [t for s in ("train", "validation") for t in load_split_texts(cfg, s)["full"]]}
    rows = []
    for name, tokenizer in (("smollm2", smollm2), ("gpt2", gpt2_tokenizer())):
        for which, lines in texts.items():
            n = [len(ids) for ids in tokenizer(lines)["input_ids"]]
            n = [k for k in n if k >= 2]  # the kit drops lines with nothing to predict (prepare.drop_short)
            rows += [{"tokenizer": name, "lines": which, "n_lines": len(n), "length": L,
                      "padded_share": sum(k < L for k in n) / len(n)} for L in lengths]
    return pd.DataFrame(rows)


def paper_length(cfg: Config, lengths: tuple[int, ...] = (160, 256), seeds: int = 3,
                 progress: bool = True) -> pd.DataFrame:
    """The head-only regimes and the conditioning controls under the authors' protocol at the paper's
    max_length (256) and at the length where the embedded corpus's padded share matches
    WikiText-2's at 256 (160: ~94% with GPT-2's tokenizer), with the loss split by target kind.
    Writes results/<profile>/<task>/paper-length-seeds<S>.md / .csv (+ -runs.csv, -shares.csv).
    Only the last position is scored, so the body runs once per length (hidden-state cache)."""
    frames = []
    for length in lengths:
        per = run_rows(cfg.replace(max_length=length), seeds, PAPER_LENGTH_RUNS, ("authors",), progress)
        per.insert(4, "max_length", length)
        frames.append(per)
    per_run = pd.concat(frames, ignore_index=True)
    table = summarise(per_run, KEYS + ["max_length"])
    shares = padded_shares(cfg)
    name = f"paper-length-seeds{seeds}"
    wide = shares.pivot_table(index="length", columns=["tokenizer", "lines"], values="padded_share")
    wide.columns = [f"{t} ({w})" for t, w in wide.columns]
    extra = ("\nShare of lines shorter than L tokens (padded at the scored position), lines of under 2 tokens "
             f"dropped as the kit drops them; `subsample`: the {cfg.profile} profile's train + validation lines:\n\n"
             + wide.to_markdown(floatfmt=".4f") + "\n")
    p_gpt2 = float(shares.query("tokenizer == 'gpt2' and lines == 'corpus' and length == 256").padded_share.iloc[0])
    mix = table.dropna(subset=["val_loss_pad", "val_loss_real"])
    if len(mix):
        arithmetic = pd.DataFrame({"regime": mix.regime, "conditioning": mix.conditioning, "max_length": mix.max_length,
                                   "L_pad": mix.val_loss_pad, "L_real": mix.val_loss_real,
                                   **{f"loss at p_pad={p:.4f}": p * mix.val_loss_pad + (1 - p) * mix.val_loss_real
                                      for p in (p_gpt2, WIKITEXT2_PAD_SHARE_256)}})
        extra += ("\nThe paper's arithmetic, loss = p_pad * L_pad + (1 - p_pad) * L_real, with the per-kind losses "
                  f"measured here (means over seeds) and p_pad = {p_gpt2:.4f} (this corpus at 256 tokens, GPT-2's "
                  f"tokenizer, measured above) or {WIKITEXT2_PAD_SHARE_256} (WikiText-2 at 256 tokens, GPT-2's "
                  "tokenizer: ~94% of non-empty lines are shorter, as measured for issue 10; not re-measured here, "
                  "the hub is unreachable):\n\n" + arithmetic.to_markdown(index=False, floatfmt=".4f") + "\n")
    command = _command(cfg, "paper-length", seeds) + ("" if tuple(lengths) == (160, 256) else
                                                      f" --lengths {','.join(map(str, lengths))}")
    shares.to_csv(_write(cfg, name, per_run, table, command, seeds, extra).parent / f"{name}-shares.csv", index=False)
    return table


def heads(cfg: Config, seeds: int = 3, progress: bool = True) -> pd.DataFrame:
    """The head-only regimes under the causal protocol (HEAD_RUNS, with baselines on the prefix's
    tokens) and their paired per-seed differences against `lora_matched` and against the
    `shuffled` control, 95% t-intervals. Writes heads-seeds<S>.md / .csv, -runs.csv, -paired.csv."""
    per_run = run_rows(cfg, seeds, HEAD_RUNS, ("causal",), progress)
    table = summarise(per_run)
    paired = pd.concat([paired_differences(per_run, {"regime": "lora_matched"}),
                        paired_differences(per_run, {"regime": "chameleon", "conditioning": "shuffled"})],
                       ignore_index=True)
    name = f"heads-seeds{seeds}"
    show = paired.assign(**{c: paired[c].map(lambda v: f"{v:+.4f}") for c in ("difference", "low", "high")})
    extra = ("\nPaired differences of val loss (run - reference, per seed, same seeds and scored tokens) "
             "with 95% t-intervals over the seeds; significant: the interval excludes 0 (negative = lower "
             "loss than the reference):\n\n" + show.to_markdown(index=False) + "\n")
    command = _command(cfg, "heads", seeds)
    paired.to_csv(_write(cfg, name, per_run, table, command, seeds, extra).parent / f"{name}-paired.csv", index=False)
    return table


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
        n, mean = len(diff), float(diff.mean())
        sd = float(diff.std(ddof=1))
        half = float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
        rows.append({**dict(zip(keys, key)), "reference": " / ".join(str(v) for v in reference.values()),
                     "seeds": n, "difference": mean, "low": mean - half, "high": mean + half,
                     "per_seed": " ".join(f"{d:+.4f}" for d in diff), "significant": bool(mean - half > 0 or mean + half < 0)})
    return pd.DataFrame(rows)


def parameter_table(cfg: Config) -> pd.DataFrame:
    """Trainable parameters of every regime on cfg.backbone (no training): the paper's counts
    on "gpt2-arch" at rank 4 are 124,439,808 (unadapted, total), 204,100 and 6,786,596."""
    model, _ = load_backbone(cfg.backbone, seed=cfg.seed, cache_dir=cfg.cache_dir)
    rows = []
    for name, regime in REGIMES.items():
        # only regimes that adapt the blocks change the backbone itself: they get a copy
        if regime.blocks == "svf":  # counted without the SVD: z has min(out, in) entries per matrix, per expert
            count = (cfg.n_experts if regime.experts == "blocks" else 1) * svf_parameters(model)
        else:
            count = build(cfg.replace(regime=name), model if regime.frozen_body else copy.deepcopy(model)).trainable()
        rows.append({"regime": name, "trainable_params": count})
    return pd.DataFrame(rows)
