"""Clusters of similar examples, and batches drawn from inside one cluster.

The paper clusters the example embeddings with k-means, k = N // batch_size, and draws
every mini-batch from a single cluster, so a batch holds similar inputs and its mean
embedding says something about all of them. At inference a new batch is routed to the
cluster whose centroid is nearest its mean embedding.

    labels, centroids = kmeans(emb, default_k(len(emb), cfg.batch_size), cfg.seed)
    loader = DataLoader(ds, batch_sampler=ClusterBatchSampler(labels, cfg.batch_size, cfg.seed))
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans

from chameleon.regimes import BATCHINGS, CONDITIONINGS


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def default_k(n: int, batch_size: int) -> int:
    """The paper's number of clusters, N // batch_size: about one batch per cluster.

    Args:
        n: number of examples clustered.
        batch_size: examples per batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} exceeds the N={n} examples; lower batch_size or use more data")
    return max(1, n // batch_size)


def kmeans(emb: torch.Tensor | np.ndarray, n_clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded k-means (scikit-learn, Lloyd) of the example embeddings.

    init="random" (k examples drawn at random), as the authors' own k-means loop starts.
    On 8,000 x 768 GPT-2 embeddings with k = 250 on 2 cores, k-means++ seeding took ~10x
    longer (3-4 s vs 0.4 s; 7-21 s vs 1-2 s with the cores shared) for an inertia only
    ~1% lower on real-token embeddings (it is ~40% lower on padded "authors" embeddings).

    Args:
        emb: (N, d) embeddings, usually L2-normalised (`mean_embeddings`).
        n_clusters: k, 1 <= k <= N (see `default_k`).
        seed: makes the result reproducible.

    Returns:
        labels: (N,) int64 cluster of each example; centroids: (k, d) float32.
    """
    x = _numpy(emb).astype(np.float32, copy=False)
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be a positive integer, got {n_clusters}")
    if n_clusters > len(x):
        raise ValueError(f"k={n_clusters} exceeds the N={len(x)} examples; lower n_clusters or use more data")
    km = KMeans(n_clusters=n_clusters, init="random", n_init=1, random_state=seed).fit(x)
    return km.labels_.astype(np.int64), km.cluster_centers_.astype(np.float32)


def assign(emb: torch.Tensor | np.ndarray, centroids: torch.Tensor | np.ndarray) -> np.ndarray:
    """Nearest centroid (Euclidean, as KMeans.predict) of each embedding.

    Args:
        emb: (N, d) embeddings.
        centroids: (k, d) centroids from `kmeans`.

    Returns:
        (N,) int64 labels.
    """
    x, c = _numpy(emb).astype(np.float64), _numpy(centroids).astype(np.float64)
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is the same for every centroid
    return np.argmin((c * c).sum(1) - 2 * x @ c.T, axis=1).astype(np.int64)


def route_batch(emb_batch: torch.Tensor | np.ndarray, centroids: torch.Tensor | np.ndarray) -> int:
    """The cluster of a batch arriving at inference: the centroid nearest its mean embedding.

    Args:
        emb_batch: (B, d) embeddings of the batch's examples.
        centroids: (k, d) centroids from `kmeans`.
    """
    return int(assign(_numpy(emb_batch).mean(0, keepdims=True), centroids)[0])


class ClusterBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of indices, each from inside one cluster; every example once per epoch.

    Each cluster's members are shuffled and cut into batches of batch_size (a cluster's
    last batch may be smaller), then the order of all batches is shuffled. The order
    depends only on (seed, epoch): call `set_epoch` before each epoch, as with
    DistributedSampler.

    Args:
        labels: (N,) cluster of each example (from `kmeans`); examples labelled -1 are left out.
        batch_size: largest number of examples per batch.
        seed: base seed of the shuffles.
    """

    def __init__(self, labels: np.ndarray | torch.Tensor, batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        labels = _numpy(labels)
        self.clusters = [np.flatnonzero(labels == c) for c in np.unique(labels[labels >= 0])]
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])  # independent stream per (seed, epoch)
        batches = []
        for members in self.clusters:
            members = rng.permutation(members)
            batches += [members[i:i + self.batch_size].tolist() for i in range(0, len(members), self.batch_size)]
        for i in rng.permutation(len(batches)):
            yield batches[i]

    def __len__(self) -> int:
        return sum(-(-len(m) // self.batch_size) for m in self.clusters)


def condition_batches(batches: list[list[int]], conditioning: str) -> list[list[int]]:
    """Which examples each batch's conditioning vector averages over: its own, or for a control that
    conditions on another batch (`shuffled`) the batch half the epoch away (mostly another cluster)."""
    if not CONDITIONINGS[conditioning].other_batch:
        return batches
    return [batches[(b + len(batches) // 2) % len(batches)] for b in range(len(batches))]


def eval_batches(labels: np.ndarray | torch.Tensor, batch_size: int,
                 conditioning: str) -> list[tuple[list[int], list[int]]]:
    """The fixed cluster batches of a validation split (seed 0, the same for every run) with the
    examples each one is conditioned on. Evaluation and generation both use it, so a generated
    answer is conditioned exactly as its loss was scored."""
    batches = list(ClusterBatchSampler(labels, batch_size, seed=0))
    return list(zip(batches, condition_batches(batches, conditioning)))



def incoming_batches(split, batch_size: int, conditioning: str, batching: str) -> list[tuple[list[int], list[int]]]:
    """The validation batches as they arrive under a row of regimes.BATCHINGS, each with the examples its
    vector averages (see `condition_batches`): routed to the training clusters (`eval_batches`), or mixed
    incoming batches drawn in a fixed order (seed 0, the same for every run), each adapted to as one
    group or cut into groups by k-means on `split.group_emb` (k = incoming / batch_size)."""
    row = BATCHINGS[batching]
    if not row.incoming:
        return eval_batches(split.labels, batch_size, conditioning)
    order, size = np.random.default_rng(0).permutation(len(split)), row.incoming * batch_size
    batches = []
    for start in range(0, len(order), size):
        incoming = order[start:start + size]
        if not row.grouped or len(incoming) <= batch_size:
            batches.append(sorted(incoming.tolist()))
            continue
        labels, _ = kmeans(split.group_emb[incoming], -(-len(incoming) // batch_size), seed=0)
        batches += [sorted(incoming[labels == g].tolist()) for g in np.unique(labels)]
    return list(zip(batches, condition_batches(batches, conditioning)))
