import gzip
import io
import logging
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_moco
from conftest import register_tfds_dataset
from conftest import tiny_resnet
from PIL import Image

from moco_keras import augment
from moco_keras import data

SMALL = augment.get_augmentation("cifar", size=16)


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
        source = data.image_folder(str(root.parent), split="train")
    assert source.class_names == ("n01", "n02", "n03", "n04_empty")
    assert source.num_examples == len(good)
    assert source.encoded
    assert "n04_empty" in caplog.text
    for bad in ("truncated.JPEG", "empty.JPEG", "notes.JPEG"):
        assert bad in caplog.text
    assert "a.JPEG" not in caplog.text.replace("/", " ").split()
    labels = sorted(int(label) for _, label in source.dataset)
    assert labels == [0, 0, 1, 1, 1, 2]


def test_every_decodable_file_gives_two_rgb_views(messy_folder):
    root, good = messy_folder
    source = data.image_folder(str(root))
    pairs = data.two_view_dataset(source, SMALL, batch_size=1, shuffle=False)
    views = [(q.numpy(), k.numpy()) for q, k in pairs]
    assert len(views) == len(good)
    for q, k in views:
        assert q.shape == k.shape == (1, 16, 16, 3)
        assert np.all(np.isfinite(q)) and not np.allclose(q, k)


def test_files_failing_to_decode_are_skipped_not_fatal(tmp_path):
    # Passes the header and trailer check, fails inside the decoder.
    rng = np.random.default_rng(1)
    ok = save(
        str(tmp_path / "c/ok.jpg"), rng.integers(0, 255, (20, 20, 3), np.uint8)
    )
    broken = bytearray(ok)
    broken[20 : len(broken) - 2] = b"\x00" * (len(broken) - 22)
    (tmp_path / "c/broken.jpg").write_bytes(bytes(broken))
    source = data.image_folder(str(tmp_path))
    assert source.num_examples == 2
    pairs = data.two_view_dataset(source, SMALL, batch_size=1, shuffle=False)
    assert len(list(pairs)) == 1


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
    assert data.check_image_file(str(tmp_path / "c/phone.jpg")) is None
    assert data.check_image_file(str(tmp_path / "c/thumbnail.jpg")) is None
    reason = data.check_image_file(str(tmp_path / "c/cut.jpg"))
    assert reason == "truncated JPEG (no end marker)"
    source = data.image_folder(str(tmp_path))
    assert source.num_examples == 3  # whole, phone, thumbnail
    pairs = data.two_view_dataset(source, SMALL, batch_size=1, shuffle=False)
    views = [q.numpy() for q, _ in pairs]
    assert len(views) == 3 and all(np.isfinite(v).all() for v in views)


def test_missing_or_empty_folders_say_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="one sub-folder per class"):
        data.image_folder(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="no class sub-folders"):
        data.image_folder(str(tmp_path))
    os.makedirs(tmp_path / "cls")
    with pytest.raises(ValueError, match="no image files"):
        data.image_folder(str(tmp_path))


def write_idx(directory, prefix, images, labels):
    os.makedirs(directory, exist_ok=True)
    for part, array in (("images-idx3", images), ("labels-idx1", labels)):
        header = bytes([0, 0, 8, array.ndim]) + b"".join(
            int(d).to_bytes(4, "big") for d in array.shape
        )
        path = os.path.join(directory, f"{prefix}-{part}-ubyte.gz")
        with gzip.open(path, "wb") as f:
            f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(directory, n_train=96, n_test=32):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        # Class-dependent brightness, so that features can tell classes.
        images = rng.integers(0, 60, (n, 28, 28)) + 18 * labels[:, None, None]
        write_idx(directory, prefix, images, labels)


