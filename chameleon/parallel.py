"""One run on several processes, data parallel: `accelerate launch -m chameleon train ...` or torchrun.

Every process builds the same model (the seed) and the same epoch of cluster batches; an optimizer step
takes the next processes x cfg.accumulate batches, each process its own consecutive share of whole
one-cluster batches, and their gradients are summed (`sum_step`), so that a step equals one process
accumulating the same batches. Evaluation splits the batches among the processes and sums their loss
sums (`all_sum`); the main process alone writes the run's files (`main_writes`).

Without a launcher (WORLD_SIZE unset) nothing here runs a collective or starts accelerate: a plain
`python -m chameleon train` computes exactly what it did before this module existed.

accelerate's process state (PartialState) starts the process group, picks each process's device and
runs the collectives. Its `Accelerator` adds what the kit does not use: `prepare` wraps a module in
DDP, whose gradient hooks fire from forward(), and `Adapted` is used through its methods (loss_sum,
logits), never forward(); its mixed precision is fixed once per process, while one process here may
train runs of both precisions (compare, the notebooks, the tests), so training.precision autocasts.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import reduce

from chameleon.backbones import device as resolve_device


def processes() -> int:
    """How many processes the launcher started (torchrun and accelerate launch set WORLD_SIZE); 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(device: str) -> torch.device:
    """This process's device: `device` (Config.device) for one process; under a launcher this process's
    GPU (LOCAL_RANK, NCCL), or the CPU (gloo) with device="cpu" or where torch sees no GPU."""
    dev = resolve_device(device)
    if processes() == 1:
        return dev
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device={device!r} names one device, but each of the {processes()} processes takes its "
                         f"own (LOCAL_RANK); use device='auto', 'cuda' or 'cpu'")
    state = PartialState(cpu=dev.type == "cpu")
    if state.num_processes != processes():
        raise ValueError(f"WORLD_SIZE={processes()} but accelerate joined {state.num_processes} process(es); start the "
                         f"processes with `accelerate launch` or `torchrun`, which also set RANK and LOCAL_RANK")
    return state.device


def rank() -> int:
    return PartialState().process_index if processes() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def share(items: Sequence) -> Sequence:
    """This process's part of a list every process holds (every processes()-th item)."""
    return items[rank()::processes()]


def all_sum(values) -> np.ndarray:
    """Element-wise sum of float64 values over the processes (each one's part of an evaluation)."""
    values = np.asarray(values, dtype=np.float64)
    if processes() == 1:
        return values
    return reduce(torch.from_numpy(values).to(PartialState().device), reduction="sum").cpu().numpy()


def sum_step(params: list[torch.nn.Parameter], loss_sum: float, n: int) -> tuple[float, int]:
    """Sum the gradients of a step's batches, and their summed loss and scored tokens, over the processes.

    An explicit all-reduce rather than DDP: DDP's reducer is armed by the wrapped module's forward(),
    which `Adapted` never calls. A parameter no process computed a gradient for (an expert no batch of
    the step was routed to) keeps grad None, so AdamW skips it as one process would.
    """
    if processes() == 1:
        return loss_sum, n
    has = [p.grad is not None for p in params]
    stats = reduce(torch.tensor([loss_sum, n, *has], dtype=torch.float64, device=params[0].device), reduction="sum")
    grads = reduce(torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in params]),
                   reduction="sum")
    for p, g, h in zip(params, grads.split([p.numel() for p in params]), stats[2:].tolist()):
        p.grad = g.view_as(p) if h else None
    return stats[0].item(), int(stats[1].item())


def main_first():
    """A block the main process runs before the others (it fills the caches they then read)."""
    return PartialState().main_process_first() if processes() > 1 else contextlib.nullcontext()


def main_writes(write: Callable[[], None]) -> None:
    """Write a run's files on the main process alone; every process waits until they are written (the
    next may read them: a resume, or the next run of a plan)."""
    if is_main():
        write()
    if processes() > 1:
        PartialState().wait_for_everyone()
