import math

import numpy as np
import pytest
import tensorflow as tf

from moco_keras import augment


def seeds(n, offset=0):
    return [tf.constant([i + offset, 7], tf.int32) for i in range(n)]


def plain(**overrides):
    """No colour, blur or flip; identity normalization."""
    config = {
        "jitter_p": 0.0,
        "grayscale_p": 0.0,
        "blur_p": 0.0,
        "flip": False,
        "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0),
    }
    return augment.get_augmentation("mocov2", **{**config, **overrides})


def test_presets_follow_the_official_code():
    v1, v2 = augment.AUGMENTATIONS["mocov1"], augment.AUGMENTATIONS["mocov2"]
    assert v1["jitter"] == (0.4, 0.4, 0.4, 0.4) and v1["jitter_p"] == 1.0
    assert v1["grayscale_first"] and v1["blur_p"] == 0.0
    assert v2["jitter"] == (0.4, 0.4, 0.4, 0.1) and v2["jitter_p"] == 0.8
    assert v2["blur_p"] == 0.5 and v2["blur_sigma"] == (0.1, 2.0)
    for config in (v1, v2):
        assert config["size"] == 224 and config["scale"] == (0.2, 1.0)
        assert config["grayscale_p"] == 0.2 and config["flip"]
        assert config["mean"] == augment.IMAGENET_MEAN
    assert augment.AUGMENTATIONS["cifar"]["size"] == 32
    with pytest.raises(ValueError, match="Unknown augmentation arguments"):
        augment.get_augmentation("mocov2", blur=1.0)
    with pytest.raises(ValueError, match="Unknown augmentation 'simclr'"):
        augment.get_augmentation("simclr")


def _torchvision_mean_area(height, width, n=20000):
    """Mean area fraction of torchvision's RandomResizedCrop.get_params."""
    rng = np.random.default_rng(0)
    total = 0.0
    for _ in range(n):
        for _ in range(10):
            target = height * width * rng.uniform(0.2, 1.0)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                total += w * h
                break
        else:
            total += height * width  # ratio 4/3 is in range: whole image
    return total / n / (height * width)


def test_random_resized_crop_area_and_ratio():
    shape = tf.constant([240, 320, 3])
    windows = np.array(
        [
            augment.random_resized_crop_window(
                shape, s, (0.2, 1.0), (0.75, 4 / 3)
            )
            for s in seeds(800)
        ]
    )
    top, left, h, w = windows.T
    assert np.all(top >= 0) and np.all(left >= 0)
    assert np.all(top + h <= 240) and np.all(left + w <= 320)
    area = h * w / (240 * 320)
    ratio = w / h
    # Rounding to whole pixels moves the bounds by a pixel at most.
    assert area.min() > 0.19 and area.max() <= 1.0
    assert ratio.min() > 0.74 and ratio.max() < 1.35
    assert area.min() < 0.25 and area.max() > 0.9  # the whole range is used
    # Large crops often miss the ratio range and are drawn again, which
    # lowers the mean area: compare with torchvision's loop, run in Python.
    assert abs(area.mean() - _torchvision_mean_area(240, 320)) < 0.03
    assert len({(t, le) for t, le in zip(top, left, strict=True)}) > 700


