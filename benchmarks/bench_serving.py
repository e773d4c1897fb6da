"""Serving cost on SmolLM2-135M: batched greedy decoding with one generated adapter per group
(writes benchmarks/results/serving.md).

Runs: the smoke profile (64 training lines of the embedded Wikipedia extracts, 32 tokens), causal
protocol, ONE epoch, for `unadapted`, `lora` and `chameleon`, trained into a temp results folder
(quality is not the point: only the shapes and the code path matter for speed). Prompts: the
first words of validation extracts of the same corpus; "mixed" draws them at random, "single-topic"
takes prompts that all route to one training cluster. Every request decodes exactly MAX_NEW tokens
per prompt (EOS ignored) so that every variant does the same work.

1. tokens/s and latency of a request (one `Adapter.generate` call: embedding, grouping, the
   hypernetwork, prefill, decoding) at batch 1, 8, 32, per regime and grouping.
2. `chameleon` (route) over `lora` at batch 8: the cost of the hypernetwork and the grouping.
3. batched vs one-by-one decoding (`generation.greedy`, one prompt after the other, same group
   vectors) at batch 32.
4. memory of each adapter.
Variants alternate (ABAB...), medians reported. Exits non-zero when the batch-8 overhead exceeds
5%, batched decoding is < 4x one-by-one at batch 32, or batched and one-by-one tokens differ.

    python -m benchmarks.bench_serving
"""
import datetime, os, platform, random, shutil, sys, tempfile, time  # noqa: E401
from pathlib import Path

import torch

from benchmarks.timing import interleaved, write_report
from chameleon.config import ROOT, Config
from chameleon.data import load_lm_corpus
from chameleon.serve.decoding import greedy
from chameleon.serve.adapter import Adapter, tokenize_prompts
from chameleon.runs import run_dir
from chameleon.training import train

MAX_OVERHEAD, MIN_BATCH_SPEEDUP = 0.05, 4.0
MAX_NEW, REPEATS, OVERHEAD_REPEATS, ONE_BY_ONE_REPEATS = 16, 2, 5, 2
PROMPT_WORDS = 8
OUT = Path(__file__).resolve().parent / "results" / "serving.md"


def trained(tmp: Path, regime: str) -> Adapter:
    # data_dir: the checkout's cache (the SmolLM2 copy, and the smoke profile's embeddings and body
    # hidden states when the notebooks have run); the runs go to a temp folder
    cfg = Config.from_profile("smoke", regime=regime, protocol="causal", epochs=1, data_dir=ROOT / "data",
                              results_dir=tmp / "results")
    train(cfg, progress=False)
    return Adapter.from_run(run_dir(cfg), device="cpu")


