"""The experiment plans (which runs make which table: RUNS, SVF_RUNS, PAPER_LENGTH_RUNS, HEAD_RUNS,
beside the paper's table) and the functions that run them; chameleon.experiments.report summarises and writes
the tables.

    table = compare(Config.from_profile("cpu"), seeds=3)   # also written as CSV and Markdown
"""
from __future__ import annotations

import copy

import pandas as pd

from chameleon.backbones import load_backbone
from chameleon.config import Config
from chameleon.adapters.model import build, svf_parameters
from chameleon.regimes import CONDITIONINGS, PROTOCOLS, REGIMES
from chameleon.experiments.report import KEYS, paired_differences, summarise, write_tables
from chameleon.runs import result_row, run_name
from chameleon.experiments.sweeps import execute, steps

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
SVF_RUNS = {task: [r for r in runs if REGIMES[r[0]].svf_blocks] for task, runs in RUNS.items()}
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


def compare(cfg: Config, seeds: int = 1, runs: list[tuple[str, str]] | None = None,
            protocols: tuple[str, ...] = tuple(PROTOCOLS), progress: bool = True, stem: str | None = None,
            command: str | None = None, engine: str = "local") -> pd.DataFrame:
    """Train every (regime, conditioning) of `runs` under each protocol for seeds cfg.seed ...
    cfg.seed + seeds - 1, and write the per-run rows and the summary table.

    stem names the files (default compare-seeds<N>: give another one for a subset of the runs, so the
    full table is not overwritten); command is what the Markdown file says produced it; engine runs the
    runs here one after the other ("local") or as Ray tasks ("ray": chameleon.experiments.sweeps).

    Where `runs` has a `prefix` row, the head-only baselines without a hypernetwork are also run
    with score_from = prefix_tokens (causal protocol; under "authors" every run scores the last
    position anyway), so that the prefix row stands beside baselines scored on the same tokens.

    Returns the summary: one row per regime x protocol x conditioning x scored with the mean and
    the standard deviation over seeds.
    """
    per_run = run_rows(cfg, seeds, runs or RUNS[cfg.task], protocols, progress, engine)
    table = summarise(per_run)
    command = command or f"python -m chameleon compare --profile {cfg.profile} --task {cfg.task} --seeds {seeds}"
    write_tables(cfg, stem or f"compare-seeds{seeds}", per_run, table, command, seeds)
    return table


def table_runs(cfg: Config, seeds: int, runs: list[tuple[str, str]], protocols: tuple[str, ...]) -> list[Config]:
    """The runs whose rows make a table (see `compare`), in the table's order, baselines on the prefix's tokens
    included; the runs they need are not listed (sweeps.steps adds them)."""
    configs = []
    for protocol in protocols:
        todo = [(regime, conditioning, 0) for regime, conditioning in runs]
        if PROTOCOLS[protocol].scores_every_token and any(c in CONDITIONINGS and CONDITIONINGS[c].prefix for _, c in runs):
            todo += [(regime, conditioning, cfg.prefix_tokens) for regime, conditioning in runs
                     if REGIMES[regime].frozen_body and not REGIMES[regime].conditioned]
        for regime, conditioning, score_from in todo:
            setting = {"dispatch": conditioning} if REGIMES[regime].experts else {"conditioning": conditioning}
            configs += [cfg.replace(regime=regime, protocol=protocol, seed=seed, score_from=score_from, **setting)
                        for seed in range(cfg.seed, cfg.seed + seeds)]
    return configs


def run_rows(cfg: Config, seeds: int, runs: list[tuple[str, str]], protocols: tuple[str, ...],
             progress: bool = True, engine: str = "local") -> pd.DataFrame:
    """One result row per run (see `compare`), baselines on the prefix's tokens included."""
    return rows(table_runs(cfg, seeds, runs, protocols), progress, engine)


def rows(configs: list[Config], progress: bool = True, engine: str = "local") -> pd.DataFrame:
    """Train the runs `configs` (and those they need, first; finished ones are read back): one row each."""
    results = execute(steps(configs), engine, progress)
    return pd.DataFrame([result_row(results[run_name(c)]) for c in configs])


