"""The run-keeping every protocol shares: a config's checks, its data, its
optimizer, the workdir, the resume contract, the callbacks and `fit`.

The protocols are `moco_keras.pretraining.pretrain`,
`moco_keras.linear_classification.linear_classification` and the quick
start's `moco_keras.evaluation.quickstart`. Each takes one config: a preset
of `moco_keras.presets` (`PRETRAINING`, `LINEAR_CLASSIFICATION`), whose
sections are the arguments of the library's parts (`model`, `encoder`,
`augmentation`, `data`, `optimizer`, `schedule`, `knn`, `classifier`,
`run`), with what the run changes (`config`). The recipes map the official
scripts' flags onto those sections (`moco_keras.recipes.common`).

A run lives in its workdir (`run.workdir`): `config.json` (the config it
started with, which `lincls` and `export` read back), `epochs.csv`,
`curves.png`, `tensorboard/`, `checkpoints/ckpt-<step>.keras` and
`results.json`. Calling the protocol again after the run died resumes it
from its newest checkpoint, mid-epoch included, provided the config differs
only in `RESUMABLE` (`check_resume`); a finished run only reports.

A run of it is `moco_keras.pretraining`.

Example:

    >>> mocov2 = config(
    ...     presets.PRETRAINING["mocov2"], model={"queue_size": 4096}
    ... )
    >>> mocov2["model"]["queue_size"], mocov2["model"]["temperature"]
    (4096, 0.2)
    >>> presets.PRETRAINING["mocov2"]["model"]["queue_size"]  # unchanged
    65536
"""

import importlib.util
import json
import logging
import math
import os
import warnings

import keras
import numpy as np

from moco_keras import color
from moco_keras import distribute
from moco_keras import optimizers
from moco_keras import presets
from moco_keras import training

# The values (`section.key`) that may differ when a workdir is run again:
# how long the run goes on (`schedule.epochs`, so a finished run can be
# extended), what it prints, logs and keeps, how the step is compiled, and
# where the same data lies. Every other value changes the model, the data
# or the optimizer's state, and `check_resume` refuses a rerun that changes
# it.
# Keys newer than some workdirs' config.json, with the value those runs
# had: a run started before a key existed resumes with it.
ADDED_KEYS = {"run.health": True}

RESUMABLE = (
    "schedule.epochs",
    "run.workdir",
    "data.data_dir",
    "data.workers",
    "run.verbose",
    "run.log_every_steps",
    "run.checkpoint_steps",
    "run.keep_checkpoints",
    "run.keep_every_epochs",
    "run.jit_compile",
    "run.deterministic",
    "knn.every",
    "knn.bank",
    "knn.test",
    "knn.k",
    "knn.t",
)

# `data.input`: tf.data, or grain (`moco_keras.views`, no TensorFlow).
INPUTS = ("auto", "tf_data", "grain")

# The smallest crop the recipes take: 8 x 8 pixels (Fashion-MNIST's 28 is
# the smallest any preset uses).
MIN_IMAGE_SIZE = 8

CONFIG_FILE = "config.json"


class ConfigError(ValueError):
    """A config that cannot run (contradictory values, missing data): the
    recipes print its message and exit 1, without a traceback."""


def config(preset, **sections):
    """`preset` (a dict of `moco_keras.presets`) with the keys of
    `sections` replaced: `config(preset, model={"queue_size": 4096})`.

    Raises:
        ConfigError: a section or key the preset does not have.
    """
    for name, values in sections.items():
        check(
            name in preset,
            f"Unknown config section {name!r}: this config has "
            f"{sorted(preset)}.",
        )
        if not isinstance(preset[name], dict):
            continue  # a value of its own, such as `method`
        unknown = set(values) - set(preset[name])
        check(
            not unknown,
            f"Unknown keys {sorted(unknown)} in config section {name!r}: "
            f"expected some of {sorted(preset[name])}.",
        )
    return presets.merge(preset, **sections)


