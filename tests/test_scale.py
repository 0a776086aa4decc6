"""What only shows at ImageNet's size, tested at that size by simulation.

ImageNet's folders are sorted by class. A pipeline that reads them through
a shuffle buffer sees a few classes per batch; the official code draws a
uniform permutation of all 1.28M images each epoch. These tests hold the
pretraining and linear pipelines to the uniform draw, on a class-sorted
folder of 100 classes x 300 tiny files (class = colour) and on a path list
of ImageNet's 1,281,167 entries in 1000 sorted classes (not read).
"""

import io
import itertools
import os
import resource
import time

import numpy as np
import pytest
from PIL import Image
from support import data_only
from support import recipe_defaults
from support import register_tfds_dataset

from moco_keras import color
from moco_keras import datasets
from moco_keras import pretraining
from moco_keras import views

pytestmark = data_only

CLASSES, PER_CLASS, VAL_PER_CLASS = 100, 300, 4
BATCH = 256
# 5 x 5 x 4 colours at least 50 apart: the class of a plain view.
PALETTE = np.array(
    [
        (r, g, b)
        for r in (20, 70, 120, 170, 220)
        for g in (20, 70, 120, 170, 220)
        for b in (30, 100, 170, 240)
    ],
    np.float32,
)
# The crop, resize and flip only: the colour of a view stays its class's.
PLAIN = views.get_augmentation(
    "mocov2",
    size=8,
    jitter_p=0.0,
    grayscale_p=0.0,
    blur_p=0.0,
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
)


def uniform_distinct_classes(class_sizes, batch, seed=0, draws=300):
    """Mean and std of the distinct classes in `batch` images drawn at
    random without replacement: the mean exact, the std simulated."""
    sizes = np.asarray(class_sizes, np.float64)
    total = sizes.sum()
    steps = np.arange(batch)
    # P(no image of class c) = prod_i (N - M_c - i) / (N - i).
    absent = np.exp(
        np.log((total - sizes[:, None] - steps) / (total - steps)).sum(1)
    )
    labels = np.repeat(np.arange(len(sizes)), class_sizes)
    rng = np.random.default_rng(seed)
    counts = [
        len(np.unique(labels[rng.choice(len(labels), batch, replace=False)]))
        for _ in range(draws)
    ]
    return float(np.sum(1 - absent)), float(np.std(counts))


def assert_uniform(batches, class_sizes):
    """The batches' mean count of distinct classes is the uniform draw's,
    within 4 standard errors."""
    counts = [len(np.unique(labels)) for labels in batches]
    expected, std = uniform_distinct_classes(class_sizes, len(batches[0]))
    margin = 4 * std * np.sqrt(1 / len(counts) + 1 / 300)
    assert abs(np.mean(counts) - expected) < margin, (
        f"{np.mean(counts):.1f} distinct classes per batch of "
        f"{len(batches[0])}; a uniform draw gives {expected:.1f} +- "
        f"{std:.1f}"
    )
    return float(np.mean(counts)), expected


@pytest.fixture(scope="module")
def sorted_folder(tmp_path_factory):
    """ROOT/train/<100 classes>/300 JPEGs and ROOT/val/<100>/4, sorted as
    ImageNet's; every image of a class is its colour."""
    root = tmp_path_factory.mktemp("sorted") / "ILSVRC2012"
    for label, colour in enumerate(PALETTE.astype(np.uint8)):
        buffer = io.BytesIO()
        Image.fromarray(np.broadcast_to(colour, (8, 10, 3)).copy()).save(
            buffer, "JPEG", quality=95
        )
        contents = buffer.getvalue()
        for split, count in (("train", PER_CLASS), ("val", VAL_PER_CLASS)):
            directory = root / split / f"n{label:08d}"
            os.makedirs(directory)
            for index in range(count):
                (directory / f"n{label:08d}_{index}.JPEG").write_bytes(contents)
    return root


def classes_of_views(images):
    """The class of each plain view (N x H x W x 3 in [0, 1])."""
    colours = images.mean(axis=(1, 2)) * 255.0  # N x 3
    distance = np.abs(colours[:, None] - PALETTE[None]).sum(-1)  # N x 100
    return distance.argmin(1)


def first(batches, count):
    """The first `count` batches of a grain dataset."""
    return list(itertools.islice(iter(batches), count))