def experiment_runs(cfg: Config, experiment: str, seeds: int, lengths: tuple[int, ...] = (160, 256)) -> list[Config]:
    """The runs whose rows make an experiment's table (`compare --experiment`; paper-length: at each of `lengths`)."""
    if experiment == "paper-length":
        return [c for length in lengths for c in table_runs(cfg.replace(max_length=length), seeds, PAPER_LENGTH_RUNS,
                                                            ("authors",))]
    runs, protocols = {"all": (RUNS[cfg.task], tuple(PROTOCOLS)), "svf": (SVF_RUNS[cfg.task], tuple(PROTOCOLS)),
                       "heads": (HEAD_RUNS, ("causal",))}[experiment]
    return table_runs(cfg, seeds, runs, protocols)


def _command(cfg: Config, experiment: str, seeds: int) -> str:
    """The command line that reproduces cfg's experiment: the profile and every field changed from it."""
    base = Config.from_profile(cfg.profile, task=cfg.task).to_dict()
    changed = "".join(f" --{k.replace('_', '-')} {v}" for k, v in cfg.to_dict().items()
                      if v != base[k] and k not in ("data_dir", "results_dir", "device"))
    return (f"python -m chameleon compare --profile {cfg.profile} --task {cfg.task} --experiment {experiment} "
            f"--seeds {seeds}{changed}")


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
                 progress: bool = True, engine: str = "local") -> pd.DataFrame:
    """The head-only regimes and the conditioning controls under the authors' protocol at the paper's
    max_length (256) and at the length where the embedded corpus's padded share matches
    WikiText-2's at 256 (160: ~94% with GPT-2's tokenizer), with the loss split by target kind.
    Writes results/<profile>/<task>/paper-length-seeds<S>.md / .csv (+ -runs.csv, -shares.csv).
    Only the last position is scored, so the body runs once per length (hidden-state cache)."""
    frames = []
    for length in lengths:
        per = rows(experiment_runs(cfg, "paper-length", seeds, (length,)), progress, engine)
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
    shares.to_csv(write_tables(cfg, name, per_run, table, command, seeds, extra).parent / f"{name}-shares.csv", index=False)
    return table


def heads(cfg: Config, seeds: int = 3, progress: bool = True, engine: str = "local") -> pd.DataFrame:
    """The head-only regimes under the causal protocol (HEAD_RUNS, with baselines on the prefix's
    tokens) and their paired per-seed differences against `lora_matched` and against the
    `shuffled` control, 95% t-intervals. Writes heads-seeds<S>.md / .csv, -runs.csv, -paired.csv."""
    if seeds < 2:  # checked before any training
        raise ValueError(f"the heads experiment pairs each regime with its references over seeds, which takes 2 or "
                         f"more: --seeds {seeds} gives no interval (the committed tables use --seeds 3)")
    per_run = rows(experiment_runs(cfg, "heads", seeds), progress, engine)
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
    paired.to_csv(write_tables(cfg, name, per_run, table, command, seeds, extra).parent / f"{name}-paired.csv", index=False)
    return table


def parameter_table(cfg: Config) -> pd.DataFrame:
    """Trainable parameters of every regime on cfg.backbone (no training): the paper's counts
    on "gpt2-arch" at rank 4 are 124,439,808 (unadapted, total), 204,100 and 6,786,596."""
    model, _ = load_backbone(cfg.backbone, seed=cfg.seed, cache_dir=cfg.cache_dir)
    rows = []
    for name, regime in REGIMES.items():
        # only regimes that adapt the blocks change the backbone itself: they get a copy
        if regime.svf_blocks:  # counted without the SVD: z has min(out, in) entries per matrix, per expert
            count = (cfg.n_experts if regime.experts_in_blocks else 1) * svf_parameters(model)
        else:
            count = build(cfg.replace(regime=name), model if regime.frozen_body else copy.deepcopy(model)).trainable()
        rows.append({"regime": name, "trainable_params": count})
    return pd.DataFrame(rows)
