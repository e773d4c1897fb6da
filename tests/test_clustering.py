import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from chameleon.clustering import ClusterBatchSampler, assign, default_k, kmeans, route_batch


@pytest.fixture
def blobs():
    """Six well-separated unit-norm blobs of uneven sizes in 16 dimensions."""
    rng = np.random.default_rng(0)
    centres = np.eye(16)[:6] * 5
    sizes = [30, 17, 25, 8, 40, 12]
    x = np.concatenate([c + 0.3 * rng.standard_normal((n, 16)) for c, n in zip(centres, sizes)])
    truth = np.repeat(np.arange(6), sizes)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return torch.tensor(x, dtype=torch.float32), truth


def test_kmeans_seeded_and_converged(blobs):
    x, _ = blobs
    labels, centroids = kmeans(x, 6, seed=3)
    again, _ = kmeans(x.numpy(), 6, seed=3)
    assert labels.shape == (len(x),) and centroids.shape == (6, 16) and labels.dtype == np.int64
    np.testing.assert_array_equal(labels, again)
    # a converged Lloyd solution: every example sits with its nearest centroid, which is its cluster's mean
    np.testing.assert_array_equal(assign(x, centroids), labels)
    np.testing.assert_allclose(centroids[labels[0]], x[labels == labels[0]].mean(0), atol=1e-5)


def test_kmeans_bad_k(blobs):
    x, _ = blobs
    with pytest.raises(ValueError, match="exceeds the N=132"):
        kmeans(x, 133, seed=0)
    with pytest.raises(ValueError, match="positive"):
        kmeans(x, 0, seed=0)


def test_default_k():
    assert default_k(100, 32) == 3 and default_k(32, 32) == 1
    with pytest.raises(ValueError, match="batch_size=64 exceeds the N=10"):
        default_k(10, 64)


def test_assign_equals_sklearn_predict():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 24)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    km = KMeans(n_clusters=20, n_init=1, random_state=0).fit(x[:300])
    np.testing.assert_array_equal(assign(torch.tensor(x), km.cluster_centers_), km.predict(x))


def test_route_batch(blobs):
    x, truth = blobs
    centroids = np.stack([x[truth == c].mean(0) for c in range(6)])
    rng = np.random.default_rng(2)
    for cluster in rng.permutation(6):
        batch = rng.choice(np.flatnonzero(truth == cluster), size=5, replace=False)
        assert route_batch(x[batch], centroids) == cluster


def test_batch_sampler(blobs):
    x, _ = blobs
    labels, _ = kmeans(x, 6, seed=0)
    sampler = ClusterBatchSampler(labels, batch_size=8, seed=5)
    epoch0 = list(sampler)
    assert len(epoch0) == len(sampler) == sum(-(-n // 8) for n in np.bincount(labels))
    assert all(len(set(labels[b])) == 1 and 1 <= len(b) <= 8 for b in epoch0)  # one cluster per batch
    assert sorted(i for b in epoch0 for i in b) == list(range(len(x)))  # each example exactly once

    assert list(sampler) == epoch0  # same (seed, epoch): same order
    assert list(ClusterBatchSampler(labels, batch_size=8, seed=5)) == epoch0
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    assert list(ClusterBatchSampler(labels, batch_size=8, seed=6)) != epoch0


def test_batch_sampler_in_dataloader(blobs):
    x, _ = blobs
    labels, _ = kmeans(x, 6, seed=0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.tensor(labels)),
                                         batch_sampler=ClusterBatchSampler(labels, batch_size=8, seed=0))
    assert all(len(y.unique()) == 1 for _, y in loader)
