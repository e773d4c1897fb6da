"""What every benchmark shares: interleaved timing, the memory bandwidth and /proc readings it is judged by, the report."""
from __future__ import annotations

import re
import statistics
import threading
import time
from pathlib import Path

import torch


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


# Memory traffic that no implementation of an AdamW step avoids, in passes over its float32 parameters: it reads them
# and its two moments and writes the three back. The forward, the backward and the gradient are counted as free.
ADAMW_PASSES = 6


def memory_bandwidth(mb: int = 512, repeats: int = 9) -> float:
    """Bytes per second that a copy between two float32 buffers far larger than the cache moves (read and write
    counted): what one pass over tensors that cannot stay cached gets here, measured in the benchmark's own run."""
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / interleaved({"copy": lambda: dst.copy_(src)}, repeats, warmup=True)["copy"]


def adamw_floor(n_params: int) -> tuple[float, str]:
    """The least seconds an AdamW step over n float32 parameters takes here (ADAMW_PASSES at the bandwidth measured
    now; it binds where the 3 x 4n bytes of state do not stay cached between steps, as beside a 49k-vocabulary
    head), and a sentence saying how it was computed."""
    bandwidth, mb = memory_bandwidth(), 4 * n_params / 1e6
    seconds = ADAMW_PASSES * 4 * n_params / bandwidth
    return seconds, (f"{n_params:,} float32 parameters ({mb:.1f} MB); AdamW reads them and its two moments and writes "
                     f"the three back, {ADAMW_PASSES} passes or {ADAMW_PASSES * mb:.0f} MB (the forward, the backward "
                     f"and the gradient counted free); at the {bandwidth / 1e9:.1f} GB/s of a 512 MB copy in this run, "
                     f"{seconds * 1e3:.1f} ms")


def proc_status(key: str) -> int:
    """kB of a field of /proc/self/status (VmRSS, VmHWM, RssAnon, ...); Linux only."""
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


class AnonPeak(threading.Thread):
    """The largest RssAnon seen, sampled every `every` seconds while the process works: its own memory, without
    file-backed pages such as those of a memory-mapped cache, which RSS and its peak count alike (Linux keeps a
    peak of the whole resident size only). A peak shorter than `every` can be missed."""

    def __init__(self, every: float = 0.005):
        super().__init__(daemon=True)
        self.every, self.peak_kb = every, proc_status("RssAnon")
        self.start()

    def run(self) -> None:
        while True:
            self.peak_kb = max(self.peak_kb, proc_status("RssAnon"))
            time.sleep(self.every)


def verdict(checks: dict[str, bool]) -> str:
    """A report's last line: PASS when every check held, and each check's own answer."""
    answers = "; ".join(f"{what}: {'yes' if held else 'no'}" for what, held in checks.items())
    return f"Result: {'PASS' if all(checks.values()) else 'FAIL'} ({answers})."


def write_report(out: Path, lines: list[str]) -> None:
    """Write the markdown report (benchmarks/results/<name>.md) and show it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
