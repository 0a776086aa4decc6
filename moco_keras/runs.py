"""The protocols, one function each: pretraining and linear classification,
each from one config dict, and the run-keeping they share (checks, the
workdir, the resume contract, callbacks). The kNN evaluation and the quick
start's protocol are in `moco_keras.evaluation`.

A config is a preset of `moco_keras.presets` (`PRETRAINING`,
`LINEAR_CLASSIFICATION`) with what the run changes: the official scripts'
names (`moco_k`, `moco_t`, `aug_plus`, `cos`, `lr`, `wd`, ...) plus where
it lives (`workdir`, `data_dir`) and how it runs (`strategy`, `seed`,
`mixed_precision`, ...; `RUN_DEFAULTS`). The recipes
(`python -m moco_keras.recipes.pretrain` and `lincls`) map their flags to a
config and call these; so do the quick start, the notebooks and
`bench/learning.py`.

A run lives in its workdir: `flags.json` (the resolved config, which
`lincls` and `export` read back), `epochs.csv`, `curves.png`,
`tensorboard/`, `checkpoints/ckpt-<step>.keras` and `results.json`. Calling
the same function again after the run died resumes it from its newest
checkpoint, mid-epoch included; a finished run only reports.

Example:

```python
from moco_keras import presets, runs

config = runs.config(
    presets.PRETRAINING["quickstart"], workdir="runs/fmnist", epochs=1
)
results = runs.pretrain(config)
```
"""

import json
import math
import os
import time
import warnings

# How a run executes, for every protocol; none of it changes what it learns
# (except `seed`, and `antialias=False`, which trades fidelity to the
# official views for CPU time).
RUN_DEFAULTS = {
    "preset": None,
    "workdir": None,
    "data_dir": None,
    "seed": 0,
    "strategy": "none",
    "cpu_devices": 0,
    "mixed_precision": None,
    "jit_compile": False,
    "deterministic": False,
    "verbose": "auto",
    "checkpoint_steps": 0,
    "keep_checkpoints": 3,
    "log_every_steps": 10,
    "color_in_model": False,
    "antialias": True,
    # Linear classification.
    "pretrained": None,
    "val_split": "validation",
    "val_limit": 0,
}

# The config keys whose value may differ when a workdir is run again: how
# long the run goes on (`epochs`, so a finished run can be extended), what
# it prints, logs and keeps, how the step is compiled, and where the same
# data lies. Every other key changes the model, the data or the optimizer's
# state, and `check_resume` refuses a rerun that changes it.
RESUMABLE = (
    "epochs",
    "workdir",
    "data_dir",
    "verbose",
    "log_every_steps",
    "checkpoint_steps",
    "keep_checkpoints",
    "keep_every_epochs",
    "jit_compile",
    "deterministic",
    "knn_every",
    "knn_bank",
    "knn_test",
    "knn_k",
    "knn_t",
)

# The smallest crop the recipes take: 8 x 8 pixels (Fashion-MNIST's 28 is
# the smallest any preset uses).
MIN_IMAGE_SIZE = 8


class ConfigError(ValueError):
    """A config that cannot run (contradictory values, missing data): the
    recipes print its message and exit 1, without a traceback."""


def config(preset, **overrides):
    """`RUN_DEFAULTS`, then `preset` (a dict of `moco_keras.presets`), then
    `overrides`: a complete config for one of this module's runs."""
    from moco_keras import presets

    known = set(RUN_DEFAULTS) | set(preset)
    for table in (presets.PRETRAINING, presets.LINEAR_CLASSIFICATION):
        for values in table.values():
            known |= set(values)
    unknown = set(overrides) - known
    if unknown:
        raise ConfigError(
            f"Unknown config keys {sorted(unknown)}: expected those of "
            "moco_keras.presets or runs.RUN_DEFAULTS."
        )
    return {**RUN_DEFAULTS, **preset, **overrides}


def check(condition, message):
    """Raises `ConfigError(message)` unless `condition`."""
    if not condition:
        raise ConfigError(message)


