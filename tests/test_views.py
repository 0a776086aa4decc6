"""The input pipeline (`moco_keras.views`): the views' presets, the crop
half and its grain batches.

numpy, PIL and grain alone (no Keras backend enters): run once, under the
torch suite.
"""

import math
import os

import numpy as np
import pytest
from PIL import Image
from support import torchvision_mean_area

from moco_keras import color
from moco_keras import datasets
from moco_keras import views

pytestmark = pytest.mark.backends("torch")

MOCOV2 = views.AUGMENTATIONS["mocov2"]


def test_presets_follow_the_official_code():
    v1, v2 = views.AUGMENTATIONS["mocov1"], views.AUGMENTATIONS["mocov2"]
    assert v1["jitter"] == (0.4, 0.4, 0.4, 0.4) and v1["jitter_p"] == 1.0
    assert v1["grayscale_first"] and v1["blur_p"] == 0.0
    assert v2["jitter"] == (0.4, 0.4, 0.4, 0.1) and v2["jitter_p"] == 0.8
    assert v2["blur_p"] == 0.5 and v2["blur_sigma"] == (0.1, 2.0)
    for config in (v1, v2):
        assert config["size"] == 224 and config["scale"] == (0.2, 1.0)
        assert config["grayscale_p"] == 0.2 and config["flip"]
        assert config["mean"] == color.IMAGENET_MEAN
    assert views.AUGMENTATIONS["cifar"]["size"] == 32
    # v3: BYOL's asymmetric pair, the same crop in both views.
    first, second = views.AUGMENTATIONS["mocov3"]
    for config in (first, second):
        assert config["scale"] == (0.08, 1.0) and config["size"] == 224
        assert config["jitter"] == (0.4, 0.4, 0.2, 0.1)
        assert config["jitter_p"] == 0.8 and config["grayscale_p"] == 0.2
        assert not config["grayscale_first"] and config["flip"]
    assert (first["blur_p"], first["solarize_p"]) == (1.0, 0.0)
    assert (second["blur_p"], second["solarize_p"]) == (0.1, 0.2)
    assert v2["solarize_p"] == 0.0
    with pytest.raises(ValueError, match="crop settings differ"):
        views.two_crops(
            np.zeros((8, 8, 3), np.uint8),
            views.view_rng(0, 0, 0),
            (first, {**second, "size": 32}),
        )
    with pytest.raises(ValueError, match="Unknown augmentation arguments"):
        views.get_augmentation("mocov2", blur=1.0)
    with pytest.raises(ValueError, match="Unknown augmentation 'simclr'"):
        views.get_augmentation("simclr")


def test_crop_windows_follow_torchvisions_area_and_ratio():
    rng = np.random.default_rng(0)
    windows = np.array(
        [
            views.crop_window(rng, 240, 320, (0.2, 1.0), (3 / 4, 4 / 3))
            for _ in range(4000)
        ]
    )
    top, left, h, w = windows.T
    assert np.all(top >= 0) and np.all(left >= 0)
    assert np.all(top + h <= 240) and np.all(left + w <= 320)
    area, ratio = h * w / (240 * 320), w / h
    assert area.min() > 0.19 and area.max() <= 1.0
    assert ratio.min() > 0.74 and ratio.max() < 1.35
    # torchvision's loop: the area ~ U(0.2, 1) among the windows that fit
    # on the first try, large ones redrawn when their ratio does not fit.
    expected = torchvision_mean_area(240, 320)
    assert abs(area.mean() - expected) < 0.01, (area.mean(), expected)
    # The log ratio is uniform: its quartiles at a quarter of the range.
    log_ratio = np.log(ratio[area < 0.5])  # small windows always fit
    quartiles = np.quantile(log_ratio, [0.25, 0.5, 0.75])
    span = math.log(4 / 3) - math.log(3 / 4)
    expected = math.log(3 / 4) + span * np.array([0.25, 0.5, 0.75])
    np.testing.assert_allclose(quartiles, expected, atol=0.03)