@pytest.mark.xdist_group("sorted_folder")
def test_pretraining_batches_hold_as_many_classes_as_a_uniform_draw(
    sorted_folder,
):
    source = datasets.image_folder(str(sorted_folder), split="train")
    assert source.num_examples == CLASSES * PER_CLASS
    # The folder's order is sorted: a batch of it holds one or two classes.
    assert len(np.unique(source.labels[:BATCH])) <= 2
    epochs = []
    for epoch in (0, 1):
        pairs = views.two_view_batches(
            source, PLAIN, BATCH, seed=0, epoch=epoch
        )
        # uint8 crops: the colour half runs in the model.
        batches = [
            (classes_of_views(q / 255.0), classes_of_views(k / 255.0))
            for q, k in first(pairs, 6)
        ]
        for q_classes, k_classes in batches:
            # Both views of an image, and the colour read back right.
            np.testing.assert_array_equal(q_classes, k_classes)
        epochs.append([q for q, _ in batches])
    found, expected = assert_uniform(epochs[0], [PER_CLASS] * CLASSES)
    assert expected > 90 and found > 85  # (a 10k buffer gave 29 here)
    assert_uniform(epochs[1], [PER_CLASS] * CLASSES)
    assert not np.array_equal(epochs[0][0], epochs[1][0])  # a new order


@pytest.mark.xdist_group("sorted_folder")
def test_linear_classification_batches_are_uniform_too(sorted_folder):
    source = datasets.image_folder(str(sorted_folder), split="train")
    augmentation = views.linear_augmentation(8, (0.0,) * 3, (1.0,) * 3)
    orders = []
    for epoch in (0, 1):
        batches = views.labelled_batches(
            source,
            BATCH,
            8,
            (0.0,) * 3,
            (1.0,) * 3,
            train_augmentation=augmentation,
            seed=3,
            epoch=epoch,
        )
        labels = []
        for images, batch_labels in first(batches, 6):
            np.testing.assert_array_equal(
                classes_of_views(images), batch_labels
            )
            labels.append(batch_labels)
        assert_uniform(labels, [PER_CLASS] * CLASSES)
        orders.append(np.concatenate(labels))
    assert not np.array_equal(orders[0], orders[1])
    # --cache_features trains on the rows of its features, in the same
    # order for the same seed and epoch as the image path.
    features = np.eye(CLASSES, dtype=np.float32)[source.labels]
    cached = views.array_batches((features, source.labels), BATCH, 3, 1)
    np.testing.assert_array_equal(
        np.concatenate([label for _, label in first(cached, 6)]), orders[1]
    )


@pytest.mark.xdist_group("sorted_folder")
def test_train_limit_and_knn_bank_are_stratified_draws(sorted_folder):
    values = recipe_defaults(
        dataset="folder",
        data_dir=str(sorted_folder),
        image_size=8,
        crop_fraction=1.0,
        knn_bank=500,
        knn_test=200,
        knn_every=1,
        seed=0,
    )
    monitor = pretraining.knn_monitor(values)
    bank_counts = np.bincount(monitor.bank_labels, minlength=CLASSES)
    assert bank_counts.tolist() == [5] * CLASSES  # the first 500: 2 classes
    assert np.bincount(monitor.test_labels).tolist() == [2] * CLASSES
    assert monitor.bank_images.shape == (500, 8, 8, 3)
    # The bank holds the labelled images themselves (normalized).
    mean, std = np.array(color.IMAGENET_MEAN), np.array(color.IMAGENET_STD)
    np.testing.assert_array_equal(
        classes_of_views(monitor.bank_images * std + mean),
        monitor.bank_labels,
    )
    source = datasets.image_folder(str(sorted_folder), split="train")
    subset = source.subset(1000, seed=0)
    assert np.bincount(subset.labels).tolist() == [10] * CLASSES
    other = source.subset(1000, seed=1)
    assert b"_" in subset.paths_or_arrays[0]  # paths, kept as paths
    # As bytes: numpy's str arrays take 4 bytes a character (ImageNet's
    # 1.28M paths: 536 MiB against 212, BENCHMARKS.md).
    assert source.paths_or_arrays.dtype.kind == "S"
    assert subset.paths_or_arrays.dtype.kind == "S"
    assert not np.array_equal(subset.paths_or_arrays, other.paths_or_arrays)
    # Fewer images than classes: as many classes as images.
    assert len(np.unique(source.subset(64, seed=0).labels)) == 64


