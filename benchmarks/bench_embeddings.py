"""Embeddings + k-means + batch building for 8,000 Wikipedia extracts, against a per-example loop.

The baseline has the structure of the authors' pipeline: a loop over the rows of a
`datasets.Dataset` computes each example's mean embeddings one at a time as Python lists,
`add_column` stores them, and batches are built by grouping indices in Python. Both sides
compute the same quantities (real tokens only, L2-normalised) and use the same
k-means (`chameleon.clustering.kmeans`) so the comparison isolates the embedding and
batching pipeline (the authors run their own 10-iteration torch k-means instead).
GPT-2's shapes: a seeded, randomly initialised GPT2LMHeadModel(GPT2Config()) (no GPT-2
weights offline; the weights do not change the cost) and GPT-2's exact tokenizer.

    python -m benchmarks.bench_embeddings          # writes benchmarks/results/embeddings.md

Exits non-zero when the kit is less than 20x faster, differs by more than 1e-5, or its
tokenisation is more than 1.5x slower than the tokenizer's own batched encode.
"""
import os
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

N, MAX_LENGTH, BATCH_SIZE, SEED, REPEATS = 8000, 256, 32, 0, 3
MIN_SPEEDUP, MAX_DIFF, MAX_TOKENIZE_RATIO = 20.0, 1e-5, 1.5
OUT = Path(__file__).resolve().parent / "results" / "embeddings.md"


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def baseline_embeddings(model, ds):
    """The authors' structure: iterate the dataset's rows, compute each example's vectors as
    Python lists, attach them with `add_column` (which fingerprints the whole column), read
    the clustering column back. Same definitions as the kit (real tokens only, normalised)."""
    wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
    token, token_pos = [], []
    with torch.no_grad():
        for row in ds:
            ids, keep = torch.tensor(row["input_ids"]), torch.tensor(row["attention_mask"], dtype=torch.bool)
            rows = wte[ids[keep]]
            tok, pos = rows.mean(0), (rows + wpe[:len(ids)][keep]).mean(0)
            token.append((tok / tok.norm()).tolist())
            token_pos.append((pos / pos.norm()).tolist())
    ds = ds.add_column("token_embedding", token).add_column("lm_input_embedding", token_pos)
    return np.array(ds["token_embedding"], dtype=np.float32), np.array(ds["lm_input_embedding"], dtype=np.float32)


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
    load = os.getloadavg()[0]
    datasets.disable_progress_bars()  # the bar costs the baseline time and clutters the report
    torch.manual_seed(SEED)
    corpus = load_lm_corpus("wiki")
    texts = [t for split in ("train", "validation", "test") for t in corpus[split]["text"]][:N]
    tokenizer = gpt2_tokenizer()

    # tokenisation: the kit's `tokenize` against the tokenizer's own batched encode, alternated
    t_tok_kit, t_tok_ref = [], []
    for _ in range(REPEATS):
        enc, t = timed(lambda: tokenize(texts, tokenizer, MAX_LENGTH))
        t_tok_kit.append(t)
        t_tok_ref.append(timed(lambda: tokenizer(texts, padding="max_length", truncation=True,
                                                 max_length=MAX_LENGTH, return_tensors="pt"))[1])
    t_tok_kit, t_tok_ref = np.median(t_tok_kit), np.median(t_tok_ref)
    input_ids = enc["input_ids"]
    mask = embedding_mask(enc["attention_mask"], "causal")  # real tokens only; the cost is the same for "authors"

    model = GPT2LMHeadModel(GPT2Config()).eval()
    k = default_k(N, BATCH_SIZE)
    ds = datasets.Dataset.from_dict({"text": texts, "input_ids": input_ids.tolist(),
                                     "attention_mask": enc["attention_mask"].tolist()})

    def kit_embeddings():
        return mean_embeddings(model, input_ids, mask), mean_embeddings(model, input_ids, mask, positions=True)

    kit_embeddings()  # warm-up (first-call allocations); the baseline's per-row work needs none
    (base_tok, base_pos), t_base_emb = timed(lambda: baseline_embeddings(model, ds))
    (base_labels, _), t_base_km = timed(lambda: kmeans(base_tok, k, SEED))
    base_batches, t_base_bat = timed(lambda: baseline_batches(base_labels, SEED))

    # the kit's side is short, so take the median of a few runs
    runs = []
    for _ in range(REPEATS):
        (kit_tok, kit_pos), t_emb = timed(kit_embeddings)
        (kit_labels, _), t_km = timed(lambda: kmeans(kit_tok, k, SEED))
        kit_batches, t_bat = timed(lambda: list(ClusterBatchSampler(kit_labels, BATCH_SIZE, SEED)))
        runs.append((t_emb, t_km, t_bat))
    t_kit_emb, t_kit_km, t_kit_bat = np.median(runs, axis=0)

    diff = max((kit_tok - torch.from_numpy(base_tok)).abs().max().item(),
               (kit_pos - torch.from_numpy(base_pos)).abs().max().item())
    for batches, labels in ((base_batches, base_labels), (kit_batches, kit_labels)):
        assert sorted(i for b in batches for i in b) == list(range(N))  # every example once
        assert all(len(set(labels[b])) == 1 for b in batches)  # one cluster per batch

    stages = [("embeddings (token-mean + token+position-mean)", t_base_emb, t_kit_emb),
              ("k-means (same sklearn call, k = N // 32 = %d)" % k, t_base_km, t_kit_km),
              ("batch building", t_base_bat, t_kit_bat)]
    t_base, t_kit = sum(s[1] for s in stages), sum(s[2] for s in stages)
    speedup, tok_ratio = t_base / t_kit, t_tok_kit / t_tok_ref
    ok = speedup >= MIN_SPEEDUP and diff <= MAX_DIFF and tok_ratio <= MAX_TOKENIZE_RATIO
    lines = [
        f"# Embeddings, k-means and batches: {N:,} Wikipedia extracts, max_length {MAX_LENGTH}, GPT-2 shapes",
        "",
        "Command: `python -m benchmarks.bench_embeddings`",
        f"Machine: {torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, datasets {datasets.__version__}; load average at the start "
        f"{load:.2f} (other processes slow the per-example loop most)",
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