def check(condition, message):
    """Raises `ConfigError(message)` unless `condition`."""
    if not condition:
        raise ConfigError(message)


def flatten(config):
    """`{"section.key": value}` of a config, its values as JSON stores them
    (a tuple is a list); a value outside the sections under its own name
    (`method`)."""
    flat = {}
    for section, values in json.loads(json.dumps(config)).items():
        if isinstance(values, dict):
            flat.update({f"{section}.{key}": v for key, v in values.items()})
        else:
            flat[section] = values
    return flat


# --- Checks, before any data is read ----------------------------------------


def check_common(config):
    """Contradictions among the values every protocol has.

    Returns:
        The schedule milestones as ints.
    """
    data, schedule, run = config["data"], config["schedule"], config["run"]
    check(run["workdir"], "--workdir is required: where the run lives.")
    epochs = schedule["epochs"]
    check(epochs >= 1, f"--epochs must be >= 1: {epochs}")
    check(
        data["batch_size"] >= 1,
        f"--batch_size must be >= 1: {data['batch_size']}",
    )
    lr = config["optimizer"]["lr"]
    check(
        lr > 0 and math.isfinite(lr),
        f"--lr must be a finite number > 0: {lr}",
    )
    check(
        run["log_every_steps"] >= 1,
        f"--log_every_steps must be >= 1: {run['log_every_steps']}",
    )
    dataset = data["dataset"]
    check(
        dataset in ("folder", "fashion_mnist") or dataset.startswith("tfds/"),
        f"Unknown --dataset={dataset!r}: expected 'folder', 'fashion_mnist' "
        "or 'tfds/<name>' (e.g. tfds/imagenet2012).",
    )
    check(
        dataset != "folder" or data["data_dir"],
        "--dataset=folder needs --data_dir=ROOT with ROOT/train/<class>/* "
        "(and ROOT/val/<class>/* for evaluation).",
    )
    check_input(config)
    name = config["optimizer"].get("name", "sgd")
    check(
        name in optimizers.OPTIMIZERS,
        f"Unknown --optimizer={name!r}: expected one of "
        f"{optimizers.OPTIMIZERS}.",
    )
    if "warmup_epochs" in schedule:
        warmup = schedule["warmup_epochs"]
        check(
            0 <= warmup < epochs,
            f"--warmup_epochs={warmup} must be in [0, --epochs={epochs}): "
            "the cosine follows the warm-up within the run.",
        )
    try:
        milestones = sorted(int(m) for m in schedule.get("milestones") or [])
    except ValueError:
        check(False, f"--schedule must list epochs: {schedule['milestones']}")
    if not schedule.get("cosine", True):
        late = [m for m in milestones if not 0 < m < epochs]
        check(
            not late,
            f"--schedule milestones {late} are not inside the run's "
            f"{epochs} epochs: the lr step would never happen. Give epochs "
            "in (0, --epochs), or --cos.",
        )
    try:
        distribute.check_strategy(run["strategy"])
    except ValueError as error:
        check(False, str(error))
    check(
        run["cpu_devices"] >= 0,
        f"--cpu_devices must be >= 0: {run['cpu_devices']}",
    )
    check(
        0 < data["crop_fraction"] <= 1,
        f"--crop_fraction must be in (0, 1]: {data['crop_fraction']}",
    )
    check(
        data["image_size"] >= MIN_IMAGE_SIZE,
        f"--image_size={data['image_size']} is the side of the crops in "
        f"pixels: it must be >= {MIN_IMAGE_SIZE} (224 for ImageNet, 28 for "
        "Fashion-MNIST).",
    )
    return milestones


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
        not data["dataset"].startswith("tfds/"),
        f"--dataset={data['dataset']} is read through tf.data (TensorFlow "
        "datasets), and this run reads with grain"
        + ("" if name == "grain" else " (TensorFlow is not installed)")
        + ". Install TensorFlow and use --input=tf_data, or write the "
        "images as a folder of class folders (--dataset=folder).",
    )
    check(
        run["strategy"] in ("none", "data_parallel"),
        f"--strategy={run['strategy']} is tf.distribute's, which reads "
        "tf.data: use --input=tf_data with it (grain feeds --strategy=none "
        "and JAX's data_parallel).",
    )
    check(
        data["workers"] >= 0,
        f"--workers is a count of grain worker processes: {data['workers']}",
    )


