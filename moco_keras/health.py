"""How a run's features are doing, without labels: the `HEALTH` measures.

Computed in the training step of `moco.MoCo` and `mocov3.MoCoV3` from the
step's own queries, keys and similarities (`health=True`), and logged with
the loss: alignment and uniformity (Wang and Isola, "Understanding
Contrastive Representation Learning through Alignment and Uniformity on
the Hypersphere", ICML 2020), the queries' spread per dimension, and the
positive and negative similarities. docs/monitoring.md reads them.
"""

import keras
from keras import ops

# The feature measures `MoCo(health=True)` tracks, in the order logged.
HEALTH = ("alignment", "uniformity", "q_std", "l_pos", "l_neg", "l_neg_max")


@keras.saving.register_keras_serializable(package="moco_keras")
class HealthMetric(keras.metrics.Metric):
    """The running means of the `HEALTH` measures, as one metric.

    One vector of sums and one count, so that a step carries two metric
    variables rather than two per measure; `result()` is a dict, which
    Keras spreads into the logs under the measures' names.

    Example:

    >>> metric = HealthMetric()
    >>> metric.update_state({name: 1.0 for name in HEALTH})
    >>> sorted(metric.result()) == sorted(HEALTH)
    True
    """

    def __init__(self, name="health", **kwargs):
        super().__init__(name=name, **kwargs)
        self.totals = self.add_variable(
            shape=(len(HEALTH),), initializer="zeros", name="totals"
        )
        self.count = self.add_variable(
            shape=(), initializer="zeros", name="count"
        )

    def update_state(self, measures):
        values = ops.stack(
            [ops.cast(measures[name], "float32") for name in HEALTH]
        )  # len(HEALTH)
        self.totals.assign_add(values)
        self.count.assign_add(1.0)

    def result(self):
        means = self.totals / ops.maximum(self.count, 1.0)  # len(HEALTH)
        return {name: means[i] for i, name in enumerate(HEALTH)}

    def reset_state(self):
        self.totals.assign(ops.zeros((len(HEALTH),)))
        self.count.assign(0.0)


def health_measures(q, k, l_pos, l_neg):
    """How the step's features are doing, from what the step computed.

    Args:
        q: the normalized queries, `N x C`.
        k: their normalized positive keys, `N x C`.
        l_pos: `q . k` per query, `N x 1`.
        l_neg: `q @ queue`, `N x K`.

    Returns:
        A dict of scalars, the `HEALTH` names: `alignment`, E ||q - k||^2
        over the positive pairs (0 when the two views map alike; lower is
        better); `uniformity`, log E exp(-2 ||q_i - q_j||^2) over the
        batch's distinct pairs (Wang and Isola's t = 2: -4 for orthogonal
        features, 0 when all collapse to one point; lower is better);
        `q_std`, the standard deviation over the batch of each dimension,
        averaged (about 1/sqrt(C) spread out, 0 collapsed); `l_pos`,
        `l_neg`, the mean positive and negative cosine similarities;
        `l_neg_max`, each query's largest negative, averaged.

    Example:

    >>> import numpy as np
    >>> q = np.eye(4, dtype="float32")
    >>> m = health_measures(q, q, np.ones((4, 1)), np.zeros((4, 8)))
    >>> round(float(m["alignment"]), 4), round(float(m["uniformity"]), 4)
    (0.0, -4.0)
    """
    q = ops.stop_gradient(ops.convert_to_tensor(q, "float32"))  # N x C
    k = ops.stop_gradient(ops.convert_to_tensor(k, "float32"))  # N x C
    l_pos = ops.stop_gradient(ops.convert_to_tensor(l_pos, "float32"))  # N x 1
    l_neg = ops.stop_gradient(ops.convert_to_tensor(l_neg, "float32"))  # N x K
    n = ops.shape(q)[0]
    alignment = ops.mean(ops.sum(ops.square(q - k), axis=1))  # ()
    similarity = ops.matmul(q, ops.transpose(q))  # N x N
    # ||q_i - q_j||^2 = 2 - 2 q_i . q_j for unit vectors.
    kernel = ops.exp(-2.0 * (2.0 - 2.0 * similarity))  # N x N
    distinct = 1.0 - ops.eye(n, dtype="float32")  # N x N, off the diagonal
    pairs = ops.maximum(ops.cast(n * (n - 1), "float32"), 1.0)  # ()
    uniformity = ops.log(ops.sum(kernel * distinct) / pairs)  # ()
    return {
        "alignment": alignment,
        "uniformity": uniformity,
        "q_std": ops.mean(ops.std(q, axis=0)),  # ()
        "l_pos": ops.mean(l_pos),  # ()
        "l_neg": ops.mean(l_neg),  # ()
        "l_neg_max": ops.mean(ops.max(l_neg, axis=1)),  # ()
    }