def imagenet_sized_labels():
    """1,281,167 labels of 1000 classes, sorted, as ImageNet's train."""
    sizes = np.full(1000, 1281)
    sizes[:167] += 1
    return sizes, np.repeat(np.arange(1000), sizes)


def test_a_permutation_of_imagenets_1_28m_paths(capsys):
    sizes, labels = imagenet_sized_labels()
    assert len(labels) == 1_281_167
    paths = [
        f"/data/ILSVRC2012/train/n{label:08d}/n{label:08d}_{i}.JPEG"
        for i, label in enumerate(labels)
    ]

    def peak_rss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    rss, started = peak_rss(), time.perf_counter()
    source = datasets.Source(paths, labels, range(1000), encoded=True)
    source_cost = time.perf_counter() - started, peak_rss() - rss
    rss, started = peak_rss(), time.perf_counter()
    # What each epoch's start costs: its order, the pipeline's batches of
    # indices.
    order = views.epoch_indices(source.num_examples, BATCH, seed=0, epoch=0)
    order_cost = time.perf_counter() - started, peak_rss() - rss
    whole = datasets.permutation(source.num_examples, seed=0, epoch=0)
    np.testing.assert_array_equal(order.ravel(), whole[: order.size])
    # Every image once: a permutation, not a sample.
    np.testing.assert_array_equal(np.sort(whole), np.arange(len(labels)))
    batches = labels[whole[: 100 * BATCH]].reshape(100, BATCH)
    found, expected = assert_uniform(list(batches), sizes)
    assert expected > 220  # (a 10k buffer: about 32)
    second = labels[views.epoch_indices(len(labels), BATCH, 0, 1)[:100]]
    assert_uniform(list(second), sizes)
    assert not np.array_equal(second, batches)  # a new order each epoch
    # The same (seed, epoch), the same order: a resumed run reads the same.
    again = views.epoch_indices(len(labels), BATCH, seed=0, epoch=0)[0]
    np.testing.assert_array_equal(again, whole[:BATCH])
    with capsys.disabled():
        print(
            f"\n1.28M paths: {found:.1f} classes per batch of {BATCH} "
            f"(uniform {expected:.1f}); the Source of the paths in "
            f"{source_cost[0]:.2f} s, peak RSS +{source_cost[1]:.0f} MiB; "
            f"an epoch's order in {order_cost[0]:.3f} s, peak RSS "
            f"+{order_cost[1]:.0f} MiB"
        )


def test_a_class_sorted_tfds_dataset_is_read_in_a_uniform_order(tmp_path):
    """A tfds split, prepared as ArrayRecord, is read by index: each epoch
    a uniform permutation of all records, as a folder's."""
    classes, per_class, batch = 50, 24, 128
    encoded = []
    for colour in PALETTE[:classes].astype(np.uint8):
        buffer = io.BytesIO()
        Image.fromarray(np.broadcast_to(colour, (8, 10, 3)).copy()).save(
            buffer, "JPEG", quality=95
        )
        encoded.append(buffer.getvalue())

    register_tfds_dataset(
        "MocoSortedImages",
        [
            (encoded[label], label)
            for label in range(classes)
            for _ in range(per_class)
        ],
        [f"c{label}" for label in range(classes)],
    )
    source = datasets.tfds_source("moco_sorted_images", data_dir=str(tmp_path))
    assert source.num_examples == classes * per_class
    epochs = []
    for epoch in (0, 1):
        pairs = views.two_view_batches(
            source, PLAIN, batch, seed=0, epoch=epoch
        )
        epochs.append([classes_of_views(q / 255.0) for q, _ in pairs])
        assert_uniform(epochs[-1], [per_class] * classes)
    assert not np.array_equal(epochs[0][0], epochs[1][0])
    # Every record once an epoch.
    counts = np.bincount(np.concatenate(epochs[0]), minlength=classes)
    assert counts.max() <= per_class and counts.sum() == 9 * batch
    subset = source.subset(300)
    labels = [int(subset.labels[i]) for i in range(subset.num_examples)]
    assert subset.num_examples == len(labels) == 300
    assert len(set(labels)) > 40  # a random draw of the classes
