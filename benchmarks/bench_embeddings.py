"""Embeddings + k-means + batch building for 8,000 Wikipedia extracts, against a per-example loop.

The baseline is the authors' style of pipeline: `datasets.Dataset.map` computes each
example's mean embeddings one example at a time and stores them as Python lists in a
column, and batches are built by grouping indices in Python. Both sides use the same
k-means (`chameleon.clustering.kmeans`) so the comparison isolates the embedding and
batching pipeline (the authors run their own 10-iteration torch k-means instead).
GPT-2's shapes: a seeded, randomly initialised GPT2LMHeadModel(GPT2Config()) (no GPT-2
weights offline; the weights do not change the cost) and GPT-2's exact tokenizer.

    python benchmarks/bench_embeddings.py          # writes benchmarks/results/embeddings.md

Exits non-zero when the kit is less than 20x faster, differs by more than 1e-5, or its
tokenisation is more than 1.5x slower than the tokenizer's own batched encode.
"""
import platform
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from chameleon.backbones import gpt2_tokenizer
from chameleon.clustering import ClusterBatchSampler, default_k, kmeans
from chameleon.data import load_lm_corpus, tokenize
from chameleon.embeddings import embedding_mask, mean_embeddings

N, MAX_LENGTH, BATCH_SIZE, SEED = 8000, 256, 32, 0
MIN_SPEEDUP, MAX_DIFF, MAX_TOKENIZE_RATIO = 20.0, 1e-5, 1.5
OUT = Path(__file__).resolve().parent / "results" / "embeddings.md"


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def baseline_embeddings(model, input_ids, mask):
    """One example at a time in `Dataset.map`, each vector kept as a Python list."""
    wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
    ds = datasets.Dataset.from_dict({"input_ids": input_ids.tolist(), "mask": mask.tolist()})

    def embed(row):
        ids, keep = torch.tensor(row["input_ids"]), torch.tensor(row["mask"], dtype=torch.bool)
        tok = wte[ids[keep]]
        pos = tok + wpe[:len(ids)][keep]
        return {"token": (tok.mean(0) / tok.mean(0).norm()).tolist(),
                "token_pos": (pos.mean(0) / pos.mean(0).norm()).tolist()}

    def run():
        with torch.no_grad():
            out = ds.map(embed, remove_columns=["input_ids", "mask"])
        return np.array(out["token"], dtype=np.float32), np.array(out["token_pos"], dtype=np.float32)

    return run


def baseline_batches(labels, seed):
    """Group indices by cluster in Python, shuffle, chunk, shuffle the batches."""
    rng = random.Random(seed)
    groups = defaultdict(list)
    for i, c in enumerate(labels.tolist()):
        groups[c].append(i)
    batches = []
    for members in groups.values():
        rng.shuffle(members)
        batches += [members[i:i + BATCH_SIZE] for i in range(0, len(members), BATCH_SIZE)]
    rng.shuffle(batches)
    return batches


def main() -> int:
    torch.manual_seed(SEED)
    corpus = load_lm_corpus("wiki")
    texts = [t for split in ("train", "validation", "test") for t in corpus[split]["text"]][:N]
    tokenizer = gpt2_tokenizer()

    # tokenisation: the kit's `tokenize` against the tokenizer's own batched encode
    enc, t_tok_kit = timed(lambda: tokenize(texts, tokenizer, MAX_LENGTH))
    _, t_tok_ref = timed(lambda: tokenizer(texts, padding="max_length", truncation=True,
                                           max_length=MAX_LENGTH, return_tensors="pt"))
    input_ids = enc["input_ids"]
    mask = embedding_mask(enc["attention_mask"], "causal")  # real tokens only; the cost is the same for "paper"

    model = GPT2LMHeadModel(GPT2Config()).eval()
    k = default_k(N, BATCH_SIZE)

    def kit_embeddings():
        return (mean_embeddings(model, input_ids, mask), mean_embeddings(model, input_ids, mask, positions=True))

    kit_embeddings()  # warm-up of both sides on the real shapes costs nothing to the baseline: it is tiny
    baseline_embeddings(model, input_ids[:16], mask[:16])()

    (base_tok, base_pos), t_base_emb = timed(baseline_embeddings(model, input_ids, mask))
    (base_labels, _), t_base_km = timed(lambda: kmeans(base_tok, k, SEED))
    base_batches, t_base_bat = timed(lambda: baseline_batches(base_labels, SEED))

    (kit_tok, kit_pos), t_kit_emb = timed(kit_embeddings)
    (kit_labels, _), t_kit_km = timed(lambda: kmeans(kit_tok, k, SEED))
    kit_batches, t_kit_bat = timed(lambda: list(ClusterBatchSampler(kit_labels, BATCH_SIZE, SEED)))

    diff = max((kit_tok - torch.from_numpy(base_tok)).abs().max().item(),
               (kit_pos - torch.from_numpy(base_pos)).abs().max().item())
    for batches in (base_batches, kit_batches):  # both must cover every example once, one cluster per batch
        assert sorted(i for b in batches for i in b) == list(range(N))
        assert all(len(set(kit_labels[b])) == 1 for b in batches)

    stages = [("embeddings (token-mean + token+position-mean)", t_base_emb, t_kit_emb),
              ("k-means (same sklearn call, k = N // 32 = %d)" % k, t_base_km, t_kit_km),
              ("batch building", t_base_bat, t_kit_bat)]
    t_base, t_kit = sum(s[1] for s in stages), sum(s[2] for s in stages)
    speedup, tok_ratio = t_base / t_kit, t_tok_kit / t_tok_ref
    ok = speedup >= MIN_SPEEDUP and diff <= MAX_DIFF and tok_ratio <= MAX_TOKENIZE_RATIO
    lines = [
        f"# Embeddings, k-means and batches: {N:,} Wikipedia extracts, max_length {MAX_LENGTH}, GPT-2 shapes",
        "",
        "Command: `python benchmarks/bench_embeddings.py`",
        f"Machine: {torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, datasets {datasets.__version__}",
        "",
        "| stage | baseline s | kit s | ratio |",
        "|---|---|---|---|",
        *[f"| {name} | {b:.2f} | {t:.3f} | {b / t:.1f}x |" for name, b, t in stages],
        f"| **total (tokenisation excluded)** | **{t_base:.2f}** | **{t_kit:.3f}** | **{speedup:.1f}x** |",
        "",
        f"Max abs difference of the embeddings, kit vs baseline: {diff:.2e} (limit {MAX_DIFF:.0e}); "
        f"k-means labels identical: {bool(np.array_equal(base_labels, kit_labels))}.",
        f"Tokenisation: `chameleon.data.tokenize` {t_tok_kit:.2f} s vs the tokenizer's batched encode "
        f"{t_tok_ref:.2f} s ({tok_ratio:.2f}x, limit {MAX_TOKENIZE_RATIO}x).",
        f"Result: {'PASS' if ok else 'FAIL'} (needs >= {MIN_SPEEDUP:.0f}x).",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
