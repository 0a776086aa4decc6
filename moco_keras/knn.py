"""Weighted kNN classification on frozen features: MoCo's training monitor.

As the official CIFAR-10 demo's `knn_predict` (after Wu et al., 2018): each
test feature votes with its k most similar training features (cosine
similarity), each vote weighted by `exp(similarity / t)`; k = 200 and
t = 0.1 there.
"""

import keras
import numpy as np
from keras import ops


def knn_predict(features, bank, bank_labels, num_classes, k=200, t=0.1):
    """Class scores of `features` by weighted voting of their neighbours.

    Args:
        features: `N x D` L2-normalized test features.
        bank: `M x D` L2-normalized training features.
        bank_labels: `M` int labels of the bank.
        num_classes: number of classes.
        k: number of neighbours.
        t: temperature of the vote weights.

    Returns:
        `N x num_classes` scores; `argmax` is the prediction.
    """
    k = min(k, ops.shape(bank)[0])
    similarity = ops.matmul(features, ops.transpose(bank))  # N x M
    weights, indices = ops.top_k(similarity, k=k)  # N x k
    labels = ops.take(bank_labels, indices)  # N x k
    votes = ops.one_hot(labels, num_classes)  # N x k x classes
    weights = ops.exp(weights / t)[..., None]  # N x k x 1
    return ops.sum(votes * weights, axis=1)  # N x classes


def embed(encoder, images, batch_size=512, normalize=True):
    """`encoder` outputs of `images` in inference mode, L2-normalized unless
    `normalize` is False."""
    # `predict` runs compiled and without gradient tracking on each backend.
    features = encoder.predict(images, batch_size=batch_size, verbose=0)
    features = np.asarray(features, np.float32)
    if not normalize:
        return features
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def nearest_neighbors(features, bank, k=5, exclude_self=False):
    """Indices of the `k` most similar bank rows of each feature row.

    Args:
        features: `N x D` L2-normalized features (the queries).
        bank: `M x D` L2-normalized features to search.
        k: number of neighbours.
        exclude_self: the queries are the first `N` rows of the bank (or
            the bank itself): leave each one out of its own neighbours.

    Returns:
        `N x k` int numpy indices into `bank`, most similar first.
    """
    similarity = ops.matmul(
        ops.convert_to_tensor(features), ops.transpose(bank)
    )  # N x M
    if exclude_self:
        n, m = ops.shape(similarity)
        similarity = similarity - 3.0 * ops.eye(n, m)  # below any cosine
    _, indices = ops.top_k(similarity, k=k)  # N x k
    return ops.convert_to_numpy(indices)


def knn_accuracy(
    bank,
    bank_labels,
    features,
    labels,
    num_classes,
    k=200,
    t=0.1,
    batch_size=1024,
):
    """Top-1 accuracy (in [0, 1]) of `knn_predict`, in batches of tests."""
    bank = ops.convert_to_tensor(bank)
    bank_labels = ops.convert_to_tensor(np.asarray(bank_labels, np.int32))
    correct = 0
    for start in range(0, len(features), batch_size):
        batch = ops.convert_to_tensor(features[start : start + batch_size])
        scores = knn_predict(batch, bank, bank_labels, num_classes, k, t)
        predictions = ops.convert_to_numpy(ops.argmax(scores, axis=1))
        correct += int(
            np.sum(predictions == labels[start : start + batch_size])
        )
    return correct / len(features)


def flatten_normalize(images):
    """Rows flattened and L2-normalized: raw pixels, or any features."""
    flat = np.asarray(images, np.float32).reshape(len(images), -1)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)


class KNNMonitor(keras.callbacks.Callback):
    """Logs the kNN top-1 of the model's query encoder every few epochs.

    The bank and test images must be prepared as the encoder expects them
    (normalized, `N x H x W x 3`). Adds `knn_top1` to the epoch logs, so it
    reaches the progress bar, `History`, CSV and TensorBoard loggers.

    Args:
        bank_images: the training images of the memory bank.
        bank_labels: their labels.
        test_images: the images to classify.
        test_labels: their labels.
        num_classes: number of classes.
        every: evaluate after every `every`-th epoch (and the first).
        features: "backbone" (pooled encoder features) or "head" (the
            normalized MoCo embedding).
        k: the neighbours that vote, as in `knn_predict`.
        t: the temperature of the votes' weights, as in `knn_predict`.

    Example:

    ```python
    monitor = KNNMonitor(bank, bank_labels, test, test_labels, 10, every=2)
    model.fit(pairs, epochs=8, callbacks=[monitor])
    monitor.accuracies  # [(1, 0.71), (3, 0.74), ...]: (epoch, top-1)
    ```
    """

    def __init__(
        self,
        bank_images,
        bank_labels,
        test_images,
        test_labels,
        num_classes,
        every=1,
        features="backbone",
        k=200,
        t=0.1,
    ):
        super().__init__()
        if features not in ("backbone", "head"):
            raise ValueError(
                f"features must be 'backbone' or 'head'. Received: {features!r}"
            )
        self.bank_images, self.bank_labels = bank_images, bank_labels
        self.test_images, self.test_labels = test_images, test_labels
        self.num_classes, self.every = num_classes, every
        self.features, self.k, self.t = features, k, t
        self.accuracies = []

    def evaluate(self):
        encoder = (
            self.model.encoder_q if self.features == "backbone" else self.model
        )
        bank = embed(encoder, self.bank_images)
        test = embed(encoder, self.test_images)
        return knn_accuracy(
            bank,
            self.bank_labels,
            test,
            self.test_labels,
            self.num_classes,
            self.k,
            self.t,
        )

    def on_epoch_end(self, epoch, logs=None):
        last = self.params.get("epochs", 0) - 1
        if epoch % self.every and epoch != last:
            if logs is not None:
                # A steady set of keys: CSV loggers fix their columns on
                # the first epoch.
                logs["knn_top1"] = float("nan")
            return
        accuracy = self.evaluate()
        self.accuracies.append((epoch + 1, accuracy))
        if logs is not None:
            logs["knn_top1"] = accuracy
