"""Image datasets as sources: ImageNet-style folders, tfds, Fashion-MNIST.

A source holds its images by index, either encoded (file paths, or a tfds
split's records: `Source.encoded`, decoded once for both views) or as
decoded uint8 `H x W x C` arrays, with their labels. The order of each pass
over them is `permutation`: uniform over the whole dataset and drawn from
the seed and the epoch, as the official code's sampler does. The pipeline
that reads them into batches is `moco_keras.views`.
"""

import concurrent.futures
import gzip
import logging
import os

import numpy as np

logger = logging.getLogger("moco_keras")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Mean and std of the Fashion-MNIST training pixels (in [0, 1]).
FASHION_MNIST_MEAN = (0.2860,) * 3
FASHION_MNIST_STD = (0.3530,) * 3

_FOLDER_LAYOUT = """\
Expected an ImageNet-style folder, one sub-folder per class:
  ROOT/train/n01440764/n01440764_10026.JPEG
  ROOT/train/n01443537/...
  ROOT/val/n01440764/ILSVRC2012_val_00000293.JPEG
Pass ROOT/train (or ROOT/val) as the folder, or ROOT with split='train'."""


class Source:
    """Images and labels that a pipeline reads in any order it draws.

    The images stay where they are (files on disk, or one array in memory);
    a pipeline draws an order of indices (`permutation`), which costs 8
    bytes an image, and reads each image by its index only when it needs
    it: the 1.28M paths of ImageNet are permuted in well under a second,
    every epoch, without a shuffle buffer of decoded images.

    Args:
        items: the images, one row per example: file paths (encoded files)
            or a uint8 `N x H x W x C` array.
        labels: `N` int labels.
        class_names: the class names, index = label.
        encoded: True if an image is encoded file contents (read from a
            path), False if it is a decoded uint8 `H x W x C` array.

    Attributes:
        paths_or_arrays: the `items` as one numpy array (paths as bytes, or
            uint8 images).
        labels: numpy int32 labels.
        class_names: as given.
        encoded: as given.
        num_examples: the number of images.
    """

    def __init__(self, items, labels, class_names, encoded):
        labels = np.asarray(labels, np.int32)
        if len(items) != len(labels):
            raise ValueError(
                f"{len(items)} images but {len(labels)} labels: a Source "
                "needs one label per image."
            )
        self.labels = labels
        self.class_names = tuple(class_names)
        self.encoded = encoded
        self.num_examples = len(labels)
        # Paths as bytes: numpy's str arrays take 4 bytes a character, a
        # 1.28M-path ImageNet list several times the memory (BENCHMARKS.md,
        # the data order's Source row).
        self.paths_or_arrays = (
            np.asarray([os.fsencode(item) for item in items], np.bytes_)
            if encoded
            else np.asarray(items)
        )

    def subset(self, count, seed=0):
        """`count` images drawn at random, each class in proportion to its
        size (`stratified_indices`); the whole source if it has no more."""
        if count >= self.num_examples:
            return self
        indices = stratified_indices(self.labels, count, seed)
        return Source(
            self.paths_or_arrays[indices],
            self.labels[indices],
            self.class_names,
            self.encoded,
        )


