import keras
import numpy as np
import pytest
from support import random_images
from support import run_serialization_test

from moco_keras import SplitBatchNormalization


def test_one_split_normalizes_as_batch_normalization():
    """The batch, gamma, beta and the moving mean as Keras' BN; the moving
    variance by torch's rule (`test_moving_statistics_equal_torch...`)."""
    x = random_images(8, (3, 3, 5)) * 3 + 1
    split = SplitBatchNormalization(num_splits=1, momentum=0.9, epsilon=1e-5)
    plain = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
    for layer in (split, plain):
        layer.build(x.shape)
        layer.gamma.assign(np.linspace(0.5, 2.0, 5))
        layer.beta.assign(np.linspace(-1.0, 1.0, 5))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(split(x, training=True)),
        keras.ops.convert_to_numpy(plain(x, training=True)),
        atol=1e-6,
    )
    for a, b in zip(split.weights, plain.weights, strict=True):
        if "moving_variance" in a.path:
            continue
        # The torch backend's fused kernel sums in another order.
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(a),
            keras.ops.convert_to_numpy(b),
            rtol=1e-6,
        )


def test_each_group_is_normalized_with_its_own_statistics():
    groups, per_group, channels = 4, 3, 2
    x = random_images(groups * per_group, (2, 2, channels))
    # Group g has mean 10 * g: one shared mean would not centre any group.
    x = x + 10.0 * np.repeat(np.arange(groups), per_group)[:, None, None, None]
    layer = SplitBatchNormalization(num_splits=groups)
    y = keras.ops.convert_to_numpy(layer(x, training=True))
    y = y.reshape(groups, per_group * 4, channels)
    np.testing.assert_allclose(y.mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=1), 1.0, atol=1e-3)

    grouped = x.reshape(groups, per_group * 4, channels)
    expected_mean = 0.1 * grouped.mean(axis=1).mean(axis=0)
    # torch's rule: each group's unbiased variance (12 values per channel).
    expected_var = 0.9 + 0.1 * grouped.var(axis=1, ddof=1).mean(axis=0)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer.moving_mean), expected_mean, rtol=1e-5
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer.moving_variance),
        expected_var,
        rtol=1e-5,
    )


def test_inference_uses_moving_statistics():
    x = random_images(8, (2, 2, 3))
    split = SplitBatchNormalization(num_splits=4)
    plain = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
    split.build(x.shape)
    plain.build(x.shape)
    for layer in (split, plain):
        layer.moving_mean.assign([0.5, -1.0, 2.0])
        layer.moving_variance.assign([4.0, 0.25, 1.0])
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(split(x, training=False)),
        keras.ops.convert_to_numpy(plain(x, training=False)),
        atol=1e-6,
    )


def test_batch_not_divisible_by_splits_is_a_clear_error():
    layer = SplitBatchNormalization(num_splits=4)
    with pytest.raises(
        ValueError, match="divisible by the number of BN groups"
    ):
        layer(random_images(6, (2, 2, 3)), training=True)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_splits"):
        SplitBatchNormalization(num_splits=0)
    with pytest.raises(ValueError, match="renorm"):
        SplitBatchNormalization(renorm=True)
    # One value per channel in a group has no variance (torch refuses it).
    with pytest.raises(ValueError, match="1 value per channel"):
        SplitBatchNormalization(num_splits=2)(
            random_images(2, (3,)), training=True
        )


def _interleave(x, groups):
    """The batch in the order in which the official `SplitBatchNorm`'s
    `view(-1, C * G, H, W)` makes group g of samples g, g + G, ...: our
    contiguous group g is its group g."""
    per_group = x.shape[0] // groups
    return np.ascontiguousarray(
        np.concatenate([x[g::per_group] for g in range(per_group)])
    )