# --- Checks, before any data is read ----------------------------------------


def check_common(config):
    """Contradictions among the values every protocol has.

    Returns:
        The schedule milestones as ints.
    """
    check(config["workdir"], "--workdir is required: where the run lives.")
    check(config["epochs"] >= 1, f"--epochs must be >= 1: {config['epochs']}")
    check(
        config["batch_size"] >= 1,
        f"--batch_size must be >= 1: {config['batch_size']}",
    )
    check(
        config["lr"] > 0 and math.isfinite(config["lr"]),
        f"--lr must be a finite number > 0: {config['lr']}",
    )
    check(
        config["log_every_steps"] >= 1,
        f"--log_every_steps must be >= 1: {config['log_every_steps']}",
    )
    dataset = config["dataset"]
    check(
        dataset in ("folder", "fashion_mnist") or dataset.startswith("tfds/"),
        f"Unknown --dataset={dataset!r}: expected 'folder', 'fashion_mnist' "
        "or 'tfds/<name>' (e.g. tfds/imagenet2012).",
    )
    check(
        dataset != "folder" or config["data_dir"],
        "--dataset=folder needs --data_dir=ROOT with ROOT/train/<class>/* "
        "(and ROOT/val/<class>/* for evaluation).",
    )
    try:
        milestones = sorted(int(m) for m in config["schedule"] or [])
    except ValueError:
        check(False, f"--schedule must list epochs: {config['schedule']}")
    if not config["cos"]:
        late = [m for m in milestones if not 0 < m < config["epochs"]]
        check(
            not late,
            f"--schedule milestones {late} are not inside the run's "
            f"{config['epochs']} epochs: the lr step would never happen. "
            "Give epochs in (0, --epochs), or --cos.",
        )
    from moco_keras import distribute

    try:
        distribute.check_strategy(config["strategy"])
    except ValueError as error:
        check(False, str(error))
    check(
        config["cpu_devices"] >= 0,
        f"--cpu_devices must be >= 0: {config['cpu_devices']}",
    )
    check(
        0 < config["crop_fraction"] <= 1,
        f"--crop_fraction must be in (0, 1]: {config['crop_fraction']}",
    )
    check(
        config["image_size"] >= MIN_IMAGE_SIZE,
        f"--image_size={config['image_size']} is the side of the crops in "
        f"pixels: it must be >= {MIN_IMAGE_SIZE} (224 for ImageNet, 28 for "
        "Fashion-MNIST).",
    )
    return milestones


def check_pretraining(config):
    """Every contradiction of a pretraining config.

    Returns:
        The lr milestones as ints.
    """
    milestones = check_common(config)
    batch, k = config["batch_size"], config["moco_k"]
    check(
        k % batch == 0,
        f"--moco_k={k} is not divisible by the global --batch_size={batch}; "
        "the official code asserts it so that each step replaces whole "
        f"batches of keys. Use e.g. --moco_k={max(batch, k // batch * batch)}.",
    )
    splits = config["bn_splits"]
    check(
        splits >= 1 and batch % splits == 0,
        f"--bn_splits={splits} does not divide the global batch of {batch}: "
        f"split BN needs equal groups. Pick a divisor of {batch}.",
    )
    from moco_keras import moco
    from moco_keras import presets

    arguments = {
        argument: config[flag]
        for flag, argument in presets.MOCO_ARGUMENTS.items()
    }
    try:
        moco.check_arguments(**arguments)
    except ValueError as error:
        flag = next(
            flag
            for flag, argument in presets.MOCO_ARGUMENTS.items()
            if f"Received: {argument}=" in str(error)
        )
        check(False, f"--{flag}={config[flag]}: {error}")
    check(
        0 < config["crop_min"] <= 1,
        f"--crop_min is an area fraction in (0, 1]: {config['crop_min']}",
    )
    check(
        config["arch"] != "cifar_resnet18" or config["image_size"] <= 64,
        "--arch=cifar_resnet18 has the CIFAR stem (no downsampling): use it "
        f"with small images (--image_size <= 64), not {config['image_size']}.",
    )
    return milestones


