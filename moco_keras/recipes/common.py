"""Flags and pieces shared by the pretraining and linear-classification
recipes: datasets by name, the workdir, checkpoints, logs and checks."""

import json
import math
import os

from absl import flags

FLAGS = flags.FLAGS

# Shared by the recipes. A flag whose default is None here takes its value
# from the recipe's preset (`moco_keras.presets`, `--preset`) unless given.
flags.DEFINE_string(
    "preset",
    None,
    "The run's preset in moco_keras.presets: pretrain: mocov1 (default), "
    "mocov2, quickstart; lincls: imagenet (default). Flags given replace "
    "its values.",
)
flags.DEFINE_string("workdir", None, "Where checkpoints and logs go.")
flags.DEFINE_string(
    "dataset",
    None,
    "'folder' (an ImageNet-style tree: DATA_DIR/train/<class>/*, "
    "DATA_DIR/val/<class>/*), 'fashion_mnist' (Debian's IDX files), or "
    "'tfds/<name>' (any tensorflow-datasets image dataset).",
)
flags.DEFINE_string("data_dir", None, "The dataset's folder.")
flags.DEFINE_integer("image_size", None, "Crop size of the views.")
flags.DEFINE_integer(
    "train_limit",
    None,
    "Train on N training images drawn at random, each class in proportion "
    "(0: all).",
)
flags.DEFINE_integer("epochs", None, "Total epochs.")
flags.DEFINE_integer("batch_size", None, "Global batch size.")
flags.DEFINE_float("lr", None, "Learning rate (for --lr_batch_size).")
flags.DEFINE_integer(
    "lr_batch_size",
    None,
    "If > 0, --lr is for a batch of this size and is scaled linearly to "
    "--batch_size (lr * batch_size / lr_batch_size); 0 takes --lr as is.",
)
flags.DEFINE_list(
    "schedule", None, "Epochs at which the lr is multiplied by 0.1."
)
flags.DEFINE_bool("cos", None, "Cosine lr schedule (then --schedule is off).")
flags.DEFINE_float("momentum", None, "SGD momentum.")
flags.DEFINE_float("wd", None, "Weight decay (L2, coupled as torch's SGD).")
flags.DEFINE_integer("seed", 0, "Seed of weights, data order and draws.")
flags.DEFINE_float(
    "crop_fraction",
    None,
    "Evaluation: resize the short side to image_size / crop_fraction, then "
    "center crop (0.875: 256 -> 224); 1 for small images.",
)
flags.DEFINE_integer(
    "bn_splits",
    None,
    "BN groups over the global batch: the official code's GPU count (8). "
    "On one device split BN simulates them; over D devices (--strategy) "
    "each device takes bn_splits / D groups. 1: plain BN on one device.",
)
flags.DEFINE_integer(
    "checkpoint_steps", 0, "Also checkpoint every N steps (0: per epoch)."
)
flags.DEFINE_integer("keep_checkpoints", 3, "Newest checkpoints to keep.")
flags.DEFINE_integer(
    "keep_every_epochs", None, "Also keep every N-th epoch's checkpoint."
)
flags.DEFINE_enum(
    "mixed_precision",
    None,
    ["mixed_float16", "mixed_bfloat16"],
    "Keras dtype policy (GPUs: mixed_float16 / mixed_bfloat16).",
)
flags.DEFINE_bool("jit_compile", False, "XLA-compile the train step.")
flags.DEFINE_bool(
    "deterministic",
    False,
    "TensorFlow backend: deterministic kernels (bitwise-repeatable runs).",
)
flags.DEFINE_enum("verbose", "auto", ["auto", "0", "1", "2"], "fit verbosity.")
flags.DEFINE_enum(
    "strategy",
    "none",
    ["none", "mirrored", "multi_worker", "tpu", "data_parallel"],
    "Devices: 'none' (one device), 'mirrored' (all GPUs of this machine), "
    "'multi_worker' (several machines, TF_CONFIG), 'tpu' (TensorFlow "
    "backend); 'data_parallel' (all devices, JAX backend). --batch_size and "
    "--lr stay global.",
)
flags.DEFINE_string(
    "output", None, "recipes/convert, recipes/export: the directory to write."
)
flags.DEFINE_integer(
    "cpu_devices",
    0,
    "Split the CPU into this many devices (to try --strategy on a CPU).",
)


def check(condition, message):
    """Raises `app.UsageError(message)` unless `condition`."""
    from absl import app

    if not condition:
        raise app.UsageError(message)


