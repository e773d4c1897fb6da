"""One SVF training step on SmolLM2-135M's body: W' rebuilt from z vs applied factored
(writes benchmarks/results/svf.md).

The `cpu` profile's batch shape (8 lines x 32 tokens, random ids), the `svf` regime (one expert on the
90 MLP matrices). A step is the body forward and backward to z (the head is left out: both variants
share it). `rebuild` runs the body through torch.func.functional_call with every W' = U diag(s') Vh
built from z (the path before `svf.SVF.factored`); `factored` lets each layer compute
((x Vh^T) * s') U^T. Variants alternate (ABAB...), medians of REPEATS steps after one warm-up each.
Exits non-zero when the hidden states differ by more than MAX_REL_DIFF (relative to the largest entry),
the z-gradients by more than MAX_GRAD_DIFF, or factored is not faster.

    python -m benchmarks.bench_svf
"""
import datetime, os, platform, sys  # noqa: E401
from pathlib import Path

import torch
from torch.func import functional_call

from benchmarks.timing import interleaved, write_report
from chameleon.backbones import load_backbone
from chameleon.config import Config
from chameleon.adapters.model import build

BATCH, LENGTH, REPEATS = 8, 32, 5
MAX_REL_DIFF, MAX_GRAD_DIFF = 1e-4, 1e-3
OUT = Path(__file__).resolve().parent / "results" / "svf.md"


def main() -> int:
    cfg = Config.from_profile("cpu", regime="svf", protocol="causal")
    model, _ = load_backbone("smollm2", cache_dir=cfg.cache_dir)
    adapted = build(cfg, model).train()
    adapted.svf.selection = 0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, LENGTH), generator=g)
    mask = torch.ones_like(ids)
    zs = list(adapted.svf.expert(0).values())

    def rebuild():
        return functional_call(adapted.model.base_model, adapted.svf.weights(), args=(),
                               kwargs=dict(input_ids=ids, attention_mask=mask)).last_hidden_state

    def factored():
        return adapted.hidden(ids, mask)  # Adapted.body: factored while gradients are on

    def step(forward):
        for z in zs:
            z.grad = None
        h = forward()
        h.pow(2).mean().backward()
        return h.detach(), [z.grad.clone() for z in zs]

    (h_r, g_r), (h_f, g_f) = step(rebuild), step(factored)
    rel = ((h_r - h_f).abs().max() / h_r.abs().max()).item()
    grad = max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(g_r, g_f))
    times = interleaved({"rebuild": lambda: step(rebuild), "factored": lambda: step(factored)}, REPEATS, warmup=True)
    ratio = times["rebuild"] / times["factored"]
    lines = [
        "# SVF training step: W' rebuilt vs factored",
        "",
        f"Produced by `python -m benchmarks.bench_svf` on {datetime.date.today()}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}. SmolLM2-135M body, batch {BATCH} x {LENGTH} "
        f"tokens, forward + backward to the z of the 90 MLP matrices; medians of {REPEATS} interleaved steps.",
        "",
        "| variant | seconds a step | vs factored |",
        "|---|---|---|",
        *(f"| {name} | {t:.2f} | {t / times['factored']:.2f}x |" for name, t in times.items()),
        "",
        f"Factored is {ratio:.2f}x faster. Largest difference of the hidden states {rel:.1e} (relative), "
        f"of the z-gradients {grad:.1e} (relative, per matrix).",
    ]
    write_report(OUT, lines)
    return 0 if rel <= MAX_REL_DIFF and grad <= MAX_GRAD_DIFF and ratio > 1 else 1


if __name__ == "__main__":
    sys.exit(main())
