"""The data a run's config reads: its dataset as a source, the checks of
its reading, and evaluation views in memory.

`data.dataset` names the dataset (`folder`, `fashion_mnist`,
`tfds/<name>`); `check_input` refuses reading settings the rest of the
config cannot use, before any data is read. The datasets themselves are
`moco_keras.datasets`, the pipeline that reads them `moco_keras.views`.
"""

import importlib.util

from moco_keras import color
from moco_keras import datasets
from moco_keras import views
from moco_keras.configs import check


def tensorflow_available():
    """Whether `import tensorflow` can work here (without importing it)."""
    return importlib.util.find_spec("tensorflow") is not None


def check_input(config):
    """`data.workers` of the config."""
    workers = config["data"]["workers"]
    check(
        workers >= 0,
        f"--workers is a count of grain worker processes, not {workers}: "
        "use 0 to read in the training process, or more.",
    )


def dataset_stats(dataset):
    """(mean, std) of the normalization the dataset's images get."""
    if dataset == "fashion_mnist":
        return datasets.FASHION_MNIST_MEAN, datasets.FASHION_MNIST_STD
    return color.IMAGENET_MEAN, color.IMAGENET_STD


def load_source(
    dataset,
    data_dir,
    split,
    limit=0,
    val_split="validation",
    seed=0,
):
    """A `datasets.Source` by the config's name; `split` is "train" or "val".

    `limit` keeps that many images drawn at random (class-stratified where
    the labels are known: `Source.subset`, with `seed`). A folder or files
    that cannot be read raise `ConfigError` with their message.
    """
    try:
        if dataset == "fashion_mnist":
            source = datasets.fashion_mnist(
                "train" if split == "train" else "test", data_dir
            )
        elif dataset == "folder":
            source = datasets.image_folder(data_dir, split=split)
        else:
            source = datasets.tfds_source(
                dataset[len("tfds/") :],
                split="train" if split == "train" else val_split,
                data_dir=data_dir,
            )
    except (OSError, ValueError) as error:
        check(False, f"--dataset={dataset} --data_dir={data_dir}: {error}")
    return source.subset(limit, seed) if limit else source


def data_source(config, split, limit):
    """`load_source` of the config's `data` section and seed."""
    data = config["data"]
    return load_source(
        data["dataset"],
        data["data_dir"],
        split,
        limit=limit,
        val_split=data["val_split"],
        seed=config["run"]["seed"],
    )


def evaluation_arrays(config, split, count, normalization=None):
    """`(images, labels, source)` of `count` images of `split` (0: all),
    drawn at random and class-stratified, as evaluation views in memory."""
    data = config["data"]
    mean, std = normalization or dataset_stats(data["dataset"])
    source = data_source(config, split, count)
    images, labels = views.labelled_arrays(
        source, data["image_size"], mean, std, data["crop_fraction"]
    )
    return images, labels, source
