"""The blocked torch k-NN search against scikit-learn's brute force (an independent implementation)."""

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from poisonsweep.tasks.detect.neighbours import blocked_nearest_neighbours, nearest_neighbours


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
