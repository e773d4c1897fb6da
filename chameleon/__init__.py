"""ChamaleonLLM reproducibility kit: batch-aware dynamic low-rank adaptation, reproduced and audited."""
import ctypes
import platform
import sys

from chameleon.config import Config

__all__ = ["Config", "keep_freed_memory"]

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory(keep: bool = True) -> bool:
    """Have glibc keep freed memory in the heap for the next allocation (keep=False: its defaults, 128 KiB).

    By default glibc maps every block above 128 KiB afresh and gives it back when freed, so each of the LM
    head's logits-sized temporaries (443 x 49,152 floats: 87 MB) is page-faulted in again at every step, which
    slows a `lora` step on cached hidden states and more so through the body (the measured ratios: `python -m
    benchmarks.bench_training`, BENCHMARKS.md "Training step"). Called when the kit is imported;
    the cost is that the process's resident memory stays at its peak. Returns False where the C library is
    not glibc (nothing is changed there)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    mmap, trim = (1 << 30, (1 << 31) - 1) if keep else (128 * 1024, 128 * 1024)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap) and libc.mallopt(M_TRIM_THRESHOLD, trim))


keep_freed_memory()