def _steps(layer, batches):
    """Three training steps of `layer`; its outputs, moving statistics."""
    outputs = [
        keras.ops.convert_to_numpy(layer(batch, training=True))
        for batch in batches
    ]
    moving = [
        keras.ops.convert_to_numpy(v)
        for v in (layer.moving_mean, layer.moving_variance)
    ]
    return outputs, moving


@pytest.mark.parametrize("axis", [-1, 1])
@pytest.mark.parametrize("per_group", [8, 32])
def test_moving_statistics_equal_torch_split_batch_norm(per_group, axis):
    """Three steps on groups of `per_group` 6 x 6 images against the
    official CIFAR demo's `SplitBatchNorm` (torch's `BatchNorm2d` per group,
    the running statistics averaged over the groups): the unbiased
    variance, `n / (n - 1)` with n = per_group * 36, in the moving
    variance."""
    import torch
    from torch_moco import SplitBatchNorm

    groups, channels = 2, 3
    rng = np.random.default_rng(per_group)
    batches = [
        (rng.normal(size=(groups * per_group, 6, 6, channels)) * 2 + 1).astype(
            "float32"
        )
        for _ in range(3)
    ]
    gamma = np.linspace(0.5, 2.0, channels).astype("float32")
    beta = np.linspace(-1.0, 1.0, channels).astype("float32")
    layer = SplitBatchNormalization(num_splits=groups, axis=axis)
    nchw = [np.transpose(b, (0, 3, 1, 2)) for b in batches]
    layer.build(nchw[0].shape if axis == 1 else batches[0].shape)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    outputs, moving = _steps(layer, nchw if axis == 1 else batches)
    official = SplitBatchNorm(channels, groups).train()
    with torch.no_grad():
        official.weight.copy_(torch.from_numpy(gamma))
        official.bias.copy_(torch.from_numpy(beta))
        for step, batch in enumerate(nchw):
            expected = official(torch.from_numpy(_interleave(batch, groups)))
            ours = outputs[step]
            ours = ours if axis == 1 else np.transpose(ours, (0, 3, 1, 2))
            np.testing.assert_allclose(
                _interleave(ours, groups), expected.numpy(), atol=1e-5
            )
    _assert_moving_statistics_equal(moving, official)


def _assert_moving_statistics_equal(moving, torch_layer):
    """(moving mean, moving variance) against a torch BN's running
    statistics, within 1e-5 relative."""
    np.testing.assert_allclose(
        moving[0], torch_layer.running_mean.numpy(), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        moving[1], torch_layer.running_var.numpy(), rtol=1e-5
    )


@pytest.mark.parametrize("batch", [16, 64])
def test_moving_statistics_equal_torch_batch_norm_1d(batch):
    """MoCo v3's projector and predictor BN: (N, C) inputs, one group,
    against `torch.nn.BatchNorm1d` over three steps."""
    import torch

    rng = np.random.default_rng(batch)
    batches = [
        (rng.normal(size=(batch, 5)) * 3 - 1).astype("float32")
        for _ in range(3)
    ]
    layer = SplitBatchNormalization()
    _, moving = _steps(layer, batches)
    reference = torch.nn.BatchNorm1d(5).train()
    with torch.no_grad():
        for x in batches:
            reference(torch.from_numpy(x))
    _assert_moving_statistics_equal(moving, reference)


@pytest.mark.parametrize("splits", [1, 4])
def test_channels_first_equals_channels_last(splits):
    x = random_images(8, (3, 3, 5)) * 2 + 1
    last = SplitBatchNormalization(num_splits=splits)
    first = SplitBatchNormalization(num_splits=splits, axis=1)
    last.build(x.shape)
    first.build((8, 5, 3, 3))
    for layer in (last, first):
        layer.gamma.assign(np.linspace(0.5, 2.0, 5))
        layer.beta.assign(np.linspace(-1.0, 1.0, 5))
    y_last = keras.ops.convert_to_numpy(last(x, training=True))
    y_first = keras.ops.convert_to_numpy(
        first(np.transpose(x, (0, 3, 1, 2)), training=True)
    )
    np.testing.assert_allclose(
        np.transpose(y_first, (0, 2, 3, 1)), y_last, atol=1e-5
    )
    for a, b in zip(first.weights, last.weights, strict=True):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(a),
            keras.ops.convert_to_numpy(b),
            rtol=1e-5,
        )