def check_linear_classification(config):
    """Every contradiction of a linear classification config.

    Returns:
        The lr milestones as ints.
    """
    milestones = check_common(config)
    check(
        not (config["cache_features"] and config["train_augment"]),
        "--cache_features extracts each training image's features once, "
        "from its evaluation view; it cannot train on random crops. Add "
        "--notrain_augment (or drop --cache_features).",
    )
    return milestones


def check_devices(config, devices):
    """`batch_size` and `bn_splits` against the devices of the run."""
    batch = config["batch_size"]
    check(
        batch % devices == 0,
        f"--batch_size={batch} does not split over {devices} devices: the "
        f"batch is global. Use a multiple of {devices}.",
    )
    splits = config.get("bn_splits")
    if splits is not None:
        check(
            splits % devices == 0,
            f"--bn_splits={splits} is the number of BN groups over the global "
            f"batch (the official code's GPU count); over {devices} devices "
            f"it must be a multiple of {devices} (each device takes "
            f"bn_splits / devices groups). Use --bn_splits={devices} for one "
            "group per device, as the official code on that many GPUs.",
        )


# --- Data --------------------------------------------------------------------


def dataset_stats(dataset):
    """(mean, std) of the normalization the dataset's images get."""
    from moco_keras import color
    from moco_keras import datasets

    if dataset == "fashion_mnist":
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


def evaluation_arrays(config, split, count, normalization=None):
    """`(images, labels, source)` of `count` images of `split` (0: all),
    drawn at random and class-stratified, as evaluation views in memory."""
    import numpy as np

    from moco_keras import pipelines

    mean, std = normalization or dataset_stats(config["dataset"])
    source = load_source(
        config["dataset"],
        config["data_dir"],
        split,
        limit=count,
        val_split=config.get("val_split", "validation"),
        seed=config["seed"],
    )
    images, labels = [], []
    for x, y in pipelines.labelled_dataset(
        source,
        256,
        config["image_size"],
        mean,
        std,
        crop_fraction=config["crop_fraction"],
    ):
        images.append(x.numpy())
        labels.append(y.numpy())
    return np.concatenate(images), np.concatenate(labels), source


# --- Pieces of a run ---------------------------------------------------------


def learning_rate(config):
    """`lr`, scaled linearly from `lr_batch_size` to `batch_size` if set."""
    if config["lr_batch_size"]:
        return config["lr"] * config["batch_size"] / config["lr_batch_size"]
    return config["lr"]


def optimizer(config, milestones, steps_per_epoch):
    """torch's SGD with the config's lr, per-epoch schedule, weight decay."""
    from moco_keras import optimizers

    schedule = optimizers.EpochSchedule(
        learning_rate(config),
        steps_per_epoch,
        config["epochs"],
        cosine=config["cos"],
        milestones=() if config["cos"] else milestones,
    )
    return optimizers.SGD(
        schedule, momentum=config["momentum"], weight_decay=config["wd"]
    )


def jit_compile(config):
    """`compile`'s `jit_compile` for the config: its `jit_compile` (XLA for
    TensorFlow, `torch.compile` for torch), and always on JAX, whose
    trainer otherwise runs the step op by op, untraced."""
    import keras

    return keras.backend.backend() == "jax" or bool(config["jit_compile"])