def prompts_pool(n: int = 400) -> list[str]:
    lines = [t for t in load_lm_corpus("wiki")["validation"]["text"] if not t.startswith(" = ")]
    random.Random(0).shuffle(lines)
    return [" ".join(t.split()[:PROMPT_WORDS]) for t in lines[:n]]


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    load = os.getloadavg()
    t0 = time.perf_counter()
    adapters = {regime: trained(tmp, regime) for regime in ("unadapted", "lora", "chameleon")}
    setup = time.perf_counter() - t0
    cham = adapters["chameleon"]

    pool = prompts_pool()
    routed = cham.assign_groups(cham.embed(pool), "route")
    biggest = int(torch.from_numpy(routed).bincount().argmax())
    mixed = pool[:32]
    single = [p for p, g in zip(pool, routed) if g == biggest][:32]

    variants = {"unadapted": ("unadapted", "single"), "lora": ("lora", "single"),
                "chameleon route": ("chameleon", "route"), "chameleon kmeans": ("chameleon", "kmeans"),
                "chameleon single": ("chameleon", "single")}

    def request(name, prompts):
        regime, group = variants[name]
        return lambda: adapters[regime].generate(prompts, MAX_NEW, group=group, ignore_eos=True)

    interleaved({v: request(v, mixed[:8]) for v in variants}, 1)  # warm-up, once
    rows = []  # (batch, topics, variant, seconds, groups)
    for batch, topics in [(1, "mixed"), (8, "mixed"), (8, "single-topic"), (32, "mixed"), (32, "single-topic")]:
        prompts = (mixed if topics == "mixed" else single)[:batch]
        # unadapted and lora ignore the groups: their single-topic requests cost the same as mixed ones
        names = [v for v in variants if (batch > 1 or v in ("unadapted", "lora", "chameleon route"))
                 and (topics == "mixed" or v.startswith("chameleon"))]
        med = interleaved({v: request(v, prompts) for v in names}, REPEATS)
        for v in names:
            regime, group = variants[v]
            n_groups = len(set(adapters[regime].assign_groups(adapters[regime].embed(prompts), group).tolist()))
            rows.append((batch, topics, v, med[v], n_groups if regime == "chameleon" else None))
        print(rows[-len(names):], flush=True)

    over = interleaved({v: request(v, mixed[:8]) for v in ("lora", "chameleon route")}, OVERHEAD_REPEATS)
    overhead = over["chameleon route"] / over["lora"] - 1

    # batched vs one-by-one at batch 32: the same groups and conditioning vectors, the same tokens
    prompts = mixed[:32]
    labels = cham.assign_groups(cham.embed(prompts), "route")
    conds = cham.conditions(prompts, labels)
    ids = tokenize_prompts(cham.tokenizer, prompts, cham.cfg.max_length)
    out = {}

    def batched():
        out["batched"] = [r.tokens for r in cham.generate(prompts, MAX_NEW, group="route", ignore_eos=True)]

    def one_by_one():
        out["one-by-one"] = [greedy(cham.adapted, torch.tensor(p), MAX_NEW, None, conds[int(g)])
                             for p, g in zip(ids, labels)]

    obo = interleaved({"batched": batched, "one-by-one": one_by_one}, ONE_BY_ONE_REPEATS)
    speedup = obo["one-by-one"] / obo["batched"]
    same = out["batched"] == out["one-by-one"]

    mem = {r: a.adapter_bytes() for r, a in adapters.items()}
    ok = overhead <= MAX_OVERHEAD and speedup >= MIN_BATCH_SPEEDUP and same
    tokens = lambda b: b * MAX_NEW  # noqa: E731
    md = [f"Command: `python -m benchmarks.bench_serving` ({datetime.date.today()})",
          f"Machine: {torch.get_num_threads()} torch threads, {platform.machine()}, torch {torch.__version__}, "
          f"device cpu; load average at the start {load[0]:.2f} (1 min) / {load[1]:.2f} (5 min), at the end "
          f"{os.getloadavg()[0]:.2f}",
          f"Runs: SmolLM2-135M, smoke profile, causal protocol, 1 epoch (train + load: {setup:.0f} s). Prompts: "
          f"the first {PROMPT_WORDS} words of validation extracts of the embedded Wikipedia corpus; {MAX_NEW} new "
          f"tokens per prompt (EOS ignored). A request = one `Adapter.generate` call; its latency is the time "
          f"every prompt of the batch waits. Medians of {REPEATS} interleaved requests after one warm-up "
          f"request per variant.", "",
          "| batch | prompts | variant | groups | latency s | tokens/s |", "|---|---|---|---|---|---|"]
    md += [f"| {b} | {t} | {v} | {'' if g is None else g} | {s:.2f} | {tokens(b) / s:.1f} |"
           for b, t, v, s, g in rows]
    md += ["", f"Hypernetwork + grouping overhead over `lora` at batch 8 (mixed, route), median of "
               f"{OVERHEAD_REPEATS} interleaved requests: lora {over['lora']:.3f} s, chameleon "
               f"{over['chameleon route']:.3f} s: {100 * overhead:+.1f}% (goal <= {100 * MAX_OVERHEAD:.0f}%).",
           f"Batched vs one-by-one (`generation.greedy` per prompt, same group vectors) at batch 32, chameleon "
           f"route, median of {ONE_BY_ONE_REPEATS}: {obo['batched']:.2f} s vs {obo['one-by-one']:.2f} s = "
           f"{tokens(32) / obo['batched']:.1f} vs {tokens(32) / obo['one-by-one']:.1f} tokens/s, {speedup:.1f}x "
           f"(goal >= {MIN_BATCH_SPEEDUP:g}x); identical tokens: {same}.", "",
           "| regime | trained tensors | bytes | generated A, B per group |", "|---|---|---|---|",
           f"| unadapted | none | {mem['unadapted']['trained']:,} | |",
           f"| lora | A, B of the head | {mem['lora']['trained']:,} | |",
           f"| chameleon | the hypernetwork | {mem['chameleon']['trained']:,} | {mem['chameleon']['per_group']:,} |",
           "", f"Result: {'PASS' if ok else 'FAIL'} (overhead <= {100 * MAX_OVERHEAD:.0f}%, batched >= "
               f"{MIN_BATCH_SPEEDUP:g}x one-by-one, same tokens)."]
    write_report(OUT, md)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
