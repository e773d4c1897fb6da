"""Head-only training step on SmolLM2-135M (vocab 49,152, d 576): full logits vs chameleon.fused_loss
(writes benchmarks/results/head.md).

443 scored rows, gathered from the first batches of 8 examples x 64 tokens (causal protocol; the body's real
hidden states, computed once, as on the cached path): the size of bench_training.py's batch when both were
written, and of the head matmul the targets are stated against. A step is forward + backward + AdamW.
1. Speed: `plain` (objectives.loss_sum on Adapted.logits: the path before fused_loss) vs `fused`
   (Adapted.loss_sum) for lora, lora_matched and chameleon, and fused at several chunk sizes; variants
   alternate (ABAB...), medians of STEP_REPEATS steps.
2. Agreement: loss and gradients of every trainable tensor, plain vs fused, same parameters, same dropout.
3. Peak memory: each variant in its own process, after a one-row warm-up step (library initialisation,
   AdamW state); the growth of resident memory (VmHWM after resetting it through /proc/self/clear_refs,
   minus VmRSS before) over the next MEMORY_STEPS steps.
4. The head matmul alone (rows x d @ d x vocab, the one product a step cannot avoid), timed among the steps:
   every step is reported as a multiple of it, a ratio that holds on any CPU.
5. The least time the hypernetwork's AdamW step takes at the memory bandwidth measured in the run, and so the
   least the fused chameleon step can cost beside the fused lora step.
Exits non-zero when the fused lora or chameleon step (default chunk) takes more than MAX_MATMUL_RATIO times
the matmul, or loss or gradients differ by more than MAX_REL_DIFF (relative to the largest entry).

    python -m benchmarks.bench_head
"""
import datetime, json, os, platform, shutil, subprocess, sys, tempfile, time  # noqa: E401
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from benchmarks.timing import adamw_floor, interleaved, proc_status, verdict, write_report
from chameleon import objectives
from chameleon.backbones import load_backbone
from chameleon.config import Config
from chameleon.fused_loss import CHUNK
from chameleon.prepare import prepare
from chameleon.adapters.model import build, hyper_parameters
from chameleon.training import optimizer, trimmed

MAX_MATMUL_RATIO, MAX_REL_DIFF = 1.3, 1e-5
MATMUL = ("head matmul", -1)  # its key among the timed variants
ROWS = 443  # bench_training.py's first batch (8 x 64 tokens) scored 443 rows when this was written; 227 now
STEP_REPEATS, MEMORY_STEPS = 7, 3
REGIMES, CHUNKS = ("lora", "lora_matched", "chameleon"), (128, 256, 512)
THREADS = 2
OUT = Path(__file__).resolve().parent / "results" / "head.md"


def config(data_dir) -> Config:
    return Config.from_profile("cpu", max_train_examples=64, max_eval_examples=16, max_length=64, batch_size=8,
                               protocol="causal", data_dir=Path(data_dir))


def batch(data_dir: str) -> dict:
    """ROWS scored rows from the first examples, batch by batch: body hidden states, targets, and the
    conditioning vector (the mean embedding of the examples used)."""
    cfg = config(data_dir)
    model, tok = load_backbone(cfg.backbone, seed=cfg.seed)
    split, _, _ = prepare(cfg, model, tok)
    adapted, hidden, target, examples = build(cfg.replace(regime="unadapted"), model), [], [], []
    while sum(map(len, target)) < ROWS:
        examples = list(range(len(examples), len(examples) + cfg.batch_size))
        ids, attention, t = trimmed(split, examples)
        with torch.inference_mode():
            h = adapted.hidden(ids, attention)
        hidden.append(h[t != objectives.IGNORE].float())
        target.append(t[t != objectives.IGNORE])
    return {"hidden": torch.cat(hidden)[:ROWS].clone(), "target": torch.cat(target)[:ROWS].clone(),
            "cond": split.cond_emb[:examples[-1] + 1].mean(0).float().clone()}


