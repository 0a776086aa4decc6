"""A run's config: its values, their checks, and the rule of resuming.

Each protocol (`moco_keras.pretraining.pretrain`,
`moco_keras.linear_classification.linear_classification`, the quick
start's `moco_keras.evaluation.quickstart`) takes one config: a preset of
`moco_keras.presets` (`PRETRAINING`, `LINEAR_CLASSIFICATION`), whose
sections are the arguments of the library's parts (`model`, `encoder`,
`augmentation`, `data`, `optimizer`, `schedule`, `knn`, `classifier`,
`run`; a pretraining config also names its `method`), with what the run
changes (`config`). The recipes map the official scripts' flags onto those
sections (`moco_keras.recipes.common`). A config that cannot run raises
`ConfigError` before any data is read.

A workdir's `config.json` holds the config its run started with; the run
resumes only with a config that differs in `RESUMABLE` alone
(`check_resume`). The data a config reads is `moco_keras.sources`, the
workdir and the fit `moco_keras.runs`.

Example:

    >>> mocov2 = config(
    ...     presets.PRETRAINING["mocov2"], model={"queue_size": 4096}
    ... )
    >>> mocov2["model"]["queue_size"], mocov2["model"]["temperature"]
    (4096, 0.2)
    >>> presets.PRETRAINING["mocov2"]["model"]["queue_size"]  # unchanged
    65536
"""

import json
import math
import os
import zipfile

import keras

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

# Keys newer than some workdirs' config.json, with the value those runs
# had: a run started before a key existed resumes with it.
ADDED_KEYS = {"run.health": True}

# Keys that configs no longer have, which older workdirs' config.json
# hold, with the value a run resumes with unchanged (None: any): the input
# pipeline's choice (one pipeline reads every run now); where the views'
# colour half ran (in the model now; `check_resume` asks the checkpoint);
# the crops' resize without antialiasing (PIL's filtered resize alone now).
REMOVED_KEYS = {
    "data.input": None,
    "augmentation.color_in_model": None,
    "augmentation.antialias": True,
}

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


def check_devices(config, devices):
    """The global batch against the run's devices (a pretraining method's
    own values: `methods.Method.check_devices`)."""
    batch = config["data"]["batch_size"]
    check(
        batch % devices == 0,
        f"--batch_size={batch} does not split over {devices} devices: the "
        f"batch is global. Use a multiple of {devices}.",
    )


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
    removed = {key: stored.pop(key) for key in REMOVED_KEYS if key in stored}
    check(
        removed.get("augmentation.color_in_model", True)
        or _colour_in_model(checkpoint),
        f"run.workdir={workdir} holds a run whose views took their colour "
        f"half on the CPU, in the tf.data pipeline of moco-keras before "
        f"one pipeline read every run; its checkpoint {checkpoint} has no "
        "colour layer, and this version feeds the model uncoloured crops. "
        "Finish that run with the version that started it, or start a new "
        "run.workdir (a finished run's checkpoint still loads for "
        "evaluation, export and linear classification).",
    )
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
    ] + [
        f"{key}: {value!r} in its {CONFIG_FILE}, removed now (as "
        f"{REMOVED_KEYS[key]!r})"
        for key, value in sorted(removed.items())
        if REMOVED_KEYS[key] not in (None, value)
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


def _colour_in_model(checkpoint):
    """Whether a pretraining checkpoint's model runs the views' colour half
    (its `augmentation`), read from the `.keras` file's config alone."""
    with zipfile.ZipFile(checkpoint) as archive:
        saved = json.loads(archive.read("config.json"))
    return saved.get("config", {}).get("augmentation") is not None