def permutation(num_examples, seed, epoch):
    """Epoch `epoch`'s order of `num_examples` images: uniform, a function
    of `(seed, epoch)` (the official code's `DistributedSampler.set_epoch`
    draws a new permutation of all images each epoch too)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def stratified_indices(labels, count, seed=0):
    """`count` indices drawn at random, each class in proportion to its size.

    Every class gets the floor of its share of `count`; the rest go one
    each to the classes with the largest remainders (ties at random), so a
    subset smaller than the number of classes holds `count` classes. The
    indices come back sorted; within a class they are a uniform draw.

    Example:

    >>> labels = np.repeat(np.arange(4), 25)  # sorted by class, as a folder
    >>> picks = stratified_indices(labels, 8, seed=0)
    >>> np.bincount(labels[picks]).tolist()
    [2, 2, 2, 2]
    """
    labels = np.asarray(labels)
    if count >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    _, sizes = np.unique(labels, return_counts=True)
    quota = sizes * count / len(labels)
    take = np.floor(quota).astype(np.int64)
    remainder = quota - take
    by_remainder = np.lexsort((rng.random(len(sizes)), -remainder))
    take[by_remainder[: count - take.sum()]] += 1
    members = np.split(np.argsort(labels, kind="stable"), np.cumsum(sizes)[:-1])
    picks = [
        rng.choice(indices, size, replace=False)
        for indices, size in zip(members, take, strict=True)
    ]
    return np.sort(np.concatenate(picks))


def list_image_folder(root):
    """Files and labels of a class-per-folder tree, as torchvision lists them.

    Classes are the sorted sub-folder names (torchvision's `ImageFolder`
    order, so labels match the official code's); files are sorted within a
    class and kept if their extension is an image one (case-insensitive).

    Returns:
        `(paths, labels, class_names)`.

    Raises:
        FileNotFoundError: `root` does not exist.
        ValueError: `root` holds no class folder or no image.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"No data directory at {root!r}.\n{_FOLDER_LAYOUT}"
        )
    class_names = sorted(
        entry.name for entry in os.scandir(root) if entry.is_dir()
    )
    if not class_names:
        raise ValueError(
            f"{root!r} has no class sub-folders.\n{_FOLDER_LAYOUT}"
        )
    paths, labels, empty, others = [], [], [], {}
    for label, name in enumerate(class_names):
        files = []
        for dirpath, _, filenames in os.walk(os.path.join(root, name)):
            for f in filenames:
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(dirpath, f))
                else:
                    extension = os.path.splitext(f)[1] or "(none)"
                    others[extension] = others.get(extension, 0) + 1
        if not files:
            empty.append(name)
        paths.extend(sorted(files))
        labels.extend([label] * len(files))
    if not paths:
        shown = ", ".join(repr(n) for n in class_names[:5])
        more = (
            f" and {len(class_names) - 5} more" if len(class_names) > 5 else ""
        )
        found = (
            "they hold "
            + ", ".join(f"{n} file(s) {e}" for e, n in sorted(others.items()))
            if others
            else "they hold no file at all"
        )
        raise ValueError(
            f"The {len(class_names)} class folder(s) of {root!r} ({shown}"
            f"{more}) hold no image file: {found}. Images are files named "
            f"*{', *'.join(IMAGE_EXTENSIONS)} (any case), in "
            f"{os.path.join(root, '<class>')}/ or below it."
        )
    if empty:
        # Kept in the class index so that labels stay those of the folders.
        logger.warning(
            "%d empty class folder(s) in %s: %s",
            len(empty),
            root,
            ", ".join(empty),
        )
    return paths, labels, class_names


_MAGIC = {
    b"\xff\xd8\xff": "jpeg",
    b"\x89PNG\r\n\x1a\n": "png",
    b"BM": "bmp",
    b"GIF87a": "gif",
    b"GIF89a": "gif",
}
# Trailers of complete files: a truncated JPEG or PNG lacks its own.
_TRAILERS = {"jpeg": (b"\xff\xd9",), "png": (b"IEND\xaeB`\x82",)}


def _jpeg_end(data):
    """Offset just past the JPEG's end-of-image marker, or None if absent.

    Walks the marker segments from the start and, after each start of scan,
    the entropy-coded data up to the next marker (there, 0xFF is followed
    by 0x00 stuffing, a restart marker or fill bytes), so an end marker
    inside a segment (an EXIF thumbnail's) does not count: it is the
    decoder's own way through the file.
    """
    position, size = 2, len(data)
    while position + 1 < size:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
        elif marker == 0xD9:
            return position + 2
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length
            position += 2
        else:
            if position + 4 > size:
                return None
            position += 2 + int.from_bytes(data[position + 2 : position + 4])
            if marker == 0xDA:  # start of scan: skip the coded data
                while True:
                    position = data.find(b"\xff", position)
                    if position < 0 or position + 1 >= size:
                        return None
                    follower = data[position + 1]
                    if follower == 0x00 or 0xD0 <= follower <= 0xD7:
                        position += 2
                    elif follower == 0xFF:
                        position += 1
                    else:
                        break
    return None


