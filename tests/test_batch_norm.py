import keras
import numpy as np
import pytest
from conftest import random_images
from conftest import run_serialization_test

from moco_keras import SplitBatchNormalization


def test_one_split_is_batch_normalization():
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
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
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
    expected_var = 0.9 + 0.1 * grouped.var(axis=1).mean(axis=0)
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
    with pytest.raises(ValueError, match="channels-last"):
        SplitBatchNormalization(num_splits=2, axis=1)


def test_config_round_trip():
    layer = SplitBatchNormalization(num_splits=8, name="bn1")
    clone = run_serialization_test(layer)
    assert clone.num_splits == 8
    assert clone.epsilon == 1e-5
    assert clone.momentum == 0.9