def test_random_resized_crop_falls_back_to_a_center_crop():
    # A 10 x 1000 strip: no crop of 90-100 % of the area fits the ratio
    # range, so torchvision takes a center crop of ratio 4/3.
    window = augment.random_resized_crop_window(
        tf.constant([10, 1000, 3]), seeds(1)[0], (0.9, 1.0), (0.75, 4 / 3)
    )
    assert window.numpy().tolist() == [0, (1000 - 13) // 2, 10, 13]


def test_grayscale_and_flip_frequencies():
    rng = np.random.default_rng(0)
    image = tf.constant(rng.uniform(size=(8, 8, 3)), tf.float32)
    config = plain(grayscale_p=0.2, flip=True)
    gray = flipped = 0
    n = 600
    for s in seeds(n):
        out = augment.augment_crop(image, s, config).numpy()
        is_gray = np.allclose(out[..., 0], out[..., 1], atol=1e-6)
        gray += is_gray
        flip_ref = image.numpy()[:, ::-1]
        if is_gray:
            flip_ref = np.broadcast_to(
                (flip_ref * np.array([0.299, 0.587, 0.114])).sum(
                    -1, keepdims=True
                ),
                flip_ref.shape,
            )
        flipped += np.allclose(out, flip_ref, atol=1e-5)
    assert abs(gray / n - 0.2) < 0.05
    assert abs(flipped / n - 0.5) < 0.07


def test_jitter_factors_are_drawn_in_torchvision_ranges():
    image = tf.fill([4, 4, 3], 0.5)
    brightness = [
        augment.color_jitter(image, s, 0.4, 0.0, 0.0, 0.0).numpy()[0, 0, 0]
        / 0.5
        for s in seeds(400)
    ]
    assert 0.6 <= min(brightness) < 0.65 and 1.35 < max(brightness) <= 1.4
    assert abs(np.mean(brightness) - 1.0) < 0.04

    red = tf.constant(np.broadcast_to([0.8, 0.2, 0.2], (4, 4, 3)), tf.float32)
    hues = []
    for s in seeds(400):
        out = augment.color_jitter(red, s, 0.0, 0.0, 0.0, 0.1)
        hue = tf.image.rgb_to_hsv(out)[0, 0, 0].numpy()
        hues.append(hue if hue < 0.5 else hue - 1.0)
    assert -0.1 <= min(hues) < -0.09 and 0.09 < max(hues) <= 0.1

    # Saturation blends with the grayscale image: out = s * x + (1 - s) * y,
    # one factor s in [0.6, 1.4] for all three channels.
    x = np.array([0.6, 0.4, 0.3])
    luma = float(np.dot(x, [0.299, 0.587, 0.114]))
    image = tf.constant(np.broadcast_to(x, (4, 4, 3)), tf.float32)
    factors = []
    for s in seeds(200):
        out = augment.color_jitter(image, s, 0.0, 0.0, 0.4, 0.0).numpy()[0, 0]
        per_channel = (out - luma) / (x - luma)
        np.testing.assert_allclose(per_channel, per_channel[0], atol=1e-4)
        factors.append(per_channel[0])
    assert 0.6 <= min(factors) < 0.65 and 1.35 < max(factors) <= 1.4


def _one_op(image, op, factor):
    """The module's op `op` alone: the other three at their identity."""
    factors = [1.0, 1.0, 1.0, 0.0]
    factors[op] = float(factor)
    return augment.apply_color_jitter(image, factors, [0, 1, 2, 3])


def test_jitter_applies_its_ops_in_a_random_order():
    image = tf.constant(np.linspace(0, 1, 48).reshape(4, 4, 3), tf.float32)
    outs = {
        augment.color_jitter(image, s, 0.0, 0.0, 0.0, 0.0).numpy().tobytes()
        for s in seeds(5)
    }
    assert len(outs) == 1  # zero factors: every order gives the input
    orders, order_mattered = set(), 0
    for s in seeds(60):
        factors, order = augment.jitter_parameters(s, 0.4, 0.4, 0.4, 0.1)
        out = augment.color_jitter(image, s, 0.4, 0.4, 0.4, 0.1).numpy()
        # The output is the four ops one after the other in the drawn order.
        expected = image
        for op in order.numpy():
            expected = _one_op(expected, op, factors[op])
        np.testing.assert_allclose(out, expected.numpy(), atol=1e-5)
        fixed = augment.apply_color_jitter(image, factors, [0, 1, 2, 3])
        order_mattered += not np.allclose(out, fixed.numpy(), atol=1e-3)
        orders.add(tuple(order.numpy()))
    assert len(orders) > 12  # of the 24
    # Clipping makes the order matter for most draws on this image.
    assert order_mattered > 20


def test_v1_grays_before_its_jitter_and_v2_after():
    # Pure red has luma 0.299. Gray first, a brightness factor b > 1 scales
    # the luma to 0.299 b; jitter first clips red at 1, then the gray is
    # 0.299 at most.
    red = tf.constant(np.broadcast_to([1.0, 0.0, 0.0], (4, 4, 3)), tf.float32)
    brightest = {}
    for name in ("mocov1", "mocov2"):
        config = augment.get_augmentation(
            name,
            jitter=(0.4, 0.0, 0.0, 0.0),
            jitter_p=1.0,
            grayscale_p=1.0,
            blur_p=0.0,
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
        )
        views = [
            augment.augment_crop(red, s, config).numpy() for s in seeds(40)
        ]
        brightest[name] = max(float(view.max()) for view in views)
    assert brightest["mocov1"] > 0.299 * 1.2
    assert brightest["mocov2"] == pytest.approx(0.299, abs=1e-3)


def _blur_width(sigma):
    delta = np.zeros((31, 31, 3), np.float32)
    delta[15, 15] = 1.0
    out = augment.gaussian_blur(tf.constant(delta), sigma).numpy()[..., 0]
    x = np.arange(31) - 15
    return math.sqrt((out.sum(0) * x**2).sum() / out.sum())


def test_gaussian_blur_has_the_requested_sigma():
    for sigma in (0.8, 1.5, 2.0):
        assert abs(_blur_width(sigma) - sigma) < 0.03 * sigma + 0.01
    config = plain(blur_p=1.0)
    delta = np.zeros((31, 31, 3), np.float32)
    delta[15, 15] = 1.0
    widths = []
    x = np.arange(31) - 15
    for s in seeds(200):
        out = augment.augment_crop(tf.constant(delta), s, config).numpy()[
            ..., 0
        ]
        widths.append(math.sqrt((out.sum(0) * x**2).sum() / out.sum()))
    assert min(widths) < 0.3 and 1.85 < max(widths) < 2.05


def test_two_views_differ_and_a_seed_fixes_them():
    rng = np.random.default_rng(1)
    image = tf.constant(rng.integers(0, 255, (48, 64, 3)), tf.uint8)
    config = augment.get_augmentation("mocov2", size=32)
    q, k = augment.two_crops(image, seeds(1)[0], config, encoded=False)
    assert q.shape == k.shape == (32, 32, 3)
    assert not np.allclose(q, k)
    q2, k2 = augment.two_crops(image, seeds(1)[0], config, encoded=False)
    np.testing.assert_array_equal(q, q2)
    np.testing.assert_array_equal(k, k2)
    encoded = tf.io.encode_png(image)
    qe, _ = augment.two_crops(encoded, seeds(1)[0], config, encoded=True)
    np.testing.assert_allclose(qe, q, atol=1e-5)  # PNG: lossless, same crop