def check_resume(config):
    """Refuses a rerun of a workdir with values its run did not start with.

    A workdir that holds a checkpoint resumes from it; its `flags.json`
    holds the values the run started with. Any difference outside
    `RESUMABLE` would load a checkpoint into another model (a queue of
    another size: a Keras load error) or go on with other data or another
    optimizer, so it raises `ConfigError` naming each differing key with
    both values, before anything is loaded.
    """
    from moco_keras import training

    workdir = config["workdir"]
    path = os.path.join(workdir, "flags.json")
    checkpoint, _ = training.latest_checkpoint(
        os.path.join(workdir, "checkpoints")
    )
    if checkpoint is None or not os.path.isfile(path):
        return
    with open(path) as f:
        stored = json.load(f)
    # Compared as they are stored: a tuple is a JSON list.
    current = json.loads(json.dumps(config))
    changed = [
        f"--{key}: {stored[key]!r} in its flags.json, {current[key]!r} now"
        for key in sorted(stored.keys() & current.keys())
        if key not in RESUMABLE
        and key != "preset"  # a name: its values are compared one by one
        and stored[key] != current[key]
    ]
    check(
        not changed,
        f"--workdir={workdir} holds a run that started with other values, "
        f"and it resumes from {checkpoint}:\n  "
        + "\n  ".join(changed)
        + "\nThese change the model, the data or the optimizer's state. Give "
        "the run's own values to resume it, or a new --workdir to start "
        "another run. A resumed run may change only: "
        + ", ".join(f"--{key}" for key in RESUMABLE)
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
    import keras

    from moco_keras import distribute

    check_resume(config)
    try:
        strategy = distribute.make_strategy(
            config["strategy"], cpu_devices=config["cpu_devices"]
        )
    except ValueError as error:
        check(False, str(error))
    if strategy is not None:
        import logging

        # tf.distribute logs every collective it builds at INFO: hundreds
        # of lines per traced step, which would bury the progress bars.
        logging.getLogger("tensorflow").setLevel(logging.WARNING)
    if config["mixed_precision"]:
        keras.mixed_precision.set_dtype_policy(config["mixed_precision"])
    if config["deterministic"] and keras.backend.backend() == "tensorflow":
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
    keras.utils.set_random_seed(config["seed"])
    workdir = config["workdir"]
    chief = distribute.is_chief(strategy)
    if chief:
        os.makedirs(workdir, exist_ok=True)
        write_json_atomically(os.path.join(workdir, "flags.json"), config)
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
    included), every `log_every_steps` steps the step's numbers and the
    learning rate, and `views` (a `(view_q, view_k)` batch, optional) as an
    image grid (`training.StepLog`).

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
        every_steps=config["checkpoint_steps"],
        keep=config["keep_checkpoints"],
        keep_every_epochs=config["keep_every_epochs"],
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
        training.StepLog(
            paths["tensorboard"], config["log_every_steps"], views=views
        ),
        checkpointer,
    ]


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
    from moco_keras import training

    verbose = config["verbose"]
    return training.fit_resumable(
        model,
        epoch_dataset,
        config["epochs"],
        steps_per_epoch,
        paths["checkpoints"],
        callbacks=callbacks,
        csv_path=paths["csv"] if paths["chief"] else None,
        verbose=verbose if verbose == "auto" else int(verbose),
        validation_data=validation_data,
    )


# --- Pretraining -------------------------------------------------------------


def augmentation_config(config):
    """The `augment` preset of the config: v2's (`aug_plus`) or v1's, at the
    config's size and its dataset's normalization."""
    from moco_keras import augment

    mean, std = dataset_stats(config["dataset"])
    overrides = {
        "size": config["image_size"],
        "mean": mean,
        "std": std,
        "antialias": config["antialias"],
        "scale": (config["crop_min"], 1.0),
    }
    if config["aug_plus"] and not config["blur"]:
        overrides["blur_p"] = 0.0
    name = "mocov2" if config["aug_plus"] else "mocov1"
    return augment.get_augmentation(name, **overrides)


def build_moco(config, milestones, steps_per_epoch, replicas=1):
    """The compiled MoCo model of a pretraining config.

    Args:
        replicas: `tf.distribute` replicas the model runs on; each normalizes
            `bn_splits / replicas` groups of its slice. (JAX's data parallel
            runs the global batch as one program: its split BN groups, all
            `bn_splits`, line up with the device shards.)
    """
    from moco_keras import MoCo
    from moco_keras import color
    from moco_keras import encoders
    from moco_keras import presets

    size = config["image_size"]
    encoder = encoders.get_encoder(
        config["arch"],
        width=config["width"],
        bn_splits=config["bn_splits"] // replicas,
        input_shape=(size, size, 3),
    )
    augmentation = None
    if config["color_in_model"]:
        augmentation = color.ColorAugmentation.from_augmentation(
            augmentation_config(config), seed=config["seed"]
        )
    model = MoCo(
        encoder,
        **{
            argument: config[flag]
            for flag, argument in presets.MOCO_ARGUMENTS.items()
        },
        augmentation=augmentation,
        seed=config["seed"],
    )
    model.compile(
        optimizer=optimizer(config, milestones, steps_per_epoch),
        jit_compile=jit_compile(config),
    )
    return model