def check_image_file(path):
    """Why `path` cannot be a whole image, or None if it looks like one.

    Reads the first and last bytes: empty files, files of no image format
    TensorFlow decodes, and JPEG / PNG files cut short (no end marker) are
    caught; corruption inside a file is left to the decoder. A JPEG that
    does not end with its end marker is read whole to find it: phones and
    some cameras write data after it, which decoders ignore.
    """
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, size - 16))
            tail = f.read(16)
    except OSError as error:
        return f"unreadable: {error.strerror or error}"
    kind = next((k for m, k in _MAGIC.items() if head.startswith(m)), None)
    if kind is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        kind = "webp"
    if kind is None:
        return "not an image TensorFlow decodes (unknown header)"
    trailers = _TRAILERS.get(kind)
    if trailers and not any(tail.rstrip(b"\x00").endswith(t) for t in trailers):
        if kind == "jpeg":
            try:
                with open(path, "rb") as f:
                    if _jpeg_end(f.read()) is not None:
                        return None  # bytes after the end marker
            except OSError as error:
                return f"unreadable: {error.strerror or error}"
        return f"truncated {kind.upper()} (no end marker)"
    return None


def check_image_files(paths, num_threads=16):
    """`check_image_file` over many files in threads: `[(path, reason)]`."""
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        reasons = list(pool.map(check_image_file, paths))
    return [(p, r) for p, r in zip(paths, reasons, strict=True) if r]


def image_folder(root, split=None, check_files=True):
    """An ImageNet-style folder (`ROOT/<class>/<image>`) as a `Source`.

    Args:
        root: the folder holding class folders, or the dataset root when
            `split` is given (`ROOT/train`, `ROOT/val`).
        split: optional sub-folder name, e.g. "train" or "val".
        check_files: skip files that are empty, not images, or truncated
            (`check_image_file`), naming them in the log. Files that still
            fail to decode are skipped by the pipeline with a warning.

    Returns:
        A `Source` of encoded files.
    """
    if split is not None:
        root = os.path.join(root, split)
    paths, labels, class_names = list_image_folder(root)
    if check_files:
        bad = check_image_files(paths)
        if bad:
            skipped = {p for p, _ in bad}
            logger.warning(
                "Skipping %d of %d files in %s that cannot be decoded:\n%s",
                len(bad),
                len(paths),
                root,
                "\n".join(f"  {p}: {r}" for p, r in bad[:50])
                + ("\n  ..." if len(bad) > 50 else ""),
            )
            kept = [i for i, p in enumerate(paths) if p not in skipped]
            paths = [paths[i] for i in kept]
            labels = [labels[i] for i in kept]
            if not paths:
                raise ValueError(f"No decodable image in {root!r}.")
    return Source(paths, labels, class_names, encoded=True)


def _read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path!r} is not an unsigned-byte IDX file.")
    ndim = data[3]
    shape = np.frombuffer(data[4 : 4 + 4 * ndim], dtype=">u4").astype(int)
    array = np.frombuffer(data[4 + 4 * ndim :], dtype=np.uint8)
    return array.reshape(tuple(shape))