def check_common(values):
    """Contradictions among the shared flags, before any data is read.

    Args:
        values: `FLAGS.flag_values_dict()` or a dict with the same keys.

    Returns:
        The schedule milestones as ints.
    """
    check(values["workdir"], "--workdir is required: where the run lives.")
    check(values["epochs"] >= 1, f"--epochs must be >= 1: {values['epochs']}")
    check(
        values["batch_size"] >= 1,
        f"--batch_size must be >= 1: {values['batch_size']}",
    )
    check(
        values["lr"] > 0 and math.isfinite(values["lr"]),
        f"--lr must be a finite number > 0: {values['lr']}",
    )
    dataset = values["dataset"]
    check(
        dataset in ("folder", "fashion_mnist") or dataset.startswith("tfds/"),
        f"Unknown --dataset={dataset!r}: expected 'folder', 'fashion_mnist' "
        "or 'tfds/<name>' (e.g. tfds/imagenet2012).",
    )
    check(
        dataset != "folder" or values["data_dir"],
        "--dataset=folder needs --data_dir=ROOT with ROOT/train/<class>/* "
        "(and ROOT/val/<class>/* for evaluation).",
    )
    try:
        milestones = sorted(int(m) for m in values["schedule"] or [])
    except ValueError:
        check(False, f"--schedule must list epochs: {values['schedule']}")
    if not values["cos"]:
        late = [m for m in milestones if not 0 < m < values["epochs"]]
        check(
            not late,
            f"--schedule milestones {late} are not inside the run's "
            f"{values['epochs']} epochs: the lr step would never happen. "
            "Give epochs in (0, --epochs), or --cos.",
        )
    from moco_keras import distribute

    try:
        distribute.check_strategy(values["strategy"])
    except ValueError as error:
        check(False, str(error))
    check(
        values["cpu_devices"] >= 0,
        f"--cpu_devices must be >= 0: {values['cpu_devices']}",
    )
    check(
        0 < values["crop_fraction"] <= 1,
        f"--crop_fraction must be in (0, 1]: {values['crop_fraction']}",
    )
    return milestones


def learning_rate(values):
    if values["lr_batch_size"]:
        return values["lr"] * values["batch_size"] / values["lr_batch_size"]
    return values["lr"]


def dataset_stats(dataset):
    """(mean, std) of the normalization the dataset's images get."""
    from moco_keras import color
    from moco_keras import data

    if dataset == "fashion_mnist":
        return data.FASHION_MNIST_MEAN, data.FASHION_MNIST_STD
    return color.IMAGENET_MEAN, color.IMAGENET_STD


def load_source(
    dataset, data_dir, split, limit=0, val_split="validation", seed=0
):
    """A `data.Source` by recipe name; `split` is "train" or "val".

    `limit` keeps that many images drawn at random (class-stratified where
    the labels are known: `Source.subset`, with `seed`). A folder or files
    that cannot be read end the recipe with their message
    (`app.UsageError`), not a traceback.
    """
    from moco_keras import data

    try:
        if dataset == "fashion_mnist":
            source = data.fashion_mnist(
                "train" if split == "train" else "test", data_dir
            )
        elif dataset == "folder":
            source = data.image_folder(data_dir, split=split)
        else:
            source = data.tfds_source(
                dataset[len("tfds/") :],
                split="train" if split == "train" else val_split,
                data_dir=data_dir,
            )
    except (OSError, ValueError) as error:
        check(False, f"--dataset={dataset} --data_dir={data_dir}: {error}")
    return source.subset(limit, seed) if limit else source


def write_json_atomically(path, payload):
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    os.replace(temporary, path)


def set_up(values):
    """Devices and backend options from the flags.

    Returns:
        `(paths, strategy)`: the workdir's subpaths, and the
        `tf.distribute` strategy to build the model in (None: none).
    """
    import keras

    from moco_keras import distribute

    try:
        strategy = distribute.make_strategy(
            values["strategy"], cpu_devices=values["cpu_devices"]
        )
    except ValueError as error:
        check(False, str(error))
    if strategy is not None:
        import logging

        # tf.distribute logs every collective it builds at INFO: hundreds
        # of lines per traced step, which would bury the progress bars.
        logging.getLogger("tensorflow").setLevel(logging.WARNING)
    if values["mixed_precision"]:
        keras.mixed_precision.set_dtype_policy(values["mixed_precision"])
    if values["deterministic"] and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(values["seed"])
    workdir = values["workdir"]
    chief = distribute.is_chief(strategy)
    if chief:
        os.makedirs(workdir, exist_ok=True)
        write_json_atomically(os.path.join(workdir, "flags.json"), values)
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