def knn_monitor(config):
    """The kNN callback on `knn_bank` training and `knn_test` val images."""
    from moco_keras import knn

    bank, bank_labels, source = evaluation_arrays(
        config, "train", config["knn_bank"]
    )
    test, test_labels, _ = evaluation_arrays(config, "val", config["knn_test"])
    return knn.KNNMonitor(
        bank,
        bank_labels,
        test,
        test_labels,
        len(source.class_names),
        every=config["knn_every"],
        k=config["knn_k"],
        t=config["knn_t"],
    )


def pretrain(config):
    """MoCo pretraining of `config` in its workdir, resumed if it exists.

    Args:
        config: a `PRETRAINING` preset with `workdir` (`runs.config`).

    Returns:
        The run's `results.json` as a dict (the chief's; other workers get
        None): final loss and acc1, the kNN top-1 of the last monitor
        evaluation, the newest checkpoint, the step it resumed from.
    """
    milestones = check_pretraining(config)
    import keras

    from moco_keras import distribute
    from moco_keras import pipelines
    from moco_keras import training

    paths, strategy = set_up(config)
    devices = distribute.device_count(strategy)
    check_devices(config, devices)
    check(
        not config["knn_every"] or distribute.process_shard() is None,
        "The kNN monitor embeds its images in one process; this "
        "--strategy=data_parallel job has several. Set --knn_every=0 and "
        "evaluate the checkpoint afterwards (the linear recipe, on one "
        "host).",
    )
    source = load_source(
        config["dataset"],
        config["data_dir"],
        "train",
        limit=config["train_limit"],
        seed=config["seed"],
    )
    steps_per_epoch = source.num_examples // config["batch_size"]
    check(
        steps_per_epoch >= 1,
        f"{source.num_examples} training images make no full batch of "
        f"{config['batch_size']}; lower --batch_size.",
    )
    with distribute.scope(strategy):
        model = build_moco(
            config,
            milestones,
            steps_per_epoch,
            replicas=devices if strategy is not None else 1,
        )
    augmentation = augmentation_config(config)

    def epoch_dataset(epoch, skip):
        return distribute.distribute_dataset(
            strategy,
            lambda shard: pipelines.two_view_dataset(
                source,
                augmentation,
                config["batch_size"],
                seed=config["seed"],
                color_in_model=config["color_in_model"],
                epoch=epoch,
                skip_batches=skip,
                shard=shard,
            ),
        )

    extra = [knn_monitor(config)] if config["knn_every"] else []
    views = None
    fresh = training.latest_checkpoint(paths["checkpoints"])[0] is None
    if paths["chief"] and fresh:
        # A new run shows the views of epoch 0's first images (before the
        # in-model colour ops with --color_in_model), from a pipeline of its
        # own so that the training pipeline's draws stay as they are.
        views = next(
            iter(
                pipelines.two_view_dataset(
                    source,
                    augmentation,
                    min(config["batch_size"], 8),
                    seed=config["seed"],
                    color_in_model=config["color_in_model"],
                    epoch=0,
                )
            )
        )
    run_callbacks = callbacks(
        paths,
        steps_per_epoch,
        config,
        f"MoCo {'v2' if config['aug_plus'] else 'v1'} pretraining",
        extra=extra,
        queue_size=config["moco_k"],
        views=views,
    )
    print(
        f"MoCo pretraining: {source.num_examples} images, "
        f"{config['epochs']} epochs of {steps_per_epoch} steps, "
        f"backend {keras.backend.backend()}, strategy {config['strategy']} "
        f"over {devices} device(s), workdir {config['workdir']}"
    )
    started = time.time()
    start_step = fit(
        model, epoch_dataset, config, steps_per_epoch, paths, run_callbacks
    )
    if not paths["chief"]:
        print("Done (this worker writes nothing; the chief has the results).")
        return None
    columns = training.read_csv_log(paths["csv"])
    results = {
        "final_loss": columns.get("loss", [None])[-1],
        "final_acc1": columns.get("acc1", [None])[-1],
        "epochs": config["epochs"],
        "resumed_from_step": start_step,
        "seconds_this_session": round(time.time() - started, 1),
        "backend": keras.backend.backend(),
        "strategy": config["strategy"],
        "devices": devices,
        "checkpoint": training.latest_checkpoint(paths["checkpoints"])[0],
    }
    if extra:
        results["knn_top1"] = (
            extra[0].accuracies[-1][1] if (extra[0].accuracies) else None
        )
    write_json_atomically(paths["results"], results)
    print(
        f"Done: loss {results['final_loss']:.4f}, acc1 "
        f"{results['final_acc1']:.2f}; checkpoint {results['checkpoint']}"
    )
    return results


