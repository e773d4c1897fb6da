"""Peak memory of a head-only run (lora, causal, the body's hidden states cached) at a profile's size
(writes benchmarks/results/memory-<profile>.md).

Three fresh processes, each reporting its own peak RSS (ru_maxrss) and the peak of its anonymous memory
(RssAnon, sampled every 5 ms: RSS also counts the file-backed pages of the memory-mapped cache, which the
kernel drops under pressure): one that only loads the backbone and prepares the data (the floor); the run
with no cache yet (the body runs once and its hidden states go to the cache file chunk by chunk); the run
again with the cache in place (the head trains on rows read from the file). The cache is read by rows
(chameleon.cache.RowFile), so the runs' own memory should stay near the floor's however large the cache
file, whose size the report gives beside them. At the hub's size the file holds (scored tokens) x 768 x 4
bytes for GPT-2: about 3 GB per million tokens.

    python -m benchmarks.bench_memory --profile cpu
    python -m benchmarks.bench_memory --profile study
"""
import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.timing import AnonPeak, proc_status, write_report
from chameleon.config import ROOT, Config

OUT = Path(__file__).resolve().parent / "results"


def config(profile: str, data_dir: str, backbone: str | None) -> Config:
    extra = {"backbone": backbone} if backbone else {}
    return Config.from_profile(profile, regime="lora", protocol="causal", data_dir=Path(data_dir),
                               results_dir=Path(data_dir) / "results", **extra)


def child(phase: str, profile: str, data_dir: str, backbone: str | None) -> None:
    """One phase in this process; prints its peak RSS and anonymous memory in MB and the cache file's size as JSON."""
    anon = AnonPeak()
    cfg = config(profile, data_dir, backbone)
    if phase == "floor":
        from chameleon.backbones import load_backbone
        from chameleon.prepare import load_split_texts, prepare

        model, tok = load_backbone(cfg.backbone, seed=cfg.seed, cache_dir=cfg.cache_dir)
        prepare(cfg, model, tok, {s: load_split_texts(cfg, s) for s in ("train", "validation")})
    else:
        from chameleon.training import train

        if phase == "warm":  # the same run again, from scratch, on the cache the cold run wrote
            shutil.rmtree(cfg.results_dir)
        train(cfg, progress=False)
    files = list((cfg.cache_dir / "hidden").glob("*.safetensors"))
    print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KB on Linux
                      "anon_mb": max(anon.peak_kb, proc_status("RssAnon")) / 1024,
                      "cache_mb": sum(f.stat().st_size for f in files) / 2**20}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--backbone", default=None, help="default: the profile's")
    parser.add_argument("--child", nargs=2, metavar=("PHASE", "DATA_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.profile, args.child[1], args.backbone)
        return 0
    data_dir = Path(tempfile.mkdtemp(prefix="bench_memory_"))  # fresh: the hidden-state cache is built here
    models = ROOT / "data" / "cache" / "models"
    (data_dir / "cache").mkdir()
    if models.is_dir():  # the converted backbone is reused: its one-off conversion is not what we measure
        (data_dir / "cache" / "models").symlink_to(models)
    phases = {}
    try:
        for phase in ("floor", "cold", "warm"):
            argv = [sys.executable, "-m", "benchmarks.bench_memory", "--profile", args.profile,
                    "--child", phase, str(data_dir)] + (["--backbone", args.backbone] if args.backbone else [])
            done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                                  env={**os.environ, "TQDM_DISABLE": "1"})
            if done.returncode:
                print(done.stderr, file=sys.stderr)
                return done.returncode
            phases[phase] = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(data_dir)
    cfg = config(args.profile, str(data_dir), args.backbone)
    lines = [f"# Peak memory of a head-only run, `{args.profile}` profile",
             "", f"{datetime.date.today()}, {platform.processor() or platform.machine()}, Python "
             f"{platform.python_version()}; `python -m benchmarks.bench_memory --profile {args.profile}`"
             + (f" --backbone {args.backbone}" if args.backbone else ""),
             "", f"lora, causal, {cfg.backbone}, {cfg.max_train_examples} train / {cfg.max_eval_examples} validation "
             f"examples of {cfg.max_length} tokens, batch {cfg.batch_size}, {cfg.epochs} epochs.",
             "", "| process | peak RSS (MB) | peak anonymous memory (MB) | hidden-state cache on disk (MB) |",
             "|---|---|---|---|",
             *[f"| {name} | {p['peak_mb']:.0f} | {p['anon_mb']:.0f} | {p['cache_mb']:.1f} |" for name, p in (
                 ("backbone + data only (floor)", phases["floor"]), ("run, cache written", phases["cold"]),
                 ("run, cache read", phases["warm"]))]]
    write_report(OUT / f"memory-{args.profile}.md", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