def callbacks(paths, steps_per_epoch, values, title, extra=(), queue_size=None):
    """Loss watch, extra (e.g. kNN), CSV, curves, TensorBoard, checkpoints.

    The order matters: the loss check runs first so nothing is saved after
    a NaN; the CSV row is written before the checkpoint that ends the epoch.
    Workers other than the chief keep the loss check, `extra` and the
    checkpointer (which they must run in step with the chief) and write
    nothing.
    """
    import keras

    from moco_keras import training

    checkpointer = training.Checkpointer(
        paths["checkpoints"],
        steps_per_epoch,
        every_steps=values["checkpoint_steps"],
        keep=values["keep_checkpoints"],
        keep_every_epochs=values["keep_every_epochs"],
        chief=paths["chief"],
    )
    if not paths["chief"]:
        return [training.LossWatch(queue_size), *extra, checkpointer]
    return [
        training.LossWatch(queue_size),
        *extra,
        keras.callbacks.CSVLogger(paths["csv"], append=True),
        training.CurvePlot(paths["csv"], paths["png"], title),
        keras.callbacks.TensorBoard(paths["tensorboard"]),
        checkpointer,
    ]


def fit(
    model,
    epoch_dataset,
    values,
    steps_per_epoch,
    paths,
    callbacks,
    validation_data=None,
):
    """`training.fit_resumable` in the workdir; the start step back."""
    from moco_keras import training

    verbose = values["verbose"]
    return training.fit_resumable(
        model,
        epoch_dataset,
        values["epochs"],
        steps_per_epoch,
        paths["checkpoints"],
        callbacks=callbacks,
        csv_path=paths["csv"] if paths["chief"] else None,
        verbose=verbose if verbose == "auto" else int(verbose),
        validation_data=validation_data,
    )


def check_devices(values, devices):
    """`--batch_size` and `--bn_splits` against the devices of the run."""
    batch = values["batch_size"]
    check(
        batch % devices == 0,
        f"--batch_size={batch} does not split over {devices} devices: the "
        f"batch is global. Use a multiple of {devices}.",
    )
    splits = values.get("bn_splits")
    if splits is not None:
        check(
            splits % devices == 0,
            f"--bn_splits={splits} is the number of BN groups over the global "
            f"batch (the official code's GPU count); over {devices} devices "
            f"it must be a multiple of {devices} (each device takes "
            f"bn_splits / devices groups). Use --bn_splits={devices} for one "
            "group per device, as the official code on that many GPUs.",
        )


def recipe_values(modules, table):
    """The run's values: the flags of `modules` (and of this one) that were
    given, on the command line or in a flagfile; for the others the value
    of the `--preset` of `table` (`moco_keras.presets`), else the flag's
    default. `preset` holds the preset's name."""
    from moco_keras import presets

    names = {flag.name for flag in FLAGS.get_flags_for_module(__name__)}
    for module in modules:
        names |= {flag.name for flag in FLAGS.get_flags_for_module(module)}
    try:
        preset = presets.get(table, FLAGS.preset)
    except ValueError as error:
        check(False, f"--preset={FLAGS.preset}: {error}")
    values = {}
    for name in sorted(names):
        flag = FLAGS[name]
        given = flag.present or name not in preset
        values[name] = flag.value if given else preset[name]
    return values


def optimizer(values, milestones, steps_per_epoch):
    """torch's SGD with the flags' lr, per-epoch schedule and weight decay."""
    from moco_keras import optimizers

    schedule = optimizers.EpochSchedule(
        learning_rate(values),
        steps_per_epoch,
        values["epochs"],
        cosine=values["cos"],
        milestones=() if values["cos"] else milestones,
    )
    return optimizers.SGD(
        schedule, momentum=values["momentum"], weight_decay=values["wd"]
    )


def run(main, table, preset):
    """`app.run(main)`, `preset` of `table` the default `--preset`.

    Its values become the flags' defaults too, so that `--help` shows them.
    """
    from absl import app

    FLAGS.set_default("preset", preset)
    for name, value in table[preset].items():
        if name in FLAGS:
            FLAGS.set_default(name, value)
    app.run(main)
