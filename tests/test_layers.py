"""The in-model colour path matches the per-image tf.data path."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import dense_encoder
from conftest import make_moco
from keras import ops

from moco_keras import augment
from moco_keras import data
from moco_keras import layers

V1 = augment.get_augmentation("mocov1", size=16)
V2 = augment.get_augmentation("mocov2", size=16)


def _numpy(x):
    return ops.convert_to_numpy(x)


def _jitter_draws(n, rng, hue=0.1):
    factors = np.stack(
        [rng.uniform(0.6, 1.4, n) for _ in range(3)]
        + [rng.uniform(-hue, hue, n)],
        axis=1,
    ).astype("float32")
    order = np.stack([rng.permutation(4) for _ in range(n)]).astype("int32")
    return factors, order


def test_batched_ops_equal_the_per_image_tf_ops():
    rng = np.random.default_rng(0)
    images = rng.random((12, 10, 14, 3)).astype("float32")
    factors, order = _jitter_draws(12, rng, hue=0.5)
    out = _numpy(layers.color_jitter(images, factors, order))
    for i in range(12):
        ref = augment.apply_color_jitter(
            tf.constant(images[i]), tf.constant(factors[i]), order[i]
        )
        np.testing.assert_allclose(out[i], ref.numpy(), atol=1e-5)
    sigma = rng.uniform(0.1, 2.0, 12).astype("float32")
    out = _numpy(layers.gaussian_blur(images, sigma))
    for i in range(12):
        ref = augment.gaussian_blur(tf.constant(images[i]), sigma[i])
        np.testing.assert_allclose(out[i], ref.numpy(), atol=1e-5)
    out = _numpy(layers.grayscale(images))
    ref = augment._grayscale(tf.constant(images)).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_parameters_follow_the_torchvision_distributions():
    layer = layers.ColorAugmentation.from_augmentation(V2, seed=3)
    p = {k: _numpy(v) for k, v in layer.sample_parameters(4000).items()}
    b, c, s, h = p["factors"].T
    for factor in (b, c, s):
        assert 0.6 <= factor.min() < 0.61 and 1.39 < factor.max() <= 1.4
        assert abs(factor.mean() - 1.0) < 0.02
    assert -0.1 <= h.min() < -0.099 and 0.099 < h.max() <= 0.1
    np.testing.assert_array_equal(np.sort(p["order"], 1), [[0, 1, 2, 3]] * 4000)
    assert len({tuple(o) for o in p["order"]}) == 24  # every order occurs
    assert abs(p["jitter"].mean() - 0.8) < 0.025
    assert abs(p["grayscale"].mean() - 0.2) < 0.025
    assert abs(p["blur"].mean() - 0.5) < 0.03
    assert 0.1 <= p["sigma"].min() < 0.11 and 1.99 < p["sigma"].max() <= 2.0
    # Draws are per image and independent of one another.
    assert abs(np.corrcoef(b, c)[0, 1]) < 0.05
    assert abs(np.corrcoef(p["jitter"], p["grayscale"])[0, 1]) < 0.05


@pytest.mark.parametrize("config", [V1, V2], ids=["mocov1", "mocov2"])
def test_augment_composes_the_ops_in_the_preset_order(config):
    layer = layers.ColorAugmentation.from_augmentation(config, seed=0)
    rng = np.random.default_rng(1)
    images = rng.random((16, 12, 12, 3)).astype("float32")
    parameters = layer.sample_parameters(16)
    out = _numpy(layer.augment(images, parameters))
    p = {k: _numpy(v) for k, v in parameters.items()}
    for i in range(16):
        x = tf.constant(images[i])
        if config["grayscale_first"] and p["grayscale"][i]:
            x = augment._grayscale(x)
        if p["jitter"][i]:
            x = augment.apply_color_jitter(x, p["factors"][i], p["order"][i])
        if not config["grayscale_first"] and p["grayscale"][i]:
            x = augment._grayscale(x)
        if config["blur_p"] > 0 and p["blur"][i]:
            x = augment.gaussian_blur(x, p["sigma"][i])
        np.testing.assert_allclose(out[i], x.numpy(), atol=1e-5)


def test_call_normalizes_and_augments_only_in_training():
    layer = layers.ColorAugmentation.from_augmentation(V2, seed=0)
    crops = np.random.default_rng(2).integers(0, 256, (8, 16, 16, 3), "uint8")
    expected = (crops / 255.0 - np.array(V2["mean"])) / np.array(V2["std"])
    np.testing.assert_allclose(
        _numpy(layer(crops, training=False)), expected, atol=1e-5
    )
    first = _numpy(layer(crops, training=True))
    second = _numpy(layer(crops, training=True))
    assert not np.allclose(first, expected, atol=1e-3)
    assert not np.allclose(first, second, atol=1e-3)  # new draws each call
    restored = layers.ColorAugmentation.from_config(layer.get_config())
    assert restored.get_config() == layer.get_config()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="jitter_p"):
        layers.ColorAugmentation(jitter_p=1.5)
    with pytest.raises(ValueError, match="hue <= 0.5"):
        layers.ColorAugmentation(jitter=(0.4, 0.4, 0.4, 0.7))
    with pytest.raises(ValueError, match="blur_sigma"):
        layers.ColorAugmentation(blur_sigma=(0.0, 2.0))


def test_crop_view_is_the_uint8_crop_then_flip():
    rng = np.random.default_rng(3)
    image = tf.constant(rng.integers(0, 256, (40, 50, 3)), tf.uint8)
    flipped = 0
    for i in range(200):
        seed = tf.constant([i, 5])
        view = augment.crop_view(image, seed, V2).numpy()
        assert view.dtype == np.uint8 and view.shape == (16, 16, 3)
        crop_seed = tf.random.experimental.stateless_split(seed, 2)[0]
        crop = augment.crop_image(image, crop_seed, V2).numpy() * 255.0
        if np.abs(view - crop).max() > 0.51:
            np.testing.assert_allclose(view, crop[:, ::-1], atol=0.51)
            flipped += 1
    assert abs(flipped / 200 - 0.5) < 0.1


def test_resize_skips_antialiasing_only_where_it_changes_nothing():
    rng = np.random.default_rng(4)
    small = tf.constant(rng.random((9, 12, 3)) * 255, tf.float32)
    np.testing.assert_allclose(
        augment._resize(small, 16),
        tf.image.resize(small, [16, 16], antialias=True),
        atol=1e-3,
    )
    wide = tf.constant(rng.random((9, 40, 3)) * 255, tf.float32)
    np.testing.assert_allclose(
        augment._resize(wide, 16),
        tf.image.resize(wide, [16, 16], antialias=True),
        atol=1e-3,
    )


def test_moco_trains_on_uint8_crops_with_color_in_model():
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (16, 24, 24, 3)).astype("uint8")
    source = data.image_array_source(images, np.zeros(16, "int64"), ("a",))
    config = augment.get_augmentation("mocov2", size=8)
    pairs = data.two_view_dataset(
        source, config, batch_size=8, seed=0, color_in_model=True
    )
    q, k = next(iter(pairs))
    assert q.dtype == tf.uint8 and tuple(q.shape) == (8, 8, 8, 3)
    augmentation = layers.ColorAugmentation.from_augmentation(config, seed=0)
    model = make_moco(
        dense_encoder(input_shape=(8, 8, 3)), augmentation=augmentation
    )
    history = model.fit(pairs, epochs=2, shuffle=False, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    # Inference: the layer only normalizes, so the embedding is the plain
    # model's on normalized images.
    crops = _numpy(ops.convert_to_tensor(q))
    normalized = (crops / 255.0 - np.array(config["mean"])) / np.array(
        config["std"]
    )
    plain = make_moco(model.encoder_q, compile=False)
    plain.head_q.set_weights(model.head_q.get_weights())
    np.testing.assert_allclose(
        _numpy(model.predict(crops, verbose=0)),
        _numpy(plain(normalized.astype("float32"))),
        atol=1e-5,
    )
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(model)
    )
    assert restored.augmentation.get_config() == augmentation.get_config()