def check_devices(config, devices):
    """The global batch against the run's devices (a pretraining method's
    own values: `methods.Method.check_devices`)."""
    batch = config["data"]["batch_size"]
    check(
        batch % devices == 0,
        f"--batch_size={batch} does not split over {devices} devices: the "
        f"batch is global. Use a multiple of {devices}.",
    )


# --- Data --------------------------------------------------------------------


def dataset_stats(dataset):
    """(mean, std) of the normalization the dataset's images get."""
    if dataset == "fashion_mnist":
        from moco_keras import datasets

        return datasets.FASHION_MNIST_MEAN, datasets.FASHION_MNIST_STD
    return color.IMAGENET_MEAN, color.IMAGENET_STD


def load_source(
    dataset, data_dir, split, limit=0, val_split="validation", seed=0
):
    """A `datasets.Source` by the config's name; `split` is "train" or "val".

    `limit` keeps that many images drawn at random (class-stratified where
    the labels are known: `Source.subset`, with `seed`). A folder or files
    that cannot be read raise `ConfigError` with their message.
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


# --- Pieces of a run ---------------------------------------------------------


def jit_compile(config):
    """`compile`'s `jit_compile` for the config: its `run.jit_compile` (XLA
    for TensorFlow, `torch.compile` for torch), and always on JAX, whose
    trainer otherwise runs the step op by op, untraced."""
    return keras.backend.backend() == "jax" or bool(
        config["run"]["jit_compile"]
    )


def check_resume(config):
    """Refuses a rerun of a workdir with values its run did not start with.

    A workdir that holds a checkpoint resumes from it; its `config.json`
    holds the config the run started with. Any difference outside
    `RESUMABLE` would load a checkpoint into another model (a queue of
    another size: a Keras load error) or go on with other data or another
    optimizer, so it raises `ConfigError` naming each differing value
    (`section.key`) with both, before anything is loaded.
    """
    workdir = config["run"]["workdir"]
    path = os.path.join(workdir, CONFIG_FILE)
    checkpoint, _ = training.latest_checkpoint(
        os.path.join(workdir, "checkpoints")
    )
    if checkpoint is None or not os.path.isfile(path):
        return
    with open(path) as f:
        stored = {**ADDED_KEYS, **flatten(json.load(f))}
    current = flatten(config)
    if "method" in current and "method" not in stored:
        # A run started before configs named their method: its `model`
        # and `augmentation` values, compared below, are what differs.
        stored["method"] = current["method"]
    changed = [
        f"{key}: {stored.get(key)!r} in its {CONFIG_FILE}, "
        f"{current.get(key)!r} now"
        for key in sorted(stored.keys() | current.keys())
        if key not in RESUMABLE and stored.get(key) != current.get(key)
    ]
    check(
        not changed,
        f"run.workdir={workdir} holds a run that started with other values, "
        f"and it resumes from {checkpoint}:\n  "
        + "\n  ".join(changed)
        + "\nThese change the model, the data or the optimizer's state. Give "
        "the run's own values to resume it, or a new run.workdir to start "
        "another run. A resumed run may change only: "
        + ", ".join(RESUMABLE)
        + ".",
    )


def write_json_atomically(path, payload):
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    os.replace(temporary, path)


def set_up(config):
    """Devices and backend options of the config; the workdir's paths.

    Returns:
        `(paths, strategy)`: the workdir's subpaths, and the
        `tf.distribute` strategy to build the model in (None: none).
    """
    run = config["run"]
    check_resume(config)
    try:
        strategy = distribute.make_strategy(
            run["strategy"], cpu_devices=run["cpu_devices"]
        )
    except ValueError as error:
        check(False, str(error))
    if strategy is not None:
        # tf.distribute logs every collective it builds at INFO: hundreds
        # of lines per traced step, which would bury the progress bars.
        logging.getLogger("tensorflow").setLevel(logging.WARNING)
    if run["mixed_precision"]:
        keras.mixed_precision.set_dtype_policy(run["mixed_precision"])
    if run["deterministic"] and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
        if os.environ.get("TF_ENABLE_ONEDNN_OPTS") != "0":
            warnings.warn(
                "--deterministic with TensorFlow's oneDNN kernels on: runs "
                "can still differ in the last bits (seen on AVX2 CPUs). For "
                "bitwise-repeatable runs set TF_ENABLE_ONEDNN_OPTS=0 before "
                "starting.",
                stacklevel=2,
            )
    keras.utils.set_random_seed(run["seed"])
    workdir = run["workdir"]
    chief = distribute.is_chief(strategy)
    if chief:
        os.makedirs(workdir, exist_ok=True)
        write_json_atomically(os.path.join(workdir, CONFIG_FILE), config)
    paths = {
        "checkpoints": os.path.join(workdir, "checkpoints"),
        "csv": os.path.join(workdir, "epochs.csv"),
        "png": os.path.join(workdir, "curves.png"),
        "tensorboard": os.path.join(workdir, "tensorboard"),
        "results": os.path.join(workdir, "results.json"),
        # Under several workers only the chief writes files; the workdir
        # must be one storage that every worker reads (they all resume
        # from its checkpoints).
        "chief": chief,
    }
    return paths, strategy


def callbacks(
    paths,
    steps_per_epoch,
    config,
    title,
    extra=(),
    queue_size=None,
    views=None,
):
    """Loss watch, extra (e.g. kNN), CSV, curves, TensorBoard, checkpoints.

    TensorBoard gets the epoch means (Keras' callback, the kNN top-1
    included), every `run.log_every_steps` steps the step's numbers and
    the learning rate, and `views` (a `(view_q, view_k)` batch, optional)
    as an image grid (`training.StepLog`).

    The order matters: the loss check runs first so nothing is saved after
    a NaN; the CSV row is written before the checkpoint that ends the epoch.
    Workers other than the chief keep the loss check, `extra` and the
    checkpointer (which they must run in step with the chief) and write
    nothing.
    """
    run = config["run"]
    checkpointer = training.Checkpointer(
        paths["checkpoints"],
        steps_per_epoch,
        every_steps=run["checkpoint_steps"],
        keep=run["keep_checkpoints"],
        keep_every_epochs=run["keep_every_epochs"],
        chief=paths["chief"],
    )
    if not paths["chief"]:
        return [training.LossWatch(queue_size), *extra, checkpointer]
    logs = [
        keras.callbacks.CSVLogger(paths["csv"], append=True),
        training.CurvePlot(paths["csv"], paths["png"], title),
    ]
    if tensorflow_available():
        logs += [
            keras.callbacks.TensorBoard(paths["tensorboard"]),
            training.StepLog(
                paths["tensorboard"], run["log_every_steps"], views=views
            ),
        ]
    else:
        # Keras' TensorBoard callback writes through tf.summary.
        print(
            "No TensorBoard logs: they are written through TensorFlow, "
            "which is not installed; epochs.csv and curves.png hold the "
            "curves."
        )
    return [training.LossWatch(queue_size), *extra, *logs, checkpointer]


def fit(
    model,
    epoch_dataset,
    config,
    steps_per_epoch,
    paths,
    callbacks,
    validation_data=None,
):
    """`training.fit_resumable` in the workdir; the start step back."""
    verbose = config["run"]["verbose"]
    return training.fit_resumable(
        model,
        epoch_dataset,
        config["schedule"]["epochs"],
        steps_per_epoch,
        paths["checkpoints"],
        callbacks=callbacks,
        csv_path=paths["csv"] if paths["chief"] else None,
        verbose=verbose if verbose == "auto" else int(verbose),
        validation_data=validation_data,
    )
