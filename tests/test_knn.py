import keras
import numpy as np
from conftest import make_moco
from conftest import random_images
from conftest import tiny_resnet

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
    model = make_moco(tiny_resnet(bn_splits=2), queue_size=8)
    history = model.fit(
        images, images, batch_size=8, epochs=3, callbacks=[monitor], verbose=0
    )
    assert [epoch for epoch, _ in monitor.accuracies] == [1, 3]
    assert all(0.0 <= a <= 1.0 for _, a in monitor.accuracies)
    assert "knn_top1" in history.history
