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


def at_least_float32(dtype):
    """`dtype`, or float32 for a 16-bit float: what statistics and losses
    are computed in. (`keras.backend.result_type(dtype, "float32")` would
    give float32 for float64 too, under JAX and torch.)"""
    dtype = keras.backend.standardize_dtype(dtype)
    return "float32" if dtype in ("float16", "bfloat16") else dtype


@keras.saving.register_keras_serializable(package="moco_keras")
class SplitBatchNormalization(keras.layers.BatchNormalization):
    """Batch normalization with statistics computed per group of samples.

    In training, the batch of N samples is cut into `num_splits` contiguous
    groups of N / G samples; each group is normalized with its own mean and
    (biased) variance, as G devices each running ordinary batch normalization
    would. The moving statistics are updated with the average over the groups
    of each group's mean and unbiased variance (`n / (n - 1)` times the
    biased one, `n` the values per channel of a group: samples times
    positions), so the update equals the average of what G devices running
    `torch.nn.BatchNorm2d` would each compute, and the official CIFAR demo's
    `SplitBatchNorm`. Keras' own BN keeps the biased variance; torch's
    rule is kept here because the official MoCo code trains with it, and
    evaluation reads the moving statistics. In inference mode the moving
    statistics are used, exactly as in `keras.layers.BatchNormalization`.
    With `num_splits=1` the layer is `keras.layers.BatchNormalization` but
    for that rule, and except under a multi-replica `tf.distribute`
    strategy: there each replica is a group (its own statistics, no
    cross-replica BN) and the moving statistics are averaged over the
    replicas, so they stay the same on all.

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
        **kwargs: any other `keras.layers.BatchNormalization` argument,
            `axis` among them (`axis=1` for channels-first inputs), and
            `synchronized=True` (TensorFlow only, with `num_splits=1`):
            statistics over the global batch of all `tf.distribute`
            replicas, PyTorch's SyncBN, which MoCo v3 trains with.

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
        if kwargs.get("renorm"):
            raise ValueError(
                "SplitBatchNormalization has no batch renormalization "
                "(`renorm=True`): use keras.layers.BatchNormalization."
            )
        if kwargs.get("synchronized") and num_splits != 1:
            raise ValueError(
                "`synchronized=True` normalizes over the global batch, "
                "`num_splits` over groups of it: pass one of them. Received: "
                f"num_splits={num_splits}"
            )
        super().__init__(momentum=momentum, epsilon=epsilon, **kwargs)
        self.num_splits = num_splits

    def build(self, input_shape):
        super().build(input_shape)
        self._rank = len(input_shape)

    def call(self, inputs, training=None, mask=None):
        # Statistics in float32 even under mixed precision, as Keras BN
        # does; float64 stays float64.
        compute_dtype = at_least_float32(inputs.dtype)
        x = ops.cast(inputs, compute_dtype)
        if not (training and self.trainable):
            # Inference mode: the moving statistics.
            outputs = self._batch_normalize(
                x,
                ops.cast(self.moving_mean, compute_dtype),
                ops.cast(self.moving_variance, compute_dtype),
            )
            return ops.cast(outputs, self.compute_dtype)
        context = None if self.synchronized else distribute.replica_context()
        torch_backend = keras.backend.backend() == "torch"
        # Keras' moments: with a mask, across replicas (SyncBN), or for one
        # group off torch (on torch, one group too takes the fused kernel of
        # `_torch_normalize`).
        keras_moments = (
            self.synchronized
            or mask is not None
            or (self.num_splits == 1 and context is None and not torch_backend)
        )
        if keras_moments:
            if mask is not None and (
                self.num_splits > 1 or context is not None
            ):
                raise NotImplementedError(
                    "SplitBatchNormalization does not support masks with "
                    "groups (num_splits > 1 or tf.distribute replicas)."
                )
            # One group: the batch (its unmasked positions), or with
            # `synchronized` the global batch of all replicas.
            mean, variance = self._moments(x, mask)
            outputs = self._batch_normalize(x, mean, variance)
            # Under `synchronized` the statistics span every replica's
            # batch (equal batches: MoCo drops the remainder).
            count = self._count(x, mask) * (
                distribute.num_replicas() if self.synchronized else 1
            )
        else:
            self._check_divisible(inputs.shape[0])
            if torch_backend:
                outputs, mean, variance = self._torch_normalize(
                    x, compute_dtype
                )
            else:
                outputs, mean, variance = self._normalize(x, compute_dtype)
            channels = (inputs.shape[self.axis],)
            # Sums over the groups, not `ops.mean`: Keras' mean runs in
            # float32 on JAX and torch even for float64.
            mean = ops.sum(ops.reshape(mean, (-1,) + channels), axis=0)
            mean = mean / self.num_splits
            variance = ops.sum(ops.reshape(variance, (-1,) + channels), axis=0)
            variance = variance / self.num_splits
            count = self._count(x, None) // self.num_splits
            if context is not None:
                # Each tf.distribute replica normalizes with its own
                # statistics (each replica is a group); the moving statistics
                # take their average, as one device with a group per replica
                # does, so that every replica keeps the same ones.
                mean = distribute.mean_over_replicas(context, mean)
                variance = distribute.mean_over_replicas(context, variance)
        self._update_moving_statistics(mean, variance, count)
        return ops.cast(outputs, self.compute_dtype)

    def _batch_normalize(self, x, mean, variance):
        """`x` normalized with `mean` and `variance`, then gamma and beta."""
        return ops.batch_normalization(
            x,
            mean,
            variance,
            axis=self.axis,
            offset=ops.cast(self.beta, x.dtype) if self.center else None,
            scale=ops.cast(self.gamma, x.dtype) if self.scale else None,
            epsilon=self.epsilon,
        )

    def _check_divisible(self, batch):
        if batch is not None and batch % self.num_splits:
            raise ValueError(
                f"The batch size ({batch}) must be divisible by the number of "
                f"BN groups (num_splits={self.num_splits}) in layer "
                f"'{self.name}'. Choose a batch size that is a multiple of "
                f"{self.num_splits}, or drop the last partial batch "
                "(`dataset.batch(..., drop_remainder=True)`)."
            )

    def _count(self, x, mask):
        """Values per channel that the statistics reduced: every axis but
        the channels' (the unmasked positions with a mask)."""
        if mask is not None:
            return ops.sum(ops.cast(mask, x.dtype))
        shape = ops.shape(x)
        count = 1
        for axis in range(self._rank):
            if axis != self.axis % self._rank:
                count = count * shape[axis]
        return count

    def _update_moving_statistics(self, mean, variance, count):
        """torch's rule: the moving variance takes the unbiased batch
        variance, `variance * n / (n - 1)` for the `n` values per channel of
        a group, while the batch itself is normalized with the biased one.
        torch's `BatchNorm1d/2d` and `SyncBatchNorm` (the official code's)
        do so, so the moving statistics that evaluation reads and that a
        converted official checkpoint carries follow one rule. One value
        per channel (`n = 1`) has no variance: refused, as torch refuses
        it."""
        if isinstance(count, int) and count < 2:
            raise ValueError(
                f"Layer '{self.name}' got {count} value per channel in a "
                "training group: a batch variance needs at least 2. Use a "
                "larger batch per group (batch / num_splits, per replica)."
            )
        count = ops.cast(count, variance.dtype)
        unbiased = variance * count / ops.maximum(count - 1.0, 1.0)
        self.moving_mean.assign(
            self.moving_mean * self.momentum + mean * (1.0 - self.momentum)
        )
        self.moving_variance.assign(
            self.moving_variance * self.momentum
            + unbiased * (1.0 - self.momentum)
        )

    def _normalize(self, x, compute_dtype):
        """Each group normalized with its statistics, in `keras.ops`.

        Returns the normalized `x` and the per-group mean and (biased)
        variance, each of shape `(num_splits, channels)` once reshaped.
        """
        inner_shape = tuple(ops.shape(x)[1:])
        x = ops.reshape(x, (self.num_splits, -1) + inner_shape)
        # In the grouped tensor the channels sit one axis further on; reduce
        # over the samples of a group and every other axis.
        channel_axis = self.axis % self._rank + 1
        axes = tuple(a for a in range(1, self._rank + 1) if a != channel_axis)
        mean, variance = ops.moments(x, axes=axes, keepdims=True)
        # gamma and beta broadcast against the grouped tensor.
        broadcast = [1] * (self._rank + 1)
        broadcast[channel_axis] = inner_shape[channel_axis - 2]
        inv = ops.rsqrt(variance + self.epsilon)
        if self.scale:
            inv = inv * ops.reshape(
                ops.cast(self.gamma, compute_dtype), broadcast
            )
        shift = -mean * inv
        if self.center:
            shift = shift + ops.reshape(
                ops.cast(self.beta, compute_dtype), broadcast
            )
        outputs = ops.reshape(x * inv + shift, (-1,) + inner_shape)
        return outputs, mean, variance

    def _torch_normalize(self, x, compute_dtype):
        """`_normalize` with PyTorch's fused batch-norm kernel per group.

        Keras' ops give the torch backend about ten elementwise kernels and
        their backward per normalization; `torch.native_batch_norm` is one
        kernel each way, and it returns the group's mean and inverse
        deviation. The groups are contiguous slices of the batch (views), as
        in `_normalize`.
        """
        import torch

        axis = self.axis % self._rank
        x = torch.movedim(x, axis, 1) if axis != 1 else x
        weight = ops.cast(self.gamma, compute_dtype) if self.scale else None
        bias = ops.cast(self.beta, compute_dtype) if self.center else None
        results = [
            torch.native_batch_norm(
                group, weight, bias, None, None, True, 0.0, self.epsilon
            )
            for group in torch.chunk(x, self.num_splits, dim=0)
        ]
        outputs = (
            torch.cat([r[0] for r in results])
            if len(results) > 1
            else (results[0][0])
        )
        outputs = torch.movedim(outputs, 1, axis) if axis != 1 else outputs
        mean = torch.stack([r[1] for r in results]).detach()
        invstd = torch.stack([r[2] for r in results]).detach()
        variance = invstd.pow(-2) - self.epsilon
        return outputs, mean, variance

    def get_config(self):
        config = super().get_config()
        config["num_splits"] = self.num_splits
        return config
