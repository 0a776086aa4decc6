import numpy as np
import pytest
import tensorflow as tf
from support import tf_data_only
from support import torchvision_mean_area

from moco_keras import augment
from moco_keras import color

pytestmark = tf_data_only


def seeds(n, offset=0):
    return [tf.constant([i + offset, 7], tf.int32) for i in range(n)]


def test_presets_follow_the_official_code():
    v1, v2 = augment.AUGMENTATIONS["mocov1"], augment.AUGMENTATIONS["mocov2"]
    assert v1["jitter"] == (0.4, 0.4, 0.4, 0.4) and v1["jitter_p"] == 1.0
    assert v1["grayscale_first"] and v1["blur_p"] == 0.0
    assert v2["jitter"] == (0.4, 0.4, 0.4, 0.1) and v2["jitter_p"] == 0.8
    assert v2["blur_p"] == 0.5 and v2["blur_sigma"] == (0.1, 2.0)
    for config in (v1, v2):
        assert config["size"] == 224 and config["scale"] == (0.2, 1.0)
        assert config["grayscale_p"] == 0.2 and config["flip"]
        assert config["mean"] == color.IMAGENET_MEAN
    assert augment.AUGMENTATIONS["cifar"]["size"] == 32
    # v3: BYOL's asymmetric pair, the same crop in both views.
    first, second = augment.AUGMENTATIONS["mocov3"]
    for config in (first, second):
        assert config["scale"] == (0.08, 1.0) and config["size"] == 224
        assert config["jitter"] == (0.4, 0.4, 0.2, 0.1)
        assert config["jitter_p"] == 0.8 and config["grayscale_p"] == 0.2
        assert not config["grayscale_first"] and config["flip"]
    assert (first["blur_p"], first["solarize_p"]) == (1.0, 0.0)
    assert (second["blur_p"], second["solarize_p"]) == (0.1, 0.2)
    assert v2["solarize_p"] == 0.0
    with pytest.raises(ValueError, match="crop settings differ"):
        augment.two_crops(
            tf.zeros((8, 8, 3), tf.uint8),
            seeds(1)[0],
            (first, {**second, "size": 32}),
            encoded=False,
        )
    with pytest.raises(ValueError, match="Unknown augmentation arguments"):
        augment.get_augmentation("mocov2", blur=1.0)
    with pytest.raises(ValueError, match="Unknown augmentation 'simclr'"):
        augment.get_augmentation("simclr")


def test_a_pairs_views_take_their_own_colour_half():
    """MoCo v3's pair in tf.data: the same crop half as one config's, the
    second view's colour settings on the second view only."""
    rng = np.random.default_rng(0)
    image = tf.constant(rng.integers(0, 256, (20, 24, 3)), tf.uint8)
    plain = augment.get_augmentation(
        "mocov2",
        size=8,
        jitter_p=0.0,
        grayscale_p=0.0,
        blur_p=0.0,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )
    seed = seeds(1)[0]
    first, second = augment.two_crops(
        image, seed, (plain, {**plain, "solarize_p": 1.0}), encoded=False
    )
    crop_1, crop_2 = augment.two_crops(
        image, seed, plain, encoded=False, color_in_model=True
    )
    crop_1, crop_2 = crop_1.numpy() / 255.0, crop_2.numpy() / 255.0
    np.testing.assert_allclose(first.numpy(), crop_1, atol=1e-6)
    np.testing.assert_allclose(
        second.numpy(), np.where(crop_2 >= 0.5, 1 - crop_2, crop_2), atol=1e-6
    )