def test_a_crop_that_never_fits_falls_back_to_a_center_crop():
    rng = np.random.default_rng(0)
    window = views.crop_window(rng, 10, 1000, (0.9, 1.0), (3 / 4, 4 / 3))
    assert window == (0, (1000 - 13) // 2, 10, 13)


def _photo(height=375, width=500, seed=0):
    """A smooth random field with sharp edges, like a photo's detail."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 16, width // 16, 3), np.uint8)
    smooth = np.asarray(
        Image.fromarray(small).resize((width, height), Image.BICUBIC)
    ).astype(np.int32)
    edges = (np.indices((height, width)).sum(0) // 23 % 2) * 60
    return np.clip(smooth + edges[..., None] - 30, 0, 255).astype(np.uint8)


def test_the_views_resize_is_pils_bilinear_as_the_official_loaders():
    """torchvision's RandomResizedCrop on the official loader's PIL images
    resizes with PIL's bilinear filter, which averages the pixels a shrunk
    crop drops; the plain bilinear sampling of other libraries (here
    TensorFlow's, without antialiasing) aliases."""
    import tensorflow as tf

    image = _photo(seed=3)
    picture = views.decode(image)
    window = (10, 20, 300, 400)  # shrinks to 224
    ours = views.resized_crop(picture, window, 224)
    crop = Image.fromarray(image[10:310, 20:420])
    pil = np.asarray(crop.resize((224, 224), Image.BILINEAR))
    assert np.array_equal(ours, pil)
    plain = tf.image.resize(
        tf.constant(image[10:310, 20:420], tf.float32), (224, 224), "bilinear"
    ).numpy()
    assert np.abs(ours - np.clip(np.round(plain), 0, 255)).mean() > 1.0


def test_two_crops_flip_half_the_views_and_a_seed_fixes_them():
    image = _photo(64, 64, seed=4)
    config = {**MOCOV2, "size": 32}
    flips = 0
    for index in range(1000):
        q, k = views.two_crops(image, views.view_rng(0, 0, index), config)
        assert q.shape == k.shape == (32, 32, 3) and q.dtype == np.uint8
        # The same draws without the flip: a view differs where it flipped.
        plain = views.two_crops(
            image, views.view_rng(0, 0, index), {**config, "flip": False}
        )
        for view, unflipped in zip((q, k), plain, strict=True):
            if not np.array_equal(view, unflipped):
                np.testing.assert_array_equal(view, unflipped[:, ::-1])
                flips += 1
    # 2000 views, p 0.5: within 4.5 standard deviations (22).
    assert abs(flips - 1000) < 100, flips
    first = views.two_crops(image, views.view_rng(0, 0, 5), config)
    again = views.two_crops(image, views.view_rng(0, 0, 5), config)
    assert all(np.array_equal(a, b) for a, b in zip(again, first, strict=True))
    other = views.two_crops(image, views.view_rng(0, 1, 5), config)
    assert not np.array_equal(other[0], first[0])  # another epoch's draw


def _source(count=96, classes=4, size=20):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, size, size, 1), np.uint8)
    labels = np.arange(count) % classes
    return datasets.image_array_source(images, labels, list("abcd")[:classes])


def test_batches_are_the_epochs_order_and_resume_and_shard():
    source = _source()
    config = {**MOCOV2, "size": 16}

    def batches(**kwargs):
        return [
            tuple(np.asarray(v) for v in b)
            for b in views.two_view_batches(
                source, config, 32, seed=3, **kwargs
            )
        ]

    whole = batches(epoch=1)
    assert len(whole) == 3  # 96 images, batch 32
    q, k = whole[0]
    assert q.shape == k.shape == (32, 16, 16, 3) and q.dtype == np.uint8
    # Batch b holds the epoch's permutation, rows 32 b to 32 b + 31.
    order = datasets.permutation(96, 3, 1)
    expected = views.TwoViews(source, config, 3, 1)(order[40])
    np.testing.assert_array_equal(whole[1][0][8], expected[0])
    np.testing.assert_array_equal(whole[1][1][8], expected[1])
    # A resume from batch 1 reads the rest of the same epoch.
    resumed = batches(epoch=1, skip_batches=1)
    for again, full in zip(resumed, whole[1:], strict=True):
        np.testing.assert_array_equal(again[0], full[0])
    # Two processes' blocks, side by side, are the one-process batch.
    first, second = (
        batches(epoch=1, shard=(0, 2)),
        batches(epoch=1, shard=(1, 2)),
    )
    for a, b, full in zip(first, second, whole, strict=True):
        np.testing.assert_array_equal(np.concatenate([a[0], b[0]]), full[0])
    # Another epoch: another order.
    assert not np.array_equal(batches(epoch=2)[0][0], whole[0][0])


