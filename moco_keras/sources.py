"""The data a run's config reads: its dataset as a source, the input
pipeline that reads it (tf.data or grain), and evaluation views in memory.

`data.dataset` names the dataset (`folder`, `fashion_mnist`,
`tfds/<name>`), `data.input` the pipeline (`INPUTS`); `check_input`
refuses a pipeline this host or the rest of the config cannot use, before
any data is read. The datasets themselves are `moco_keras.datasets`.
"""

import importlib.util

import numpy as np

from moco_keras import color
from moco_keras.configs import check

# `data.input`: tf.data, or grain (`moco_keras.views`, no TensorFlow).
INPUTS = ("auto", "tf_data", "grain")


def tensorflow_available():
    """Whether `import tensorflow` can work here (without importing it)."""
    return importlib.util.find_spec("tensorflow") is not None


def input_pipeline(config):
    """How the run reads its images: "tf_data" or "grain".

    The config's `data.input`; "auto" is tf.data where TensorFlow is
    installed, grain (`moco_keras.views`) where it is not.
    """
    name = config["data"]["input"]
    if name == "auto":
        return "tf_data" if tensorflow_available() else "grain"
    return name


def check_input(config):
    """`data.input` against this host and the rest of the config."""
    data, run = config["data"], config["run"]
    name = data["input"]
    check(
        name in INPUTS,
        f"Unknown --input={name!r}: expected one of {', '.join(INPUTS)}.",
    )
    if name == "tf_data":
        check(
            tensorflow_available(),
            "--input=tf_data reads through tf.data, and TensorFlow is not "
            "installed here. Install it (pip install tensorflow-cpu, or "
            "tensorflow[and-cuda] for GPUs) or use --input=grain.",
        )
    if input_pipeline(config) != "grain":
        return
    check(
        run["strategy"] != "tpu",
        "--strategy=tpu reads its input on the TPU hosts through tf.data "
        "graphs, which grain's Python batches cannot feed: use "
        "--input=tf_data with it.",
    )
    check(
        data["workers"] >= 0,
        f"--workers is a count of grain worker processes: {data['workers']}",
    )


def dataset_stats(dataset):
    """(mean, std) of the normalization the dataset's images get."""
    if dataset == "fashion_mnist":
        from moco_keras import datasets

        return datasets.FASHION_MNIST_MEAN, datasets.FASHION_MNIST_STD
    return color.IMAGENET_MEAN, color.IMAGENET_STD


def load_source(
    dataset,
    data_dir,
    split,
    limit=0,
    val_split="validation",
    seed=0,
    by_index=False,
):
    """A `datasets.Source` by the config's name; `split` is "train" or "val".

    `limit` keeps that many images drawn at random (class-stratified where
    the labels are known: `Source.subset`, with `seed`). `by_index`: a
    `tfds/` dataset read by index, as grain reads (`TfdsRecordSource`). A
    folder or files that cannot be read raise `ConfigError` with their
    message.
    """
    # tf.data: imported here, so that the run-keeping above imports on hosts
    # without TensorFlow.
    from moco_keras import datasets

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
                by_index=by_index,
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
        by_index=input_pipeline(config) == "grain",
    )


def evaluation_arrays(config, split, count, normalization=None):
    """`(images, labels, source)` of `count` images of `split` (0: all),
    drawn at random and class-stratified, as evaluation views in memory."""
    data = config["data"]
    mean, std = normalization or dataset_stats(data["dataset"])
    source = data_source(config, split, count)
    if input_pipeline(config) == "grain":
        from moco_keras import views

        images, labels = views.labelled_arrays(
            source, data["image_size"], mean, std, data["crop_fraction"]
        )
        return images, labels, source
    from moco_keras import pipelines

    images, labels = [], []
    for x, y in pipelines.labelled_dataset(
        source,
        256,
        data["image_size"],
        mean,
        std,
        crop_fraction=data["crop_fraction"],
    ):
        images.append(x.numpy())
        labels.append(y.numpy())
    return np.concatenate(images), np.concatenate(labels), source