@pytest.mark.parametrize("count", [None, 2])
def test_random_resized_crop_area_and_ratio(count):
    shape = tf.constant([240, 320, 3])
    # One window per seed, or a pair's two windows per seed (`two_crops`).
    windows = np.array(
        [
            augment.random_resized_crop_window(
                shape, s, (0.2, 1.0), (0.75, 4 / 3), count=count
            )
            for s in seeds(800 // (count or 1))
        ]
    ).reshape(800, 4)
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
    assert abs(area.mean() - torchvision_mean_area(240, 320)) < 0.03
    assert len({(t, le) for t, le in zip(top, left, strict=True)}) > 700


def test_random_resized_crop_falls_back_to_a_center_crop():
    # A 10 x 1000 strip: no crop of 90-100 % of the area fits the ratio
    # range, so torchvision takes a center crop of ratio 4/3.
    window = augment.random_resized_crop_window(
        tf.constant([10, 1000, 3]), seeds(1)[0], (0.9, 1.0), (0.75, 4 / 3)
    )
    assert window.numpy().tolist() == [0, (1000 - 13) // 2, 10, 13]


def test_two_views_differ_and_a_seed_fixes_them():
    rng = np.random.default_rng(1)
    image = tf.constant(rng.integers(0, 255, (48, 64, 3)), tf.uint8)
    config = augment.get_augmentation("mocov2", size=32)
    q, k = augment.two_crops(image, seeds(1)[0], config, encoded=False)
    assert q.shape == k.shape == (32, 32, 3) and q.dtype == tf.float32
    assert not np.allclose(q, k)
    q2, k2 = augment.two_crops(image, seeds(1)[0], config, encoded=False)
    np.testing.assert_array_equal(q, q2)
    np.testing.assert_array_equal(k, k2)
    encoded = tf.io.encode_png(image)
    qe, _ = augment.two_crops(encoded, seeds(1)[0], config, encoded=True)
    np.testing.assert_array_equal(qe, q)  # PNG: lossless, same crop
    cq, _ = augment.two_crops(
        image, seeds(1)[0], config, encoded=False, color_in_model=True
    )
    assert cq.dtype == tf.uint8 and cq.shape == (32, 32, 3)


def test_crop_view_is_the_uint8_crop_then_flip():
    config = augment.get_augmentation("mocov2", size=16)
    rng = np.random.default_rng(3)
    image = tf.constant(rng.integers(0, 256, (40, 50, 3)), tf.uint8)
    flipped = 0
    for i in range(200):
        seed = tf.constant([i, 5])
        view = augment.crop_view(image, seed, config).numpy()
        assert view.dtype == np.uint8 and view.shape == (16, 16, 3)
        crop_seed = tf.random.experimental.stateless_split(seed, 2)[0]
        top, left, h, w = augment.random_resized_crop_window(
            image.shape, crop_seed, config["scale"], config["ratio"]
        ).numpy()
        window = tf.cast(image[top : top + h, left : left + w], tf.float32)
        crop = np.round(augment._resize(window, 16).numpy())
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


def _photo_like(rng, height, width):
    """Smooth colour gradients with edges and noise, uint8: resampling
    differences show on it as on a photo."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [
        128 + 100 * np.sin(9 * x + 4 * y),
        255 * (x + y > 0.7),
        128 + 60 * np.cos(23 * y),
    ]
    image = np.stack(channels, -1) + rng.normal(0, 12, (height, width, 3))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def test_resize_matches_pils_bilinear_and_antialias_off_aliases():
    from PIL import Image

    rng = np.random.default_rng(5)
    for height, width in ((300, 280), (120, 410), (60, 50)):
        image = _photo_like(rng, height, width)
        # torchvision's RandomResizedCrop on the official code's PIL images.
        pil = np.asarray(
            Image.fromarray(image).resize((96, 96), Image.BILINEAR), np.float32
        )
        crop = tf.constant(image, tf.float32)
        ours = np.round(augment._resize(crop, 96).numpy())
        np.testing.assert_allclose(ours, pil, atol=1.0)
        assert np.abs(ours - pil).mean() < 0.3
        aliased = np.round(augment._resize(crop, 96, antialias=False).numpy())
        if height > 96 or width > 96:
            # Shrinking without antialiasing samples 4 of the pixels under
            # each output one: far from PIL.
            assert np.abs(aliased - pil).mean() > 2.0
        else:
            np.testing.assert_allclose(aliased, ours, atol=1.0)


def test_antialias_is_an_augmentation_option():
    config = augment.get_augmentation("mocov2", size=32, antialias=False)
    assert (
        not config["antialias"] and augment.AUGMENTATIONS["mocov2"]["antialias"]
    )
    image = tf.constant(_photo_like(np.random.default_rng(6), 200, 150))
    seed = tf.constant([3, 4])
    sharp = augment.crop_view(image, seed, config).numpy().astype(int)
    smooth = (
        augment.crop_view(image, seed, {**config, "antialias": True})
        .numpy()
        .astype(int)
    )
    assert sharp.shape == smooth.shape == (32, 32, 3)
    assert np.abs(sharp - smooth).mean() > 2.0