# --- Linear classification ---------------------------------------------------


def resolve_pretrained(path):
    """The checkpoint file (or converted directory) `pretrained` names."""
    from moco_keras import convert
    from moco_keras import training

    check(path, "--pretrained is required: a workdir or a checkpoint.")
    if os.path.isfile(os.path.join(path, convert.METADATA)):
        return path  # written by recipes/convert
    if os.path.isdir(path):
        directory = os.path.join(path, "checkpoints")
        found, _ = training.latest_checkpoint(directory)
        if found is None:
            found, _ = training.latest_checkpoint(path)
        check(
            found is not None,
            f"--pretrained={path} is a folder without MoCo checkpoints "
            "(expected checkpoints/ckpt-<step>.keras, as the pretrain "
            "recipe writes).",
        )
        return found
    check(os.path.isfile(path), f"--pretrained={path} does not exist.")
    return path


def load_backbone(path):
    """The query encoder of a MoCo checkpoint (`ConfigError` if none).

    Returns:
        `(backbone, normalization)`: normalization is the `(mean, std)` of a
        converted checkpoint (the input statistics its weights were trained
        with), None for this library's checkpoints (the dataset's).
    """
    import keras

    from moco_keras import MoCo
    from moco_keras import convert

    if os.path.isfile(os.path.join(path, convert.METADATA)):
        model, metadata = convert.load_converted(path)
        normalization = (tuple(metadata["mean"]), tuple(metadata["std"]))
        return convert.backbone_of(model), normalization

    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as error:  # noqa: BLE001 - re-raised as a usage error.
        raise ConfigError(
            f"--pretrained={path} is not a MoCo checkpoint that Keras can "
            f"read ({type(error).__name__}: {error}). Pass a `.keras` file "
            "written by moco_keras.recipes.pretrain, or its workdir."
        ) from error
    check(
        isinstance(model, MoCo),
        f"--pretrained={path} holds a {type(model).__name__}, not a MoCo "
        "model; pass a checkpoint of moco_keras.recipes.pretrain.",
    )
    return model.encoder_q, None


def linear_head(feature_dim, num_classes, name="fc"):
    """`main_lincls.py`'s classifier: weights N(0, 0.01), zero bias."""
    import keras

    return keras.layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.RandomNormal(0.0, 0.01),
        bias_initializer="zeros",
        name=name,
    )


def compile_classifier(model, config, milestones, steps_per_epoch, classes):
    import keras

    model.compile(
        optimizer=optimizer(config, milestones, steps_per_epoch),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="acc1"),
            keras.metrics.SparseTopKCategoricalAccuracy(
                k=min(5, classes), name="acc5"
            ),
        ],
        jit_compile=jit_compile(config),
    )