class _Images(keras.layers.Layer):
    """Outputs a trainable tensor, so that one SGD step reveals dL/dx."""

    def __init__(self, images, **kwargs):
        super().__init__(**kwargs)
        self.images = self.add_weight(
            shape=images.shape, initializer=keras.initializers.Constant(images)
        )

    def call(self, inputs):
        return self.images + 0.0 * keras.ops.sum(inputs)


def _reference_gradients(x, dy, gamma, groups, axis):
    """dL/dx, dL/dgamma, dL/dbeta of training-mode BN per group, in numpy."""
    x = np.moveaxis(x, axis, -1)
    dy = np.moveaxis(dy, axis, -1)
    channels = x.shape[-1]
    xs = x.reshape(groups, -1, channels)
    dys = dy.reshape(groups, -1, channels)
    mean = xs.mean(axis=1, keepdims=True)
    invstd = 1 / np.sqrt(xs.var(axis=1, keepdims=True) + 1e-5)
    xhat = (xs - mean) * invstd
    count = xs.shape[1]
    dx = (
        gamma
        * invstd
        / count
        * (
            count * dys
            - dys.sum(axis=1, keepdims=True)
            - xhat * (dys * xhat).sum(axis=1, keepdims=True)
        )
    )
    dgamma = (dys * xhat).sum(axis=(0, 1))
    dbeta = dys.sum(axis=(0, 1))
    dx = np.moveaxis(dx.reshape(x.shape), -1, axis)
    return dx, dgamma, dbeta


@pytest.mark.parametrize("splits,axis", [(1, -1), (4, -1), (1, 1), (4, 1)])
def test_gradients_are_batch_normalization_per_group(splits, axis):
    """The backward pass, on every backend's path (the torch backend runs
    PyTorch's fused kernel, the others `keras.ops`), against the formula:
    one SGD step of rate 1 moves each variable by minus its gradient."""
    shape = (8, 5, 3, 3) if axis == 1 else (8, 3, 3, 5)
    x = random_images(8, shape[1:], seed=1) * 2 + 1
    dy = random_images(8, shape[1:], seed=2)
    gamma = np.linspace(0.5, 2.0, 5).astype("float32")
    bn = SplitBatchNormalization(num_splits=splits, axis=axis)
    inputs = keras.Input((1,))
    model = keras.Model(inputs, bn(_Images(x)(inputs)))
    bn.gamma.assign(gamma)
    model.compile(
        optimizer=keras.optimizers.SGD(1.0),
        # sum(dy * y), so that dL/dy = dy.
        loss=lambda target, y: keras.ops.sum(target * y),
    )
    model.fit(
        np.zeros((8, 1)), dy, batch_size=8, epochs=1, verbose=0, shuffle=False
    )
    dx, dgamma, dbeta = _reference_gradients(x, dy, gamma, splits, axis)
    images = model.layers[1].images
    np.testing.assert_allclose(
        x - keras.ops.convert_to_numpy(images), dx, atol=2e-4
    )
    np.testing.assert_allclose(
        gamma - keras.ops.convert_to_numpy(bn.gamma), dgamma, rtol=1e-4
    )
    np.testing.assert_allclose(
        -keras.ops.convert_to_numpy(bn.beta), dbeta, rtol=1e-4, atol=1e-5
    )


def test_config_round_trip():
    layer = SplitBatchNormalization(num_splits=8, name="bn1")
    clone = run_serialization_test(layer)
    assert clone.num_splits == 8
    assert clone.epsilon == 1e-5
    assert clone.momentum == 0.9