def load_fashion_mnist(split="train", data_dir=None):
    """Fashion-MNIST as numpy: `(images N x 28 x 28 uint8, labels N int32)`.

    Reads the IDX files of Debian's `dataset-fashion-mnist` (in
    `/usr/share/datasets/fashion-mnist`) or of `data_dir`, gzipped or not;
    falls back to tfds `fashion_mnist` (which downloads) when neither holds
    them.
    """
    if split not in ("train", "test"):
        raise ValueError(
            f"split must be 'train' or 'test'. Received: {split!r}"
        )
    prefix = "train" if split == "train" else "t10k"
    for directory in [d for d in (data_dir, FASHION_MNIST_DIR) if d]:
        found = {}
        for part, kind in (("images", "idx3"), ("labels", "idx1")):
            for suffix in (".gz", ""):
                path = os.path.join(
                    directory, f"{prefix}-{part}-{kind}-ubyte{suffix}"
                )
                if os.path.exists(path):
                    found[part] = path
                    break
        if len(found) == 2:
            images, labels = (
                _read_idx(found["images"]),
                _read_idx(found["labels"]),
            )
            return images, labels.astype(np.int32)
        if directory == data_dir:
            raise FileNotFoundError(
                f"No Fashion-MNIST IDX files ({prefix}-images-idx3-ubyte[.gz], "
                f"{prefix}-labels-idx1-ubyte[.gz]) in {data_dir!r}."
            )
    try:
        import tensorflow_datasets as tfds

        images, labels = tfds.as_numpy(
            tfds.load(
                "fashion_mnist", split=split, batch_size=-1, as_supervised=True
            )
        )
    except Exception as error:  # noqa: BLE001 - re-raised with advice.
        raise FileNotFoundError(
            "Fashion-MNIST not found: no IDX files in "
            f"{FASHION_MNIST_DIR} and tfds could not download it. Install "
            "them with `sudo apt-get install dataset-fashion-mnist` (Debian, "
            "Ubuntu) or pass a data_dir holding the four IDX files."
        ) from error
    return images[..., 0], labels.astype(np.int32)


def image_array_source(images, labels, class_names, pad=0):
    """In-memory uint8 images as a `Source`.

    Args:
        images: uint8 `N x H x W` or `N x H x W x C` (C = 1 or 3).
        labels: `N` int labels.
        class_names: the class names, index = label.
        pad: zero padding on each side of the height and width.
    """
    images = np.asarray(images, np.uint8)
    if images.ndim == 3:
        images = images[..., None]
    if pad:
        images = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return Source(images, labels, class_names, encoded=False)


