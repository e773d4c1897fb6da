"""What every benchmark shares: interleaved timing and writing its report."""
from __future__ import annotations

import statistics
import time
from pathlib import Path


def interleaved(fns: dict, repeats: int, warmup: bool = False) -> dict:
    """Median seconds of each callable, run A B C A B C ... so that a change of machine load hits
    every variant alike (after one untimed warm-up call each if `warmup`)."""
    times = {name: [] for name in fns}
    for r in range(repeats + warmup):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r or not warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def write_report(out: Path, lines: list[str]) -> None:
    """Write the markdown report (benchmarks/results/<name>.md) and show it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
