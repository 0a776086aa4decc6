"""Split batch normalization: per-group batch statistics on one device.

MoCo's shuffle BN needs the key encoder's batch statistics to be computed on
groups of the batch that differ from the groups of the query encoder. On
several devices each device is a group. On one device the official CIFAR demo
simulates 8 GPUs with a `SplitBatchNorm` that normalizes each of G slices of
the batch with its own statistics; this layer is that idea for Keras 3.
"""

import keras
from keras import ops

from moco_keras import distribute


@keras.saving.register_keras_serializable(package="moco_keras")
class SplitBatchNormalization(keras.layers.BatchNormalization):
    """Batch normalization with statistics computed per group of samples.

    In training, the batch of N samples is cut into `num_splits` contiguous
    groups of N / G samples; each group is normalized with its own mean and
    (biased) variance, as G devices each running ordinary batch normalization
    would. The moving statistics are updated with the average over the groups
    of each group's statistics, so the update equals the average of what G
    devices would each compute. In inference mode the moving statistics are
    used, exactly as in `keras.layers.BatchNormalization`. With
    `num_splits=1` the layer is `keras.layers.BatchNormalization`, except
    under a multi-replica `tf.distribute` strategy: there each replica is a
    group (its own statistics, no cross-replica BN) and the moving
    statistics are averaged over the replicas, so they stay the same on all.

    Contiguous groups (rather than the strided groups of the official CIFAR
    demo) line up with the per-device shards of a data-parallel batch, so the
    same layer is shuffle BN for a sharded global batch. Both choices give the
    same distribution of statistics for a shuffled batch.

    Args:
        num_splits: int, number of groups G (the "number of simulated
            devices"). The batch size must be divisible by it in training.
        momentum: float, moving-average momentum in Keras terms. PyTorch's
            default BN momentum 0.1 is `momentum=0.9` here.
        epsilon: float, added to the variance. 1e-5 as in PyTorch.
        **kwargs: any other `keras.layers.BatchNormalization` argument.
            Only the channels-last axis (`axis=-1`) is supported when
            `num_splits > 1`.

    Example:

    >>> layer = SplitBatchNormalization(num_splits=4)
    >>> x = keras.random.normal((8, 5, 5, 3))
    >>> tuple(layer(x, training=True).shape)
    (8, 5, 5, 3)
    """

    def __init__(self, num_splits=1, momentum=0.9, epsilon=1e-5, **kwargs):
        if not isinstance(num_splits, int) or num_splits < 1:
            raise ValueError(
                "`num_splits` must be a positive integer (the number of BN "
                f"groups). Received: num_splits={num_splits!r}"
            )
        super().__init__(momentum=momentum, epsilon=epsilon, **kwargs)
        if num_splits > 1 and self.axis != -1:
            raise ValueError(
                "SplitBatchNormalization with num_splits > 1 supports only "
                "channels-last inputs (axis=-1). Received: "
                f"axis={self.axis!r}. Use data_format='channels_last'."
            )
        self.num_splits = num_splits

    def build(self, input_shape):
        super().build(input_shape)
        # `super().build` normalizes a negative axis; keep -1 for `call`.
        self._rank = len(input_shape)

    def call(self, inputs, training=None, mask=None):
        batch_statistics = bool(training and self.trainable)
        context = distribute.replica_context() if batch_statistics else None
        if context is not None and self.axis != -1:
            context = None  # only channels-last is synchronized
        if not batch_statistics or (self.num_splits == 1 and context is None):
            return super().call(inputs, training=training, mask=mask)
        if mask is not None:
            raise NotImplementedError(
                "SplitBatchNormalization does not support masks when "
                "num_splits > 1."
            )
        batch = inputs.shape[0]
        if batch is not None and batch % self.num_splits:
            raise ValueError(
                f"The batch size ({batch}) must be divisible by the number of "
                f"BN groups (num_splits={self.num_splits}) in layer "
                f"'{self.name}'. Choose a batch size that is a multiple of "
                f"{self.num_splits}, or drop the last partial batch "
                "(`dataset.batch(..., drop_remainder=True)`)."
            )
        compute_dtype = keras.backend.result_type(inputs.dtype, "float32")
        # Statistics in float32 even under mixed precision, as Keras BN does.
        x = ops.cast(inputs, compute_dtype)
        inner_shape = tuple(ops.shape(x)[1:])
        x = ops.reshape(x, (self.num_splits, -1) + inner_shape)
        # Reduce over the samples of a group and every spatial axis.
        axes = tuple(range(1, self._rank))
        mean, variance = ops.moments(x, axes=axes, keepdims=True)
        inv = ops.rsqrt(variance + self.epsilon)
        if self.scale:
            inv = inv * ops.cast(self.gamma, compute_dtype)
        shift = -mean * inv
        if self.center:
            shift = shift + ops.cast(self.beta, compute_dtype)
        outputs = ops.reshape(x * inv + shift, ops.shape(inputs))

        channels = (inputs.shape[-1],)
        group_mean = ops.reshape(ops.mean(mean, axis=0), channels)
        group_variance = ops.reshape(ops.mean(variance, axis=0), channels)
        if context is not None:
            # Each tf.distribute replica normalizes with its own statistics
            # (each replica is a group); the moving statistics take their
            # average, as one device with a group per replica does, so that
            # every replica keeps the same ones.
            group_mean = distribute.mean_over_replicas(context, group_mean)
            group_variance = distribute.mean_over_replicas(
                context, group_variance
            )
        self.moving_mean.assign(
            self.moving_mean * self.momentum
            + group_mean * (1.0 - self.momentum)
        )
        self.moving_variance.assign(
            self.moving_variance * self.momentum
            + group_variance * (1.0 - self.momentum)
        )
        return ops.cast(outputs, self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config["num_splits"] = self.num_splits
        return config