def check_backbone_unchanged(backbone, checkpoint):
    """Raises unless `backbone` equals the one in `checkpoint`, read again.

    `main_lincls.py`'s `sanity_check`: the frozen weights after training
    are compared with the checkpoint on disk, not with a copy taken after
    loading, so a backbone that training changed and one that was loaded
    wrong (the wrong encoder, weights left at their initialisation) both
    fail.
    """
    import keras
    import numpy as np

    reference, _ = load_backbone(checkpoint)
    pairs = list(zip(backbone.weights, reference.weights, strict=True))
    changed = [
        variable.path
        for variable, stored in pairs
        if not np.array_equal(
            keras.ops.convert_to_numpy(variable),
            keras.ops.convert_to_numpy(stored),
        )
    ]
    if changed:
        raise RuntimeError(
            f"The backbone differs from {checkpoint} in {len(changed)} of "
            f"{len(pairs)} variables ({', '.join(changed[:5])}): it was "
            "loaded wrong or changed during linear classification. This is "
            "a bug; please report it."
        )


def epoch_scores(columns):
    """`[{"epoch", "top1", "top5", "loss"}]` of the evaluated epochs of a
    CSV log (`training.read_csv_log`), top-1 / top-5 in percent."""
    scores = []
    for epoch, acc1, acc5, loss in zip(
        columns.get("epoch", []),
        columns.get("val_acc1", []),
        columns.get("val_acc5", []),
        columns.get("val_loss", []),
        strict=False,
    ):
        scores.append(
            {
                "epoch": int(epoch) + 1,
                "top1": round(100 * acc1, 2),
                "top5": round(100 * acc5, 2),
                "loss": loss,
            }
        )
    return scores


def _features(backbone, dataset):
    """Features and labels of a `(images, labels)` dataset, in order."""
    import numpy as np
    from keras import ops

    features, labels = [], []
    for images, batch_labels in dataset:
        batch = backbone(ops.convert_to_tensor(images.numpy()), training=False)
        features.append(ops.convert_to_numpy(batch))
        labels.append(batch_labels.numpy())
    return np.concatenate(features), np.concatenate(labels)


def linear_classification(config):
    """`main_lincls.py`'s protocol on the frozen backbone of `pretrained`.

    The pretrained query encoder, frozen and in inference mode (BN uses its
    moving statistics), its pooled features into `linear_head`; top-1 and
    top-5 on the validation split after every epoch; at the end the
    backbone is checked against the checkpoint on disk. With
    `cache_features` the features of each training image's evaluation view
    are computed once and the head trains on them.

    Args:
        config: a `LINEAR_CLASSIFICATION` preset with `workdir` and
            `pretrained` (a pretraining workdir, a MoCo `.keras` file, or a
            directory that recipes/convert wrote).

    Returns:
        The run's `results.json` as a dict (None on workers but the chief).
    """
    milestones = check_linear_classification(config)
    checkpoint = resolve_pretrained(config["pretrained"])

    from moco_keras import distribute

    paths, strategy = set_up(config)
    check(
        distribute.process_shard() is None,
        "Linear classification under --strategy=data_parallel runs in one "
        "process (all of one host's devices); this job has several "
        "(KERAS_DISTRIBUTION_NUM_PROCESSES). Run it on one host.",
    )
    check_devices(config, distribute.device_count(strategy))
    # Everything that makes variables (backbone, head, optimizer) belongs to
    # the strategy, and fit may run in its scope too.
    with distribute.scope(strategy):
        return _train_linear(config, milestones, checkpoint, paths)