def test_worker_processes_give_the_same_batches():
    source = _source(64)
    config = {**MOCOV2, "size": 16}
    inline = list(views.two_view_batches(source, config, 16, epoch=0))
    pooled = list(
        views.two_view_batches(source, config, 16, epoch=0, workers=2)
    )
    assert len(pooled) == len(inline) == 4
    for a, b in zip(pooled, inline, strict=True):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_a_class_sorted_folder_mixes_as_a_uniform_draw():
    """100 classes of 300 images, sorted: the classes in each batch of 256
    of the grain path's order, against a uniform draw's expectation."""
    labels = np.repeat(np.arange(100), 300)
    rows = views.epoch_indices(len(labels), 256, seed=0, epoch=0)
    distinct = np.array([len(set(labels[r])) for r in rows])
    # Drawing 256 of 30000 without replacement, 300 of each of 100 classes.
    p_absent = math.comb(30000 - 300, 256) / math.comb(30000, 256)
    expected = 100 * (1 - p_absent)
    assert abs(distinct.mean() - expected) < 0.5, (distinct.mean(), expected)
    other = views.epoch_indices(len(labels), 256, seed=0, epoch=1)
    assert not np.array_equal(rows, other)


def test_jpeg_files_are_read_and_bad_batches_refused(tmp_path):
    folder = tmp_path / "train" / "cat"
    os.makedirs(folder)
    for index in range(8):
        Image.fromarray(_photo(48, 64, seed=index)).save(
            folder / f"{index}.jpg"
        )
    source = datasets.image_folder(str(tmp_path / "train"))
    ((q, k),) = list(views.two_view_batches(source, {**MOCOV2, "size": 24}, 8))
    assert q.shape == (8, 24, 24, 3)
    with pytest.raises(ValueError, match="no whole batch of 16"):
        views.two_view_batches(source, MOCOV2, 16)
    with pytest.raises(ValueError, match="multiple of 3"):
        views.two_view_batches(source, MOCOV2, 8, shard=(0, 3))


def test_labelled_batches_read_the_epochs_order_with_their_views():
    source = _source(40)
    mean, std = (0.5,) * 3, (0.25,) * 3
    images, labels = views.labelled_arrays(source, 16, mean, std, 1.0)
    assert images.shape == (40, 16, 16, 3) and images.dtype == np.float32
    np.testing.assert_array_equal(labels, source.labels)
    # In order, the last partial batch kept: the arrays, batch by batch.
    batches = list(views.labelled_batches(source, 16, 16, mean, std, 1.0))
    assert [len(y) for _, y in batches] == [16, 16, 8]
    np.testing.assert_array_equal(
        np.concatenate([x for x, _ in batches]), images
    )
    # An epoch: its permutation from batch 1 on, partial batch dropped;
    # evaluation views without an augmentation.
    order = datasets.permutation(40, 7, 2)
    epoch = list(
        views.labelled_batches(
            source, 16, 16, mean, std, 1.0, seed=7, epoch=2, skip_batches=1
        )
    )
    assert len(epoch) == 1
    np.testing.assert_array_equal(epoch[0][1], source.labels[order[16:32]])
    np.testing.assert_array_equal(epoch[0][0], images[order[16:32]])
    # The linear transform: crops and flips, drawn from (seed, epoch, index).
    linear = views.linear_augmentation(16, mean, std)
    trained = list(
        views.labelled_batches(
            source, 16, 16, mean, std, train_augmentation=linear, epoch=0
        )
    )
    assert len(trained) == 2 and trained[0][0].shape == (16, 16, 16, 3)
    assert not np.allclose(
        trained[0][0], images[datasets.permutation(40, 0, 0)[:16]]
    )
    with pytest.raises(ValueError, match="crop and flip only"):
        views.labelled_batches(
            source, 16, 16, mean, std, train_augmentation=MOCOV2, epoch=0
        )
    # Cached features: rows of arrays in the same epoch order.
    features = np.arange(40.0)[:, None]
    (rows, row_labels), *_ = views.array_batches(
        (features, labels), 16, seed=7, epoch=2, skip_batches=1
    )
    np.testing.assert_array_equal(rows[:, 0], order[16:32])
    np.testing.assert_array_equal(row_labels, labels[order[16:32]])


def test_a_file_that_fails_to_decode_is_named_and_replaced(tmp_path, caplog):
    folder = tmp_path / "cat"
    os.makedirs(folder)
    for index in range(4):
        Image.fromarray(_photo(32, 32, seed=index)).save(
            folder / f"{index}.jpg"
        )
    # A JPEG header and end marker around garbage: passes the file check.
    (folder / "1.jpg").write_bytes(
        b"\xff\xd8\xff\xe0" + b"\x00" * 64 + b"\xff\xd9"
    )
    source = datasets.image_folder(str(tmp_path))
    assert source.num_examples == 4
    items = source.paths_or_arrays
    with caplog.at_level("WARNING", logger="moco_keras"):
        picture = views.read_picture(items, True, 1)
    assert "1.jpg" in caplog.text and "does not decode" in caplog.text
    np.testing.assert_array_equal(
        np.asarray(picture), np.asarray(views.read_picture(items, True, 2))
    )
