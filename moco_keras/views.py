"""The input pipeline: MoCo's views (their presets, `AUGMENTATIONS`), the
crop half in numpy and PIL, and grain batches of two views or of labelled
views from a `datasets.Source`, on every backend.

`AUGMENTATIONS` holds `mocov1`, `mocov2`, `mocov3` and `cifar` (the
official CIFAR demo) as plain dicts, which this pipeline and the colour
half (`color.ColorAugmentation`) both take; `get_augmentation` copies one
with overrides.

The official loader (`main_moco.py`) builds each view with torchvision's
transforms on PIL images: RandomResizedCrop (PIL's bilinear resize, which
antialiases when it shrinks), the colour ops, then RandomHorizontalFlip.
This module does the crop and the flip as torchvision does them, on the
CPU, into uint8 views; the colour half runs in the model
(`color.ColorAugmentation`), where the accelerator batches it. Flip
commutes with every colour op and the symmetric blur, so the views are the
official ones.

Every draw of an image's two views is a function of `(seed, epoch, index)`
(`view_rng`): the same in any process, on any worker, after any resume.

Example:

    >>> import numpy as np
    >>> image = np.zeros((40, 30, 3), np.uint8)
    >>> view_q, view_k = two_crops(
    ...     image, view_rng(0, 0, 7), AUGMENTATIONS["mocov2"])
    >>> view_q.shape, view_q.dtype
    ((224, 224, 3), dtype('uint8'))
"""

import concurrent.futures
import io
import logging
import math
import os

import numpy as np

from moco_keras import color
from moco_keras import datasets
from moco_keras.color import IMAGENET_MEAN
from moco_keras.color import IMAGENET_STD
from moco_keras.presets import VIEWS

logger = logging.getLogger("moco_keras")


def _preset(**overrides):
    config = {
        "size": 224,
        "scale": (VIEWS["crop_min"], 1.0),
        "ratio": (3.0 / 4.0, 4.0 / 3.0),
        "jitter": (0.4, 0.4, 0.4, 0.1),
        "jitter_p": 0.8,
        "grayscale_p": 0.2,
        "grayscale_first": False,
        "blur_p": 0.5,
        "blur_sigma": (0.1, 2.0),
        "solarize_p": 0.0,
        "flip": True,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    }
    config.update(overrides)
    return config


AUGMENTATIONS = {
    # v1 applies grayscale before an always-on jitter with hue 0.4.
    "mocov1": _preset(
        jitter=(0.4, 0.4, 0.4, 0.4),
        jitter_p=1.0,
        grayscale_first=True,
        blur_p=0.0,
    ),
    "mocov2": _preset(),
    # The official CIFAR-10 demo: RandomResizedCrop(32) with torchvision's
    # default scale, v2 colour, no blur, CIFAR statistics.
    "cifar": _preset(
        size=32,
        scale=(0.08, 1.0),
        blur_p=0.0,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2023, 0.1994, 0.2010),
    ),
}


# MoCo v3's asymmetric pair, BYOL's recipe (`main_moco.py`): crops of
# 0.08 or more, a milder saturation jitter, the blur always on the first
# view and on a tenth of the second, solarization on a fifth of the second.
_MOCOV3_VIEW = _preset(scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1))
AUGMENTATIONS["mocov3"] = (
    {**_MOCOV3_VIEW, "blur_p": 1.0},
    {**_MOCOV3_VIEW, "blur_p": 0.1, "solarize_p": 0.2},
)

# The keys that make a view's crop: equal in the two views of a pair, which
# are batched together.
CROP_KEYS = ("size", "scale", "ratio", "flip")


def get_augmentation(name, **overrides):
    """A copy of preset `name` with overrides: a dict of one view's
    settings that both views take ("mocov1", "mocov2", "cifar"), or a pair
    of them, the first view's and the second's ("mocov3"), with the
    overrides applied to both.

    Example:

    >>> first, second = get_augmentation("mocov3", size=32)
    >>> first["blur_p"], second["solarize_p"], second["size"]
    (1.0, 0.2, 32)
    """
    if name not in AUGMENTATIONS:
        raise ValueError(
            f"Unknown augmentation {name!r}; expected one of "
            f"{sorted(AUGMENTATIONS)}."
        )
    preset = AUGMENTATIONS[name]
    unknown = set(overrides) - set(view_pair(preset)[0])
    if unknown:
        raise ValueError(
            f"Unknown augmentation arguments {sorted(unknown)}; expected some "
            f"of {sorted(view_pair(preset)[0])}."
        )
    configs = [{**config, **overrides} for config in view_pair(preset)]
    for config in configs:
        color.validate(config)
    return configs[0] if isinstance(preset, dict) else tuple(configs)