def _train_linear(config, milestones, checkpoint, paths):
    import keras

    from moco_keras import datasets
    from moco_keras import pipelines
    from moco_keras import training

    backbone, normalization = load_backbone(checkpoint)
    backbone.trainable = False  # inference mode: BN moving statistics
    size = config["image_size"]
    # A converted checkpoint expects the statistics its source trained with.
    mean, std = normalization or dataset_stats(config["dataset"])
    train, val = (
        load_source(
            config["dataset"],
            config["data_dir"],
            split,
            limit=config[limit],
            val_split=config["val_split"],
            seed=config["seed"],
        )
        for split, limit in (("train", "train_limit"), ("val", "val_limit"))
    )
    classes = len(train.class_names)
    batch_size = config["batch_size"]
    steps_per_epoch = train.num_examples // batch_size
    check(
        steps_per_epoch >= 1,
        f"{train.num_examples} training images make no full batch of "
        f"{batch_size}; lower --batch_size.",
    )
    augmentation = None
    if config["train_augment"]:
        augmentation = pipelines.linear_augmentation(size, mean, std)

    def labelled(source, **kwargs):
        return pipelines.labelled_dataset(
            source,
            batch_size,
            size,
            mean,
            std,
            crop_fraction=config["crop_fraction"],
            seed=config["seed"],
            **kwargs,
        )

    feature_dim = backbone.output_shape[-1]
    head = linear_head(feature_dim, classes)
    if config["cache_features"]:
        print("Extracting the frozen features once ...")
        train_x, train_y = _features(backbone, labelled(train))
        val_x, val_y = _features(backbone, labelled(val))
        inputs = keras.Input((feature_dim,))
        model = keras.Model(inputs, head(inputs), name="linear_head")
        # In the order of `train`: the image path's order for each epoch.
        cached = datasets.Source(train_x, train_y, train.class_names, False)

        def epoch_dataset(epoch, skip):
            keys = cached.order(config["seed"], epoch).skip(skip * batch_size)
            return keys.map(cached.read).batch(batch_size, drop_remainder=True)

        val_data = datasets.Source(val_x, val_y, val.class_names, False)
        val_data = val_data.dataset.batch(batch_size)
    else:
        inputs = keras.Input((size, size, 3))
        features = backbone(inputs, training=False)
        model = keras.Model(inputs, head(features), name="linear_classifier")

        def epoch_dataset(epoch, skip):
            return labelled(
                train,
                train_augmentation=augmentation,
                epoch=epoch,
                skip_batches=skip,
            )

        val_data = labelled(val)
    compile_classifier(model, config, milestones, steps_per_epoch, classes)
    run_callbacks = callbacks(
        paths,
        steps_per_epoch,
        config,
        "Linear classification",
        extra=[training.ScoreLog()],
    )
    print(
        f"Linear classification on {checkpoint}: {train.num_examples} "
        f"training images, {classes} classes, {config['epochs']} epochs, "
        f"validation on {val.num_examples} images after each"
    )
    started = time.time()
    fit(
        model,
        epoch_dataset,
        config,
        steps_per_epoch,
        paths,
        run_callbacks,
        validation_data=val_data,
    )
    check_backbone_unchanged(backbone, checkpoint)
    if not paths["chief"]:
        print("Done (this worker writes nothing; the chief has the results).")
        return None
    epochs = epoch_scores(training.read_csv_log(paths["csv"]))
    best = max(epochs, key=lambda score: score["top1"])
    results = {
        "top1": epochs[-1]["top1"],
        "top5": epochs[-1]["top5"],
        "val_loss": epochs[-1]["loss"],
        "best": best,
        "epochs": epochs,
        "val_images": val.num_examples,
        "pretrained": checkpoint,
        "backbone_unchanged": True,
        "cache_features": config["cache_features"],
        "normalization": {"mean": list(mean), "std": list(std)},
        "seconds_this_session": round(time.time() - started, 1),
        "backend": keras.backend.backend(),
    }
    write_json_atomically(paths["results"], results)
    print(
        f"Validation top-1 {results['top1']:.2f} %, top-5 "
        f"{results['top5']:.2f} % after epoch {epochs[-1]['epoch']} "
        f"({val.num_examples} images); best top-1 {best['top1']:.2f} % "
        f"(top-5 {best['top5']:.2f} %) at epoch {best['epoch']}. The "
        "backbone is unchanged (checked against the checkpoint on disk)."
    )
    return results
