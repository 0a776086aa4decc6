"""The colour half: torchvision's semantics, batched in the model.

The functions run in `keras.ops` on every backend; the references below are
written independently, one image at a time, in numpy (and
`tf.image.adjust_hue`).
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops
from support import dense_encoder
from support import make_moco
from support import run_serialization_test

from moco_keras import color
from moco_keras import datasets
from moco_keras import views

V1 = views.get_augmentation("mocov1", size=16)
V2 = views.get_augmentation("mocov2", size=16)
V3_FIRST, V3_SECOND = views.get_augmentation("mocov3", size=16)
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _numpy(x):
    return ops.convert_to_numpy(x)


def _config(**overrides):
    """No colour at all unless overridden; identity normalization."""
    plain = {
        "jitter_p": 0.0,
        "grayscale_p": 0.0,
        "blur_p": 0.0,
        "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0),
    }
    return views.get_augmentation("mocov2", **{**plain, **overrides})


def _draws(config, n, seed=0):
    layer = color.ColorAugmentation.from_augmentation(config, seed=seed)
    return {k: _numpy(v) for k, v in layer.sample_parameters(n).items()}


# --- Per-image references, independent of the module ------------------------


def _gray(x):
    return np.broadcast_to((x * LUMA).sum(-1, keepdims=True), x.shape)


def _jitter_one(x, factors, order):
    b, c, s, h = factors
    for op in order:
        if op == 0:
            x = np.clip(x * b, 0, 1)
        elif op == 1:
            x = np.clip(c * x + (1 - c) * _gray(x).mean(), 0, 1)
        elif op == 2:
            x = np.clip(s * x + (1 - s) * _gray(x), 0, 1)
        else:
            x = np.clip(tf.image.adjust_hue(x, h).numpy(), 0, 1)
    return x


def _blur_one(x, sigma, radius=6):
    taps = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(x, pad, mode="symmetric")
        x = sum(
            kernel[t] * np.take(padded, range(t, t + x.shape[axis]), axis=axis)
            for t in range(len(taps))
        )
    return x


def _augment_one(x, p, i, config):
    if config["grayscale_first"] and p["grayscale"][i]:
        x = _gray(x)
    if config["jitter_p"] > 0 and p["jitter"][i]:
        x = _jitter_one(x, p["factors"][i], p["order"][i])
    if not config["grayscale_first"] and p["grayscale"][i]:
        x = _gray(x)
    if config["blur_p"] > 0 and p["blur"][i]:
        x = _blur_one(x, p["sigma"][i])
    if config["solarize_p"] > 0 and p["solarize"][i]:
        # PIL's ImageOps.solarize on uint8: levels of 128 and up inverted.
        x = np.where(np.round(x * 255) >= 128, 1 - x, x)
    return x


def _random_jitter(n, rng, hue):
    factors = np.stack(
        [rng.uniform(0.6, 1.4, n) for _ in range(3)]
        + [rng.uniform(-hue, hue, n)],
        axis=1,
    ).astype("float32")
    order = np.stack([rng.permutation(4) for _ in range(n)]).astype("int32")
    return factors, order


def test_ops_equal_the_per_image_references():
    rng = np.random.default_rng(0)
    images = rng.random((12, 10, 14, 3)).astype("float32")
    factors, order = _random_jitter(12, rng, hue=0.5)
    out = _numpy(color.color_jitter(images, factors, order))
    sigma = rng.uniform(0.1, 2.0, 12).astype("float32")
    blurred = _numpy(color.gaussian_blur(images, sigma))
    for i in range(12):
        np.testing.assert_allclose(
            out[i], _jitter_one(images[i], factors[i], order[i]), atol=2e-5
        )
        np.testing.assert_allclose(
            blurred[i], _blur_one(images[i], sigma[i]), atol=1e-5
        )
    np.testing.assert_allclose(
        _numpy(color.grayscale(images)), _gray(images), atol=1e-6
    )


@pytest.mark.parametrize(
    "config",
    [V1, V2, V3_FIRST, V3_SECOND],
    ids=["mocov1", "mocov2", "mocov3_first", "mocov3_second"],
)
def test_augment_composes_the_ops_in_the_preset_order(config):
    rng = np.random.default_rng(1)
    images = rng.random((16, 12, 12, 3)).astype("float32")
    p = _draws(config, 16)
    out = _numpy(color.augment(images, p, config))
    for i in range(16):
        expected = _augment_one(images[i], p, i, config)
        np.testing.assert_allclose(out[i], expected, atol=2e-5)


def _check_distributions(p, n):
    b, c, s, h = p["factors"].T
    for factor in (b, c, s):
        assert 0.6 <= factor.min() < 0.61 and 1.39 < factor.max() <= 1.4
        assert abs(factor.mean() - 1.0) < 0.02
    assert -0.1 <= h.min() < -0.099 and 0.099 < h.max() <= 0.1
    np.testing.assert_array_equal(np.sort(p["order"], 1), [[0, 1, 2, 3]] * n)
    assert len({tuple(o) for o in p["order"]}) == 24  # every order occurs
    assert abs(p["jitter"].mean() - 0.8) < 0.025
    assert abs(p["grayscale"].mean() - 0.2) < 0.025
    assert abs(p["blur"].mean() - 0.5) < 0.03
    assert 0.1 <= p["sigma"].min() < 0.11 and 1.99 < p["sigma"].max() <= 2.0
    # Draws are per image and independent of one another.
    assert abs(np.corrcoef(b, c)[0, 1]) < 0.05
    assert abs(np.corrcoef(p["jitter"], p["grayscale"])[0, 1]) < 0.05


def test_parameters_follow_the_torchvision_distributions():
    _check_distributions(_draws(V2, 4000, seed=3), 4000)


def test_jitter_factors_act_in_torchvision_ranges():
    # Brightness alone on a flat gray image scales it by b in [0.6, 1.4].
    config = _config(jitter=(0.4, 0.0, 0.0, 0.0), jitter_p=1.0)
    p = _draws(config, 400)
    flat = np.full((400, 4, 4, 3), 0.5, np.float32)
    brightness = _numpy(color.augment(flat, p, config))[:, 0, 0, 0] / 0.5
    assert 0.6 <= brightness.min() < 0.61 and 1.39 < brightness.max() <= 1.4
    # Hue alone rotates pure hues by up to 0.1 of a turn.
    config = _config(jitter=(0.0, 0.0, 0.0, 0.1), jitter_p=1.0)
    red = np.broadcast_to([0.8, 0.2, 0.2], (400, 4, 4, 3)).astype("float32")
    out = _numpy(color.augment(red, _draws(config, 400), config))
    hue = tf.image.rgb_to_hsv(out[:, 0, 0]).numpy()[:, 0]
    hue = np.where(hue < 0.5, hue, hue - 1.0)
    assert -0.1 <= hue.min() < -0.09 and 0.09 < hue.max() <= 0.1
    # Saturation blends with the grayscale image, one factor per image.
    config = _config(jitter=(0.0, 0.0, 0.4, 0.0), jitter_p=1.0)
    x = np.array([0.6, 0.4, 0.3], np.float32)
    luma = float(np.dot(x, LUMA))
    image = np.broadcast_to(x, (200, 4, 4, 3))
    out = _numpy(color.augment(image, _draws(config, 200), config))[:, 0, 0]
    per_channel = (out - luma) / (x - luma)
    np.testing.assert_allclose(
        per_channel, per_channel[:, :1].repeat(3, 1), atol=1e-4
    )
    assert 0.6 <= per_channel.min() < 0.65 and 1.35 < per_channel.max() <= 1.4


def test_jitter_applies_its_ops_in_a_random_order():
    config = _config(jitter_p=1.0)
    image = np.linspace(0, 1, 48, dtype="float32").reshape(1, 4, 4, 3)
    images = np.repeat(image, 60, axis=0)
    p = _draws(config, 60)
    out = _numpy(color.color_jitter(images, p["factors"], p["order"]))
    fixed = _numpy(
        color.color_jitter(images, p["factors"], np.tile([0, 1, 2, 3], (60, 1)))
    )
    order_mattered = sum(
        not np.allclose(out[i], fixed[i], atol=1e-3) for i in range(60)
    )
    assert len({tuple(o) for o in p["order"]}) > 12  # of the 24
    # Clipping makes the order matter for most draws on this image.
    assert order_mattered > 20
    identity = np.tile([1.0, 1.0, 1.0, 0.0], (60, 1)).astype("float32")
    np.testing.assert_allclose(
        _numpy(color.color_jitter(images, identity, p["order"])),
        images,
        atol=1e-6,
    )


def test_v1_grays_before_its_jitter_and_v2_after():
    # Pure red has luma 0.299. Gray first, a brightness factor b > 1 scales
    # the luma to 0.299 b; jitter first clips red at 1, then the gray is
    # 0.299 at most.
    red = np.broadcast_to([1.0, 0.0, 0.0], (40, 4, 4, 3)).astype("float32")
    brightest = {}
    for name in ("mocov1", "mocov2"):
        config = views.get_augmentation(
            name,
            jitter=(0.4, 0.0, 0.0, 0.0),
            jitter_p=1.0,
            grayscale_p=1.0,
            blur_p=0.0,
        )
        out = _numpy(color.augment(red, _draws(config, 40), config))
        brightest[name] = float(out.max())
    assert brightest["mocov1"] > 0.299 * 1.2
    assert brightest["mocov2"] == pytest.approx(0.299, abs=1e-3)


def _width(blurred):
    x = np.arange(blurred.shape[0]) - blurred.shape[0] // 2
    profile = blurred.sum(0)
    return math.sqrt((profile * x**2).sum() / profile.sum())


def test_gaussian_blur_has_the_requested_sigma():
    delta = np.zeros((3, 31, 31, 3), np.float32)
    delta[:, 15, 15] = 1.0
    sigma = np.array([0.8, 1.5, 2.0], np.float32)
    out = _numpy(color.gaussian_blur(delta, sigma))[..., 0]
    for i, s in enumerate(sigma):
        assert abs(_width(out[i]) - s) < 0.03 * s + 0.01
    config = _config(blur_p=1.0)
    deltas = np.repeat(delta[:1], 200, axis=0)
    out = _numpy(color.augment(deltas, _draws(config, 200), config))[..., 0]
    widths = [_width(o) for o in out]
    assert min(widths) < 0.3 and 1.85 < max(widths) < 2.05


def test_call_normalizes_and_augments_only_in_training():
    layer = color.ColorAugmentation.from_augmentation(V2, seed=0)
    crops = np.random.default_rng(2).integers(0, 256, (8, 16, 16, 3), "uint8")
    expected = (crops / 255.0 - np.array(V2["mean"])) / np.array(V2["std"])
    np.testing.assert_allclose(
        _numpy(layer(crops, training=False)), expected, atol=1e-5
    )
    first = _numpy(layer(crops, training=True))
    second = _numpy(layer(crops, training=True))
    assert not np.allclose(first, expected, atol=1e-3)
    assert not np.allclose(first, second, atol=1e-3)  # new draws each call
    run_serialization_test(layer)


def test_mocov3s_second_view_solarizes_a_fifth_and_v2_draws_stay():
    p = _draws(V3_SECOND, 4000, seed=3)
    assert abs(p["solarize"].mean() - 0.2) < 0.025
    assert abs(p["blur"].mean() - 0.1) < 0.02
    assert _draws(V3_FIRST, 4000, seed=3)["blur"].all()
    # The solarize coin is drawn last, and only where it is used: v2's
    # draws are those of a config without it.
    assert "solarize" not in _draws(V2, 8)
    v2 = _draws(V2, 8, seed=6)
    with_coin = _draws({**V2, "solarize_p": 0.5}, 8, seed=6)
    for name, value in v2.items():
        np.testing.assert_array_equal(with_coin[name], value)
    images = np.linspace(0, 1, 256, dtype="float32").reshape(1, 16, 16, 1)
    images = np.broadcast_to(images, (1, 16, 16, 3))
    solarized = _numpy(color.solarize(images))
    levels = np.round(images * 255)
    np.testing.assert_allclose(
        solarized, np.where(levels >= 128, 1 - images, images), atol=1e-7
    )


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="jitter_p"):
        color.ColorAugmentation(jitter_p=1.5)
    with pytest.raises(ValueError, match="hue <= 0.5"):
        color.ColorAugmentation(jitter=(0.4, 0.4, 0.4, 0.7))
    with pytest.raises(ValueError, match="blur_sigma"):
        color.ColorAugmentation(blur_sigma=(0.0, 2.0))
    with pytest.raises(ValueError, match="grayscale_p"):
        views.get_augmentation("mocov2", grayscale_p=-0.1)
    with pytest.raises(ValueError, match="solarize_p"):
        color.ColorAugmentation(solarize_p=2.0)


def test_moco_trains_on_the_pipelines_uint8_crops():
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (16, 24, 24, 3)).astype("uint8")
    source = datasets.image_array_source(images, np.zeros(16, "int64"), ("a",))
    config = views.get_augmentation("mocov2", size=8)
    pairs = views.two_view_batches(source, config, batch_size=8, seed=0)
    q, k = next(iter(pairs))
    assert q.dtype == np.uint8 and tuple(q.shape) == (8, 8, 8, 3)
    augmentation = color.ColorAugmentation.from_augmentation(config, seed=0)
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