def trainer(cfg, model, regime):
    adapted = build(cfg.replace(regime=regime), model)
    adapted.train()  # a frozen body stays in eval mode (Adapted.train); the hypernetwork's dropout is on
    return adapted, optimizer(cfg, [p for p in adapted.parameters() if p.requires_grad])


def loss_sum(adapted, data, chunk):
    """chunk 0: the plain path (full logits, F.cross_entropy); else the fused one."""
    cond = data["cond"] if adapted.conditioned else None
    if chunk == 0:
        return objectives.loss_sum(adapted.logits(data["hidden"], cond), data["target"])
    return adapted.loss_sum(data["hidden"], data["target"], cond, chunk=chunk)


def step(adapted, opt, data, chunk) -> float:
    loss = loss_sum(adapted, data, chunk) / len(data["target"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def agreement(cfg, model, regime, data) -> dict:
    """Max abs and relative differences of loss and gradients, plain vs fused, from identical adapters."""
    out = {}
    for chunk in (0, CHUNK):
        adapted, _ = trainer(cfg, model, regime)  # build() seeds: the same adapter each time
        torch.manual_seed(1)  # the same dropout mask in the hypernetwork
        loss = loss_sum(adapted, data, chunk)
        params = [p for p in adapted.parameters() if p.requires_grad]
        out[chunk] = [loss.detach(), *torch.autograd.grad(loss, params)]
    diffs = [(a - b).abs().max().item() for a, b in zip(out[CHUNK], out[0])]
    rel = [d / max(b.abs().max().item(), 1e-30) for d, b in zip(diffs, out[0])]
    return {"loss": out[0][0].item(), "loss_abs": diffs[0], "loss_rel": rel[0],
            "grad_abs": max(diffs[1:]), "grad_rel": max(rel[1:])}


def child(data_dir: str, regime: str, chunk: int) -> None:
    """One variant in a fresh process: resident-memory growth over its first MEMORY_STEPS steps."""
    torch.set_num_threads(THREADS)
    cfg = config(data_dir)
    model, _ = load_backbone(cfg.backbone, seed=cfg.seed)
    data = load_file(Path(data_dir) / "batch.safetensors")
    adapted, opt = trainer(cfg, model, regime)
    # One step on a single row first: libraries initialise and AdamW allocates its state (the same for
    # both paths), so the growth measured below is the step's own working memory.
    step(adapted, opt, {"hidden": data["hidden"][:1], "target": data["target"][:1], "cond": data["cond"]}, chunk)
    before = proc_status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    for _ in range(MEMORY_STEPS):
        step(adapted, opt, data, chunk)
    print(json.dumps({"peak_mb": (proc_status("VmHWM") - before) / 1024}))


def main() -> int:
    torch.set_num_threads(THREADS)
    load = os.getloadavg()
    data_dir = tempfile.mkdtemp(prefix="bench_head_")
    data = batch(data_dir)
    save_file(data, Path(data_dir) / "batch.safetensors")
    cfg = config(data_dir)
    model, _ = load_backbone(cfg.backbone, seed=cfg.seed)
    rows = len(data["target"])

    variants = {(regime, 0) for regime in REGIMES} | {(regime, CHUNK) for regime in REGIMES}
    variants |= {(regime, c) for regime in ("lora", "chameleon") for c in CHUNKS}
    variants = sorted(variants)
    fns = {}
    for regime, chunk in variants:
        adapted, opt = trainer(cfg, model, regime)
        fns[(regime, chunk)] = lambda a=adapted, o=opt, c=chunk: step(a, o, data, c)
    weight = model.get_output_embeddings().weight.detach()
    fns[MATMUL] = lambda: data["hidden"] @ weight.T
    t0 = time.perf_counter()
    seconds = interleaved(fns, STEP_REPEATS, warmup=True)
    matmul = seconds.pop(MATMUL)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()[0]
    agree = {regime: agreement(cfg, model, regime, data) for regime in REGIMES}
    floor, how = adamw_floor(hyper_parameters(cfg, model))

    memory = {}
    for regime, chunk in variants:
        out = subprocess.run([sys.executable, "-m", "benchmarks.bench_head", "--child", data_dir, regime, str(chunk)],
                             check=True, capture_output=True, text=True).stdout
        memory[(regime, chunk)] = json.loads(out.strip().splitlines()[-1])["peak_mb"]

    speed = {k: rows / s for k, s in seconds.items()}
    checks = {f"fused {r} (chunk {CHUNK}) within {MAX_MATMUL_RATIO}x the head matmul":
              seconds[(r, CHUNK)] <= MAX_MATMUL_RATIO * matmul for r in ("lora", "chameleon")}
    checks[f"differences <= {MAX_REL_DIFF:g} relative"] = all(a["loss_rel"] <= MAX_REL_DIFF and a["grad_rel"] <= MAX_REL_DIFF
                                                               for a in agree.values())
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    name = lambda c: "plain" if c == 0 else f"fused, chunk {c}"  # noqa: E731
    md = [f"Command: `python -m benchmarks.bench_head` ({datetime.date.today()})",
          f"Machine: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {platform.machine()}, "
          f"torch {torch.__version__}; load average at the start {load[0]:.2f} (5 min {load[1]:.2f}), after the "
          f"timed steps {load_after:.2f}",
          f"Batch: the first {rows} scored rows of the first batches of {cfg.batch_size} examples x {cfg.max_length} "
          f"tokens, real SmolLM2 body hidden states (as cached); vocab {model.config.vocab_size:,}, d {model.config.hidden_size}. A step = forward + "
          f"backward + AdamW. Medians of {STEP_REPEATS} interleaved steps ({wall:.0f} s in all); default chunk "
          f"{CHUNK}.", "",
          f"The head matmul alone ({rows} x {model.config.hidden_size} @ {model.config.hidden_size} x "
          f"{model.config.vocab_size:,}, fresh output): {matmul:.3f} s, {rows / matmul:.0f} rows/s.", "",
          "| regime | path | step s | scored rows/s | step / matmul | fused / plain | peak memory growth MB |",
          "|---|---|---|---|---|---|---|"]
    for regime, chunk in variants:
        ratio = f"{seconds[(regime, 0)] / seconds[(regime, chunk)]:.2f}x" if chunk else ""
        mem = f"{memory[(regime, chunk)]:.0f}"
        md.append(f"| {regime} | {name(chunk)} | {seconds[(regime, chunk)]:.3f} | {speed[(regime, chunk)]:.0f} | "
                  f"{seconds[(regime, chunk)] / matmul:.3f}x | {ratio} | {mem} |")
    lora = seconds[("lora", CHUNK)] / matmul
    md += ["", f"`chameleon`'s hypernetwork update: {how}. With the fused `lora` step at {lora:.3f}x the matmul, no "
               f"implementation of that update gets the fused `chameleon` step under {lora + floor / matmul:.3f}x here."]
    md += ["", f"Peak memory growth: one fresh process per variant; after a warm-up step on one row (library "
               f"initialisation and AdamW state, the same for both paths), the peak resident memory (VmHWM, reset "
               f"through /proc/self/clear_refs) over {MEMORY_STEPS} steps minus the resident memory before them.", "",
           f"Plain vs fused (chunk {CHUNK}), same adapter and dropout mask; relative = max abs diff / max abs of "
           f"the plain value:", "",
           "| regime | loss | loss abs diff | loss rel diff | grad max abs diff | grad max rel diff |",
           "|---|---|---|---|---|---|"]
    md += [f"| {r} | {a['loss']:.4f} | {a['loss_abs']:.1e} | {a['loss_rel']:.1e} | {a['grad_abs']:.1e} | "
           f"{a['grad_rel']:.1e} |" for r, a in agree.items()]
    write_report(OUT, md + ["", verdict(checks)])
    shutil.rmtree(data_dir, ignore_errors=True)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(main())
