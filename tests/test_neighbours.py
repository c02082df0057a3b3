"""The blocked torch k-NN search against scikit-learn's brute force (an independent implementation)."""

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from poisonsweep.tasks.detect.neighbours import (blocked_nearest_neighbours, exact_rows, graph_nearest_neighbours,
                                                 nearest_neighbours, uses_graph)


def sklearn_neighbours(points, k):
    return NearestNeighbors(n_neighbors=k, algorithm="brute").fit(points).kneighbors()


@pytest.mark.parametrize("max_block_bytes", [1, 8 * 300 * 7, 2**28])  # one row, 7 rows, everything per block
def test_same_neighbours_and_distances_as_sklearn_brute_force(max_block_bytes):
    points = np.random.default_rng(0).normal(size=(300, 12))
    distances, indices = blocked_nearest_neighbours(points, 9, max_block_bytes=max_block_bytes)
    expected_distances, expected_indices = sklearn_neighbours(points, 9)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(distances, expected_distances, rtol=1e-7)


def test_float32_images_and_self_never_a_neighbour():
    rng = np.random.default_rng(1)
    images = rng.random((200, 1, 8, 8)).astype(np.float32)  # image-shaped input is flattened
    distances, indices = blocked_nearest_neighbours(images, 5)
    assert not (indices == np.arange(200)[:, None]).any()
    expected_distances, expected_indices = sklearn_neighbours(images.reshape(200, -1).astype(np.float64), 5)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(distances, expected_distances, rtol=1e-7)


def test_duplicates_are_neighbours_at_distance_zero():
    points = np.repeat(np.random.default_rng(2).normal(size=(50, 3)), 2, axis=0)  # every point twice
    distances, indices = blocked_nearest_neighbours(points, 1)
    np.testing.assert_array_equal(indices[:, 0], np.arange(100) ^ 1)  # the twin, not itself
    # the expanded formula leaves a cancellation error of sqrt(eps) * |x| (scikit-learn's too)
    np.testing.assert_allclose(distances, 0, atol=1e-6)


@pytest.mark.parametrize("search", [blocked_nearest_neighbours, nearest_neighbours])
def test_k_out_of_range_is_refused(search):
    with pytest.raises(ValueError, match="k must be between 1"):
        search(np.zeros((5, 2)), 5)


def test_the_cpu_search_is_the_blocked_search():
    points = np.random.default_rng(4).normal(size=(120, 6))
    for got, expected in zip(nearest_neighbours(points, 7), blocked_nearest_neighbours(points, 7, max_block_bytes=4096)):
        np.testing.assert_allclose(got, expected, rtol=1e-7)


def planted_clusters(n=3000, dims=32, seed=5):
    """Points around 30 centres: each point's true neighbours are mostly its cluster-mates."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(30, dims))
    return (centres[rng.integers(0, 30, size=n)] + rng.normal(size=(n, dims))).astype(np.float32)


def test_the_graph_finds_most_true_neighbours_at_their_true_distances():
    points = planted_clusters()
    distances, indices = graph_nearest_neighbours(points, 20)
    expected_distances, expected_indices = sklearn_neighbours(points.astype(np.float64), 20)
    recall = np.mean([len(np.intersect1d(got, want)) / 20 for got, want in zip(indices, expected_indices)])
    assert recall >= 0.95
    assert not (indices == np.arange(len(points))[:, None]).any()
    true_distances = np.linalg.norm(points[indices].astype(np.float64) - points[:, None, :], axis=2)
    np.testing.assert_allclose(distances, true_distances, rtol=1e-4, atol=1e-4)
    assert (np.diff(distances, axis=1) >= -1e-4).all()  # nearest first


def test_the_graph_is_reproducible():
    points = planted_clusters(n=1500, seed=6)
    first, second = graph_nearest_neighbours(points, 10), graph_nearest_neighbours(points, 10)
    np.testing.assert_array_equal(first[1], second[1])
    np.testing.assert_array_equal(first[0], second[0])


def test_the_graph_among_duplicates_finds_the_true_distances():
    points = np.repeat(planted_clusters(n=600, dims=16, seed=7), 3, axis=0)  # every sample three times
    distances, indices = graph_nearest_neighbours(points, 10)
    expected_distances, _ = sklearn_neighbours(points.astype(np.float64), 10)
    assert not (indices == np.arange(len(points))[:, None]).any()
    # duplicates tie, so the neighbour sets are ambiguous: compare the distances found
    assert np.mean(np.abs(distances - expected_distances) < 1e-4) >= 0.95
    np.testing.assert_allclose(distances[:, :2], 0, atol=1e-5)  # each sample's two twins come first


def test_rows_the_graph_leaves_short_are_searched_exactly():
    points = planted_clusters(n=400, dims=8, seed=9)
    rows = np.array([0, 17, 399])
    distances, indices = exact_rows(points, rows, 6)
    expected_distances, expected_indices = sklearn_neighbours(points.astype(np.float64), 6)
    np.testing.assert_array_equal(indices, expected_indices[rows])
    np.testing.assert_allclose(distances, expected_distances[rows], rtol=1e-5)


def test_auto_is_exact_on_an_accelerator_and_on_small_cpu_searches():
    assert not uses_graph(7_500, "auto", "cpu")  # the record's 7,500-image set-ups stay exact
    assert not uses_graph(20_000, "auto", "cpu") and uses_graph(20_001, "auto", "cpu")
    assert uses_graph(50_000, "auto", "cpu")
    assert not uses_graph(50_000, "auto", "cuda")  # a device name is enough: no GPU is needed to ask
    assert uses_graph(10, "hnsw", "cuda") and not uses_graph(10**6, "exact", "cpu")
    with pytest.raises(ValueError, match="search must be one of"):
        uses_graph(10, "annoy")


def test_search_auto_below_the_limit_is_the_exact_search():
    points = planted_clusters(n=800, seed=8)
    for got, expected in zip(nearest_neighbours(points, 7, search="auto"), nearest_neighbours(points, 7)):
        np.testing.assert_array_equal(got, expected)