def fashion_mnist_eval_images(images, pad=2):
    """Fashion-MNIST as the quick start's encoder sees it at evaluation.

    uint8 `N x 28 x 28` -> float32 `N x 32 x 32 x 3`: zero-padded by `pad`
    on each side (as `fashion_mnist` pads the training images), scaled to
    [0, 1], normalized with the Fashion-MNIST mean and std, the gray channel
    repeated three times.
    """
    x = np.pad(images, ((0, 0), (pad, pad), (pad, pad))).astype("float32")
    x = (x / 255.0 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
    return np.repeat(x[..., None], 3, axis=-1)


def fashion_mnist(split="train", data_dir=None, pad=2, limit=None, seed=0):
    """Fashion-MNIST as a `Source` of 32 x 32 x 1 uint8 images.

    Args:
        split: "train" (60k) or "test" (10k).
        data_dir: optional folder with the IDX files (see
            `load_fashion_mnist`).
        pad: zero padding on each side (2 gives 32 x 32, the CIFAR size).
        limit: keep `limit` images drawn at random, class-stratified
            (`Source.subset` with `seed`); None: all.
    """
    images, labels = load_fashion_mnist(split, data_dir)
    source = image_array_source(images, labels, FASHION_MNIST_CLASSES, pad)
    return source.subset(limit, seed) if limit else source


class TfdsRecords:
    """A tfds split prepared as ArrayRecord, its records read by index
    (`tfds.data_source`): the images of a `tfds/` dataset as grain reads
    them (`moco_keras.views`), encoded (`SkipDecoding`).

    Picklable for grain's worker processes: each opens the split anew.
    """

    def __init__(self, name, split, data_dir, image_key, label_key):
        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_key, self.label_key = image_key, label_key
        self._source = None
        # The record read last: a labelled view reads an image, then its
        # label (a tuple, replaced whole, so threads see either one).
        self._last = (None, None)

    def __getstate__(self):
        return {**self.__dict__, "_source": None, "_last": (None, None)}

    def _open(self):
        if self._source is None:
            import tensorflow_datasets as tfds

            self._source = tfds.data_source(
                self.name,
                split=self.split,
                data_dir=self.data_dir,
                download=False,
                decoders={self.image_key: tfds.decode.SkipDecoding()},
            )
        return self._source

    def _record(self, index):
        last_index, record = self._last
        if last_index == index:
            return record
        record = self._open()[int(index)]
        self._last = (index, record)
        return record

    def __len__(self):
        return len(self._open())

    def read(self, index):
        """The encoded image of record `index`."""
        return self._record(index)[self.image_key]

    def label(self, index):
        return int(self._record(index)[self.label_key])

    def describe(self, index):
        return f"record {index} of tfds {self.name} {self.split}"


class TfdsRecordSource:
    """A tfds split for grain, read by index: the interface of `Source` as
    `moco_keras.views` reads it (`paths_or_arrays` the `TfdsRecords`,
    `labels` read with their records).

    ArrayRecord files are read by index, so an epoch's order is the
    uniform `permutation` of all records, as for a folder.
    """

    encoded = True

    def __init__(self, records, class_names):
        self.paths_or_arrays = records
        self.labels = _RecordLabels(records)
        self.class_names = tuple(class_names)
        self.num_examples = len(records)

    def subset(self, count, seed=0):
        """The split's first `count` records: tfds stored them shuffled, so
        they are a random draw (not class-stratified; `seed` is unused)."""
        del seed
        if count >= self.num_examples:
            return self
        records = self.paths_or_arrays
        return TfdsRecordSource(
            TfdsRecords(
                records.name,
                f"{records.split}[:{count}]",
                records.data_dir,
                records.image_key,
                records.label_key,
            ),
            self.class_names,
        )


class _RecordLabels:
    """The labels of `TfdsRecords`, each read with its record."""

    def __init__(self, records):
        self._records = records

    def __len__(self):
        return len(self._records)

    def __getitem__(self, index):
        return np.int32(self._records.label(index))


def tfds_source(
    name,
    split="train",
    data_dir=None,
    download=True,
    image_key="image",
    label_key="label",
):
    """A tensorflow-datasets image dataset as a source.

    Images stay encoded (`SkipDecoding`) until the augmentation decodes
    them. `imagenet2012` needs its manual download (the ILSVRC2012 tars) in
    `data_dir/downloads/manual`, as tfds documents.

    The split is read by index, so it must be prepared as ArrayRecord
    (what `tfds.data_source` reads), and `download` prepares it so; one
    prepared as TFRecord (tfds' default, readable in file order only) is
    refused with the command that prepares it.

    Args:
        name: the tfds name, e.g. "imagenet2012" or "imagenette/320px-v2".
        split: a tfds split, e.g. "train" or "validation".
        data_dir: where tfds keeps (or builds) its datasets.
        download: build the dataset first if it is not there yet.
        image_key: the feature name of the image.
        label_key: the feature name of the label.

    Returns:
        A `TfdsRecordSource`.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if download and not builder.is_prepared():
        builder.download_and_prepare(file_format="array_record")
    info = builder.info
    if image_key not in info.features or label_key not in info.features:
        raise ValueError(
            f"tfds dataset {name!r} has features {list(info.features)}; "
            f"expected {image_key!r} and {label_key!r}. Pass "
            "`image_key`/`label_key` with the names this dataset uses."
        )
    if str(getattr(info.file_format, "value", "")) != "array_record":
        where = data_dir or "~/tensorflow_datasets"
        raise ValueError(
            f"tfds dataset {name!r} in {where} is prepared as "
            f"{getattr(info.file_format, 'value', info.file_format)}, which "
            "is read in file order only; grain reads a dataset by index, "
            "from ArrayRecord files. Prepare it so in a data_dir of its own: "
            f"`tfds build {name} --data_dir=NEW_DIR "
            "--file_format=array_record` (in Python: tfds.builder(name, "
            "data_dir=NEW_DIR).download_and_prepare(file_format="
            "'array_record')), then pass --data_dir=NEW_DIR."
        )
    records = TfdsRecords(name, split, data_dir, image_key, label_key)
    return TfdsRecordSource(records, info.features[label_key].names)
