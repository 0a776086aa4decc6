"""Datasets as sources (`moco_keras.datasets`): folders with broken files,
Fashion-MNIST's IDX files, tfds; each read through the pipeline once."""

import io
import logging
import os

import numpy as np
import pytest
from PIL import Image
from support import data_only
from support import fake_fashion_mnist
from support import register_tfds_dataset

from moco_keras import datasets
from moco_keras import views

pytestmark = data_only

SMALL = views.get_augmentation("cifar", size=16)


def two_views(source):
    """Each image's two views (uint8 crops), in the source's order."""
    pair = views.TwoViews(source, SMALL, seed=0, epoch=0)
    return [pair(index) for index in range(source.num_examples)]


def save(path, array, fmt="JPEG", mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, fmt)
    with open(path, "wb") as f:
        f.write(buffer.getvalue())
    return buffer.getvalue()


@pytest.fixture
def messy_folder(tmp_path):
    """An ImageNet-style folder with what real folders hold."""
    rng = np.random.default_rng(0)

    def photo():
        return rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)

    root = tmp_path / "ILSVRC2012" / "train"
    good = {
        "n01/a.JPEG": save(str(root / "n01/a.JPEG"), photo()),
        "n01/cmyk.JPEG": save(
            str(root / "n01/cmyk.JPEG"), photo(), mode="CMYK"
        ),
        "n02/gray.JPEG": save(str(root / "n02/gray.JPEG"), photo(), mode="L"),
        "n02/png.JPEG": save(str(root / "n02/png.JPEG"), photo(), fmt="PNG"),
        "n02/b.webp": save(str(root / "n02/b.webp"), photo(), fmt="WEBP"),
        "n03/c.bmp": save(str(root / "n03/c.bmp"), photo(), fmt="BMP"),
    }
    full = save(str(root / "n03/truncated.JPEG"), photo())
    (root / "n03/truncated.JPEG").write_bytes(full[: len(full) // 2])
    (root / "n03/empty.JPEG").write_bytes(b"")
    (root / "n01/notes.JPEG").write_text("not an image at all")
    (root / "n01/readme.txt").write_text("ignored: not an image extension")
    os.makedirs(root / "n04_empty")
    return root, good


def test_image_folder_lists_classes_like_torchvision(messy_folder, caplog):
    root, good = messy_folder
    with caplog.at_level(logging.WARNING, logger="moco_keras"):
        source = datasets.image_folder(str(root.parent), split="train")
    assert source.class_names == ("n01", "n02", "n03", "n04_empty")
    assert source.num_examples == len(good)
    assert source.encoded
    assert "n04_empty" in caplog.text
    for bad in ("truncated.JPEG", "empty.JPEG", "notes.JPEG"):
        assert bad in caplog.text
    assert "a.JPEG" not in caplog.text.replace("/", " ").split()
    assert sorted(source.labels.tolist()) == [0, 0, 1, 1, 1, 2]


def test_every_decodable_file_gives_two_rgb_views(messy_folder):
    root, good = messy_folder
    source = datasets.image_folder(str(root))
    pairs = two_views(source)
    assert len(pairs) == len(good)
    for q, k in pairs:
        assert q.shape == k.shape == (16, 16, 3) and q.dtype == np.uint8
        assert not np.array_equal(q, k)


def test_files_failing_to_decode_are_replaced_not_fatal(tmp_path, caplog):
    # Passes the header and trailer check, fails inside the decoder.
    rng = np.random.default_rng(1)
    ok = save(
        str(tmp_path / "c/ok.jpg"), rng.integers(0, 255, (20, 20, 3), np.uint8)
    )
    broken = bytearray(ok)
    broken[20 : len(broken) - 2] = b"\x00" * (len(broken) - 22)
    (tmp_path / "c/broken.jpg").write_bytes(bytes(broken))
    source = datasets.image_folder(str(tmp_path))
    assert source.num_examples == 2
    with caplog.at_level(logging.WARNING, logger="moco_keras"):
        pairs = two_views(source)
    assert len(pairs) == 2 and "broken.jpg" in caplog.text


def test_a_jpeg_with_bytes_after_its_end_marker_is_read(tmp_path):
    """Phones and some cameras write data after the end marker; decoders
    ignore it. A truncated JPEG stays skipped, even one whose EXIF thumbnail
    holds an end marker of its own."""
    rng = np.random.default_rng(2)
    jpeg = save(
        str(tmp_path / "c/whole.jpg"),
        rng.integers(0, 255, (24, 32, 3), np.uint8),
    )
    trailer = b"\x00\x00SEFH\x01 written by a phone \xff\xd8\x00 " * 20
    (tmp_path / "c/phone.jpg").write_bytes(jpeg + trailer)
    thumbnail = b"Exif\x00\x00" + jpeg[:20] + b"\xff\xd9"
    app1 = b"\xff\xe1" + (len(thumbnail) + 2).to_bytes(2, "big") + thumbnail
    with_thumbnail = jpeg[:2] + app1 + jpeg[2:]
    (tmp_path / "c/thumbnail.jpg").write_bytes(with_thumbnail)
    cut = with_thumbnail[: len(with_thumbnail) - 40]
    (tmp_path / "c/cut.jpg").write_bytes(cut)
    assert datasets.check_image_file(str(tmp_path / "c/phone.jpg")) is None
    assert datasets.check_image_file(str(tmp_path / "c/thumbnail.jpg")) is None
    reason = datasets.check_image_file(str(tmp_path / "c/cut.jpg"))
    assert reason == "truncated JPEG (no end marker)"
    source = datasets.image_folder(str(tmp_path))
    assert source.num_examples == 3  # whole, phone, thumbnail
    assert len(two_views(source)) == 3


def test_missing_or_empty_folders_say_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="one sub-folder per class"):
        datasets.image_folder(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="no class sub-folders"):
        datasets.image_folder(str(tmp_path))
    os.makedirs(tmp_path / "cls")
    with pytest.raises(ValueError, match="they hold no file at all"):
        datasets.image_folder(str(tmp_path))
    (tmp_path / "cls" / "notes.txt").write_text("not an image")
    (tmp_path / "cls" / "README").write_text("not an image")
    with pytest.raises(ValueError) as error:
        datasets.image_folder(str(tmp_path))
    # The cause (what the class folders hold), not the advice for a root
    # passed in place of ROOT/train.
    message = str(error.value)
    assert "class folder(s) of" in message and "'cls'" in message
    assert "1 file(s) (none), 1 file(s) .txt" in message
    assert "Pass ROOT/train" not in message


def test_fashion_mnist_idx_files(tmp_path):
    fake_fashion_mnist(str(tmp_path), n_train=12, n_test=5)
    images, labels = datasets.load_fashion_mnist("train", str(tmp_path))
    assert images.shape == (12, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (12,) and labels.max() < 10
    source = datasets.fashion_mnist("test", str(tmp_path), limit=3)
    assert source.num_examples == 3 and not source.encoded
    image = source.paths_or_arrays[0]
    assert image.shape == (32, 32, 1)
    np.testing.assert_array_equal(image[2:30, 2:30, 0], _first(tmp_path))
    with pytest.raises(FileNotFoundError, match="IDX"):
        datasets.load_fashion_mnist("train", str(tmp_path / "missing"))


def _first(tmp_path):
    return datasets.load_fashion_mnist("test", str(tmp_path))[0][0]


def test_tfds_records_are_read_by_index_through_grain(tmp_path):
    """A tfds split prepared as ArrayRecord, as grain reads it: every
    record by index, its label with it, an epoch's order the uniform
    permutation of all records; one prepared as TFRecord is refused with
    the command that prepares it for grain."""
    import tensorflow_datasets as tfds

    from moco_keras import sources

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (12, 20, 24, 3), dtype=np.uint8)
    register_tfds_dataset(
        "MocoTestRecords",
        [(image, i % 3) for i, image in enumerate(images)],
        ["a", "b", "c"],
    )
    data_dir = str(tmp_path / "array_record")
    source = datasets.tfds_source("moco_test_records", data_dir=data_dir)
    assert (
        source.encoded
        and source.num_examples == 12
        and source.class_names == ("a", "b", "c")
    )
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    pixels, labels = views.labelled_arrays(source, 16, mean, std, 1.0)
    assert pixels.shape == (12, 16, 16, 3)
    assert sorted(labels.tolist()) == sorted([0, 1, 2] * 4)
    # tfds stores a split shuffled, not in its keys' order.
    assert labels.tolist() != [0, 1, 2] * 4
    # Each record's view is its image's (JPEG-encoded noise: nearest by
    # far, not equal).
    for row, label in zip(pixels, labels, strict=True):
        gaps = [
            np.abs(
                row - views.center_view(Image.fromarray(i), 16, 1.0) / 255
            ).mean()
            for i in images
        ]
        nearest, second = sorted(gaps)[:2]
        assert int(np.argmin(gaps)) % 3 == label and nearest < 0.6 * second
    augmentation = views.get_augmentation("mocov2", size=16)
    batches = list(views.two_view_batches(source, augmentation, 4, seed=3))
    assert len(batches) == 3
    assert all(q.shape == k.shape == (4, 16, 16, 3) for q, k in batches)
    # The first records: tfds shuffled them, so they are a random draw.
    subset = sources.load_source(
        "tfds/moco_test_records", data_dir, "train", limit=5
    )
    assert subset.num_examples == 5
    first = views.labelled_arrays(subset, 16, mean, std, 1.0)[1]
    np.testing.assert_array_equal(first, labels[:5])

    # A recipe's config takes this source.
    from support import recipe_defaults

    from moco_keras import presets

    config = recipe_defaults(
        presets.PRETRAINING,
        "quickstart",
        dataset="tfds/moco_test_records",
        data_dir=data_dir,
    )
    sources.check_input(config)
    source = sources.data_source(config, "train", 0)
    assert isinstance(source, datasets.TfdsRecordSource)

    with pytest.raises(ValueError, match="expected 'picture' and 'label'"):
        datasets.tfds_source(
            "moco_test_records",
            data_dir=data_dir,
            download=False,
            image_key="picture",
        )
    # tfds' own default format, TFRecord, is read in file order only.
    tfrecord_dir = str(tmp_path / "tfrecord")
    tfds.builder(
        "moco_test_records", data_dir=tfrecord_dir
    ).download_and_prepare()
    with pytest.raises(ValueError) as error:
        datasets.tfds_source("moco_test_records", data_dir=tfrecord_dir)
    assert "is prepared as tfrecord" in str(error.value)
    assert "--file_format=array_record" in str(error.value)
