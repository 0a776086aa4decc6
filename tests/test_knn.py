import keras
import numpy as np
import pytest
from support import conv_bn_encoder
from support import make_moco
from support import random_images

from moco_keras import knn


def numpy_knn(features, bank, bank_labels, num_classes, k, t):
    scores = np.zeros((len(features), num_classes))
    for i, f in enumerate(features):
        similarity = bank @ f
        nearest = np.argsort(-similarity)[:k]
        for j in nearest:
            scores[i, bank_labels[j]] += np.exp(similarity[j] / t)
    return scores


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_knn_predict_is_weighted_voting():
    rng = np.random.default_rng(0)
    bank = unit(rng.normal(size=(50, 6))).astype("float32")
    labels = rng.integers(0, 4, 50).astype("int32")
    tests = unit(rng.normal(size=(7, 6))).astype("float32")
    scores = knn.knn_predict(tests, bank, labels, 4, k=10, t=0.1)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(scores),
        numpy_knn(tests, bank, labels, 4, 10, 0.1),
        rtol=1e-4,
    )


def test_knn_accuracy_on_separable_clusters():
    rng = np.random.default_rng(1)
    centers = unit(rng.normal(size=(3, 8)))
    labels = np.repeat(np.arange(3), 20)
    points = unit(centers[labels] + 0.05 * rng.normal(size=(60, 8)))
    points = points.astype("float32")
    accuracy = knn.knn_accuracy(
        points[::2],
        labels[::2],
        points[1::2],
        labels[1::2],
        3,
        k=5,
        batch_size=7,
    )
    assert accuracy == 1.0
    shuffled = rng.permutation(labels[::2])
    chance = knn.knn_accuracy(
        points[::2], shuffled, points[1::2], labels[1::2], 3, k=5
    )
    assert chance < 0.8
    raw = knn.flatten_normalize(random_images(3))
    np.testing.assert_allclose(np.linalg.norm(raw, axis=1), 1.0, rtol=1e-6)


def test_monitor_logs_knn_accuracy_every_n_epochs():
    images = random_images(16, (8, 8, 3))
    labels = np.arange(16) % 2
    monitor = knn.KNNMonitor(images, labels, images, labels, 2, every=2, k=3)
    model = make_moco(conv_bn_encoder(bn_splits=2), queue_size=8)
    history = model.fit(
        images, images, batch_size=8, epochs=3, callbacks=[monitor], verbose=0
    )
    assert [epoch for epoch, _ in monitor.accuracies] == [1, 3]
    assert all(0.0 <= a <= 1.0 for _, a in monitor.accuracies)
    assert "knn_top1" in history.history


def test_nearest_neighbors_are_the_most_similar_rows():
    rng = np.random.default_rng(3)
    bank = unit(rng.normal(size=(30, 5))).astype("float32")
    queries = unit(rng.normal(size=(4, 5))).astype("float32")
    expected = np.argsort(-(queries @ bank.T), axis=1)[:, :3]
    np.testing.assert_array_equal(
        knn.nearest_neighbors(queries, bank, k=3), expected
    )
    # Searching a set in itself: each row is its own nearest unless excluded.
    own = knn.nearest_neighbors(bank, bank, k=2)
    np.testing.assert_array_equal(own[:, 0], np.arange(30))
    others = knn.nearest_neighbors(bank, bank, k=2, exclude_self=True)
    np.testing.assert_array_equal(others[:, 0], own[:, 1])
    assert not np.any(others == np.arange(30)[:, None])


def test_neighbor_grid_draws_queries_and_neighbours():
    from moco_keras import visualize

    images = np.random.default_rng(0).integers(0, 255, (6, 8, 8), np.uint8)
    indices = np.array([[1, 2, 3], [0, 4, 5]])
    figure = visualize.neighbor_grid(
        images[:2], images, indices, [0, 1], [0, 1, 0, 0, 1, 0], ("a", "b")
    )
    assert len(figure.axes) == 2 * 4
    # Row titles count the neighbours of the query's class.
    assert [figure.axes[0].get_ylabel(), figure.axes[4].get_ylabel()] == [
        "2/3",
        "1/3",
    ]
    with pytest.raises(ValueError, match="one row per query"):
        visualize.neighbor_grid(images[:3], images, indices)