def view_pair(augmentation):
    """`(first view's, second view's)` settings of an augmentation: a dict
    twice, or a pair whose crop settings (`CROP_KEYS`) agree."""
    if isinstance(augmentation, dict):
        return augmentation, augmentation
    first, second = augmentation
    differ = [key for key in CROP_KEYS if first[key] != second[key]]
    if differ:
        raise ValueError(
            "The two views of a pair are cropped alike and batched together; "
            f"these crop settings differ: {differ}. Give both views the same."
        )
    return first, second


def view_rng(seed, epoch, index):
    """The generator of one image's draws in one epoch."""
    return np.random.default_rng([seed, epoch, int(index)])


def crop_window(rng, height, width, scale, ratio):
    """torchvision's `RandomResizedCrop.get_params`: `(top, left, h, w)`.

    The area fraction ~ U(scale) and the log aspect ratio ~ U(log ratio);
    the first of 10 tries that fits is taken, else the center crop clamped
    to `ratio`.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def decode(image):
    """An RGB PIL image from encoded bytes or a uint8 `H x W (x C)` array."""
    from PIL import Image

    if isinstance(image, (bytes, bytearray)):
        picture = Image.open(io.BytesIO(image))
    else:
        array = np.asarray(image)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        picture = Image.fromarray(array)
    return picture.convert("RGB")


def read_picture(items, encoded, index):
    """The RGB PIL image of item `index` of a source's `paths_or_arrays`.

    A file that fails to decode (past `datasets.check_image_file`, which
    reads only its first and last bytes) is named in a warning and the next
    item's image taken in its place: the batch keeps its size, and a
    resumed run its draws.
    """
    count = len(items)
    # A tfds split (`datasets.TfdsRecords`) holds the encoded images; a
    # folder's items are the files' paths.
    records = isinstance(items, datasets.TfdsRecords)
    for offset in range(count):
        at = (index + offset) % count
        if not encoded:
            return decode(items[at])
        try:
            if records:
                return decode(items.read(at))
            with open(items[at], "rb") as f:
                return decode(f.read())
        except (OSError, ValueError, SyntaxError) as error:
            # PIL raises OSError subclasses for unknown and cut-off data.
            logger.warning(
                "Skipping %s, which does not decode (%s); the next image "
                "takes its place.",
                items.describe(at) if records else os.fsdecode(items[at]),
                error,
            )
    raise ValueError(f"None of the {count} files decodes.")


def center_view(picture, size, crop_fraction=0.875):
    """The official evaluation crop of a PIL image, uint8 `size x size x 3`.

    The short side resized to `round(size / crop_fraction)` (256 for 224;
    PIL's bilinear resize, as torchvision's `Resize` on the official
    loader's PIL images), then the center `size x size`.
    """
    from PIL import Image

    width, height = picture.size
    scale = round(size / crop_fraction) / min(width, height)
    new_width = max(round(width * scale), size)
    new_height = max(round(height * scale), size)
    resized = picture.resize((new_width, new_height), Image.BILINEAR)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    crop = resized.crop((left, top, left + size, top + size))
    return np.asarray(crop, np.uint8)


class LabelledViews:
    """`index -> (view, label)` of a source's images: the evaluation view
    (`center_view`), or with `augmentation` a crop-and-flip view drawn from
    `(seed, epoch, index)`; float32, normalized with `mean` and `std`. A
    picklable map for grain's worker processes."""

    def __init__(
        self,
        source,
        size,
        mean,
        std,
        crop_fraction=0.875,
        augmentation=None,
        seed=0,
        epoch=0,
    ):
        self.items, self.labels = source.paths_or_arrays, source.labels
        self.encoded = source.encoded
        self.size, self.crop_fraction = size, crop_fraction
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.augmentation = augmentation and dict(augmentation)
        self.seed, self.epoch = seed, epoch

    def __call__(self, index):
        picture = read_picture(self.items, self.encoded, index)
        if self.augmentation is None:
            crop = center_view(picture, self.size, self.crop_fraction)
        else:
            rng = view_rng(self.seed, self.epoch, index)
            crop = crop_and_flip(picture, rng, self.augmentation)
        view = (crop.astype(np.float32) / 255.0 - self.mean) / self.std
        return view, self.labels[index]


def labelled_arrays(source, size, mean, std, crop_fraction=0.875):
    """Every image of `source` as an evaluation view in memory, in order.

    What `labelled_batches(source, ...)` gives without an epoch, read with
    PIL in threads (PIL releases the GIL as it decodes and resizes): for
    the kNN monitor.

    Returns:
        `(images, labels)`: float32 `N x size x size x 3`, normalized with
        `mean` and `std`; int32 `N`.
    """
    view = LabelledViews(source, size, mean, std, crop_fraction)
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        rows = list(pool.map(view, range(source.num_examples)))
    labels = np.asarray([label for _, label in rows], np.int32)
    return np.stack([v for v, _ in rows]), labels


def resized_crop(picture, window, size):
    """The window of `picture` resized to `size x size`, uint8: PIL's
    bilinear resize, as torchvision's `resized_crop` on a PIL image (which
    filters over the pixels a shrunk crop drops)."""
    from PIL import Image

    top, left, h, w = window
    crop = picture.crop((left, top, left + w, top + h))
    return np.asarray(crop.resize((size, size), Image.BILINEAR), np.uint8)


def two_crops(image, rng, augmentation):
    """Two views of one image: RandomResizedCrop and horizontal flip each,
    uint8 `size x size x 3`, the draws taken from `rng` in a fixed order
    (window 1, flip 1, window 2, flip 2).

    Args:
        image: encoded bytes (JPEG, PNG, ...), a uint8 array, or a PIL
            image.
        rng: a `numpy.random.Generator` (`view_rng`).
        augmentation: an `AUGMENTATIONS` dict or pair: its `size`,
            `scale`, `ratio` and `flip` are used here, the
            colour entries by `color.ColorAugmentation` in the model.
    """
    picture = image if hasattr(image, "crop") else decode(image)
    return tuple(
        crop_and_flip(picture, rng, config)
        for config in view_pair(augmentation)
    )


def crop_and_flip(picture, rng, augmentation):
    """One view of a PIL image: RandomResizedCrop, then a horizontal flip
    with probability 0.5 if `augmentation["flip"]`; uint8."""
    width, height = picture.size
    window = crop_window(
        rng, height, width, augmentation["scale"], augmentation["ratio"]
    )
    view = resized_crop(picture, window, augmentation["size"])
    # Drawn with or without `flip`, so that the next view's window is the
    # same draw either way.
    coin = rng.uniform()
    if augmentation["flip"] and coin < 0.5:
        view = view[:, ::-1]
    return np.ascontiguousarray(view)


class TwoViews:
    """`index -> (view_q, view_k)` of a source's images in one epoch: a
    picklable map for grain's worker processes."""

    def __init__(self, source, augmentation, seed, epoch):
        self.items = source.paths_or_arrays
        self.encoded = source.encoded
        self.augmentation = view_pair(augmentation)
        self.seed, self.epoch = seed, epoch

    def __call__(self, index):
        picture = read_picture(self.items, self.encoded, index)
        rng = view_rng(self.seed, self.epoch, index)
        return two_crops(picture, rng, self.augmentation)


def epoch_indices(num_examples, batch_size, seed, epoch, shard=None):
    """The image indices this process reads in epoch `epoch`, batch by batch.

    The epoch's order is `datasets.permutation` (uniform, a function of
    `(seed, epoch)`); the last partial global batch is dropped; with
    `shard=(i, n)` process i of n takes the i-th block of
    `batch_size / n` rows of every global batch, so that the processes'
    shares in order are the one-process batch.

    Returns:
        An int array `steps x (batch_size / n)`.
    """
    index, count = shard or (0, 1)
    if batch_size % count:
        raise ValueError(
            f"The global batch of {batch_size} does not split into {count} "
            f"processes' equal shares. Use a multiple of {count}."
        )
    steps = num_examples // batch_size
    if steps == 0:
        raise ValueError(
            f"{num_examples} images make no whole batch of {batch_size}: "
            "use a smaller batch or more images."
        )
    order = datasets.permutation(num_examples, seed, epoch)
    share = batch_size // count
    batches = order[: steps * batch_size].reshape(steps, batch_size)
    return batches[:, index * share : (index + 1) * share]


def two_view_batches(
    source,
    augmentation,
    batch_size,
    seed=0,
    epoch=0,
    skip_batches=0,
    shard=None,
    workers=0,
):
    """One epoch of `(view_q, view_k)` uint8 batches through grain.

    Each epoch reads every image once, in the uniform order
    `datasets.permutation(n, seed, epoch)`, and each view's crop and flip
    are drawn from `(seed, epoch, index)` (`view_rng`): a resumed run, any
    worker and any process read the batches an uninterrupted run reads.
    The colour half goes in the model (`color.ColorAugmentation`).

    Args:
        source: a `datasets.Source` (folders, arrays).
        augmentation: an `AUGMENTATIONS` dict or pair.
        batch_size: the global batch.
        seed: int, with `epoch` fixes the order and every draw.
        epoch: the epoch whose order and draws these are.
        skip_batches: start at this batch of the epoch (a resumed run).
        shard: `(process index, process count)`: this process's rows.
        workers: grain worker processes (0: in this process).

    Returns:
        A grain dataset: iterate it, or pass it to `model.fit`.
    """
    indices = epoch_indices(
        source.num_examples, batch_size, seed, epoch, shard
    )[skip_batches:]
    return _grain_batches(
        indices.ravel(),
        TwoViews(source, augmentation, seed, epoch),
        indices.shape[1],
        True,
        workers,
    )


def labelled_batches(
    source,
    batch_size,
    size,
    mean,
    std,
    crop_fraction=0.875,
    train_augmentation=None,
    seed=0,
    epoch=None,
    skip_batches=0,
    workers=0,
):
    """Batches of `(image, label)` for linear classification, through grain.

    Without `train_augmentation` and `epoch`, the evaluation view of every
    image in the source's order, the last batch kept; with `epoch`, one
    training epoch in the order `datasets.permutation(n, seed, epoch)`
    from batch `skip_batches` on, the last partial batch dropped, its views
    `train_augmentation`'s crop and flip (the official linear transform has
    no colour ops), or evaluation views without one.

    Returns:
        A grain dataset of float32 `N x size x size x 3`, int32 `N`.
    """
    if train_augmentation is not None:
        colored = [
            name for name in color.PROBABILITIES if train_augmentation[name] > 0
        ]
        if colored:
            raise ValueError(
                "`train_augmentation` of labelled batches is crop and flip "
                f"only (the official linear protocol); it sets {colored} "
                "above 0. Use `linear_augmentation`, or set them to 0."
            )
    in_order = train_augmentation is None and epoch is None
    if in_order:
        indices = np.arange(source.num_examples)
    else:
        epoch = epoch or 0
        order = datasets.permutation(source.num_examples, seed, epoch)
        indices = order[skip_batches * batch_size :]
    views = LabelledViews(
        source,
        size,
        mean,
        std,
        crop_fraction,
        train_augmentation,
        seed,
        epoch or 0,
    )
    return _grain_batches(indices, views, batch_size, not in_order, workers)


def linear_augmentation(size, mean, std):
    """The official linear-classification training transform:
    RandomResizedCrop(size, scale 0.08-1) + horizontal flip + normalize."""
    return get_augmentation(
        "mocov2",
        size=size,
        scale=(0.08, 1.0),
        jitter_p=0.0,
        grayscale_p=0.0,
        blur_p=0.0,
        mean=tuple(mean),
        std=tuple(std),
    )


class Rows:
    """`index -> (array[index], ...)`: a picklable map over arrays."""

    def __init__(self, *arrays):
        self.arrays = arrays

    def __call__(self, index):
        return tuple(array[index] for array in self.arrays)


def array_batches(arrays, batch_size, seed=0, epoch=None, skip_batches=0):
    """Batches of rows of `arrays` (e.g. cached features and labels)
    through grain: in order with the last batch kept, or with `epoch` in
    the order `datasets.permutation(n, seed, epoch)` (the order
    `labelled_batches` reads the images in) from batch `skip_batches` on,
    the last partial batch dropped."""
    count = len(arrays[0])
    if epoch is None:
        indices = np.arange(count)
    else:
        order = datasets.permutation(count, seed, epoch)
        indices = order[skip_batches * batch_size :]
    return _grain_batches(
        indices, Rows(*arrays), batch_size, epoch is not None, 0
    )


def _grain_batches(indices, transform, batch_size, drop_remainder, workers):
    """`transform` of each index, batched (grain); in `workers` processes."""
    import grain

    dataset = (
        grain.MapDataset.source(np.asarray(indices).tolist())
        .map(transform)
        .batch(batch_size, drop_remainder=drop_remainder, batch_fn=_stack)
    )
    if workers:
        from absl import flags

        # grain's worker processes read grain's absl flags: outside an absl
        # app (a notebook, a test) they would be unparsed; their defaults
        # are what is meant.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.to_iter_dataset().mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers)
        )
    return dataset


def _stack(rows):
    return tuple(np.stack(column) for column in zip(*rows, strict=True))