def test_fashion_mnist_idx_files(tmp_path):
    fake_fashion_mnist(str(tmp_path), n_train=12, n_test=5)
    images, labels = data.load_fashion_mnist("train", str(tmp_path))
    assert images.shape == (12, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (12,) and labels.max() < 10
    source = data.fashion_mnist("test", str(tmp_path), limit=3)
    assert source.num_examples == 3 and not source.encoded
    image, _ = next(iter(source.dataset))
    assert image.shape == (32, 32, 1)
    np.testing.assert_array_equal(
        image.numpy()[2:30, 2:30, 0], _first(tmp_path)
    )
    with pytest.raises(FileNotFoundError, match="IDX"):
        data.load_fashion_mnist("train", str(tmp_path / "missing"))


def _first(tmp_path):
    return data.load_fashion_mnist("test", str(tmp_path))[0][0]


def test_same_seed_same_batches_new_epoch_new_views(tmp_path):
    fake_fashion_mnist(str(tmp_path), n_train=32, n_test=4)
    source = data.fashion_mnist("train", str(tmp_path))

    def first_batch(seed):
        pairs = data.two_view_dataset(source, SMALL, batch_size=8, seed=seed)
        return next(iter(pairs))[0].numpy()

    np.testing.assert_array_equal(first_batch(3), first_batch(3))
    assert not np.allclose(first_batch(3), first_batch(4))
    pairs = data.two_view_dataset(source, SMALL, batch_size=8, seed=3)
    epoch1, epoch2 = (next(iter(pairs))[0].numpy() for _ in range(2))
    assert not np.allclose(epoch1, epoch2)


def test_worker_shards_split_every_global_batch(tmp_path):
    """Under several workers each reads its share of every global batch:
    the same images and views as the one-worker batch, none twice."""
    fake_fashion_mnist(str(tmp_path), n_train=48, n_test=4)
    source = data.fashion_mnist("train", str(tmp_path))

    def batches(shard, batch_size):
        pairs = data.two_view_dataset(
            source,
            SMALL,
            batch_size,
            seed=5,
            epoch=1,
            skip_batches=1,
            shard=shard,
        )
        return [np.stack([q.numpy(), k.numpy()]) for q, k in pairs]

    whole = batches(None, 8)
    shards = [batches((index, 2), 8) for index in (0, 1)]
    assert len(whole) == len(shards[0]) == len(shards[1]) == 5
    for i, batch in enumerate(whole):  # 2 x 8 x 16 x 16 x 3
        np.testing.assert_array_equal(shards[0][i], batch[:, 0::2])
        np.testing.assert_array_equal(shards[1][i], batch[:, 1::2])
    with pytest.raises(ValueError, match="does not split over 3 workers"):
        batches((0, 3), 8)


def test_fit_on_two_view_pipeline(tmp_path):
    fake_fashion_mnist(str(tmp_path), n_train=32, n_test=4)
    source = data.fashion_mnist("train", str(tmp_path))
    pairs = data.two_view_dataset(source, SMALL, batch_size=8, seed=0)
    model = make_moco(tiny_resnet(bn_splits=2, size=16), queue_size=16)
    history = model.fit(pairs, epochs=2, verbose=0, shuffle=False)
    assert np.all(np.isfinite(history.history["loss"]))
    assert int(keras.ops.convert_to_numpy(model.queue_ptr.value)) == 64 % 16


@pytest.mark.process
@pytest.mark.backends("jax")
def test_quickstart_runs_end_to_end(tmp_path):
    fake_fashion_mnist(str(tmp_path / "fmnist"))
    workdir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "moco_keras.recipes.quickstart",
            f"--data_dir={tmp_path / 'fmnist'}",
            f"--workdir={workdir}",
            "--epochs=2",
            "--train_limit=64",
            "--batch_size=32",
            "--moco_k=64",
            "--bn_splits=2",
            "--width=2",
            "--knn_k=5",
            "--knn_bank=48",
            "--knn_test=16",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "KERAS_BACKEND": keras.backend.backend()},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MoCo v2 encoder, 2 epochs" in result.stdout
    for name in ("flags.json", "epochs.csv", "curves.png", "results.json"):
        assert (workdir / name).stat().st_size > 0
    assert tf.io.gfile.exists(str(workdir / "knn.csv"))


def test_tfds_source_reads_a_locally_built_dataset(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (6, 20, 24, 3), dtype=np.uint8)
    register_tfds_dataset(
        "MocoTestImages",
        [(image, i % 2) for i, image in enumerate(images)],
        ["a", "b"],
    )
    source = data.tfds_source("moco_test_images", data_dir=str(tmp_path))
    assert source.encoded and source.num_examples == 6
    assert source.class_names == ("a", "b")
    labels = [int(label) for _, label in source.dataset]
    assert sorted(labels) == [0, 0, 0, 1, 1, 1]
    pairs = data.two_view_dataset(source, SMALL, batch_size=3, seed=0)
    q, k = next(iter(pairs))
    assert q.shape == k.shape == (3, 16, 16, 3)
    assert np.all(np.isfinite(q)) and not np.allclose(q, k)
    with pytest.raises(ValueError, match="expected 'picture' and 'label'"):
        data.tfds_source(
            "moco_test_images",
            data_dir=str(tmp_path),
            download=False,
            image_key="picture",
        )
