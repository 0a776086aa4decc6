"""The flags shared by the recipes, and the one table from flags to config.

A recipe is a command-line wrapper: its absl flags keep the official
scripts' names (`--moco_t`, `--aug_plus`, `--cos`, `--wd`, ...);
`FLAGS_TO_CONFIG` maps each onto a section and key of the config
(`moco_keras.presets`), and `recipe_config` puts the flags given, on the
command line or in a flagfile, into the `--preset`'s config; `run`
reports a config that cannot run (`configs.ConfigError`) as a usage error,
without a traceback, naming the flags.
"""

import copy
import re
import sys

from absl import app
from absl import flags

from moco_keras import configs
from moco_keras import convert
from moco_keras import presets

FLAGS = flags.FLAGS

# Shared by the recipes. A flag of `FLAGS_TO_CONFIG` takes its value from
# the recipe's preset (`--preset`) unless given: its default here is None,
# and `run` shows the preset's as the default in --help.
flags.DEFINE_string(
    "preset",
    None,
    "The run's preset in moco_keras.presets: pretrain: mocov1 (default), "
    "mocov2, mocov3_r50, mocov3_vit_small, mocov3_vit_base, quickstart, "
    "quickstart_mocov3, fmnist_moco_v2, own_images; lincls: imagenet, "
    "mocov3, mocov3_vit (default: the protocol of the method --pretrained "
    "was trained with, else imagenet). Flags given replace its values.",
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
flags.DEFINE_integer(
    "workers",
    None,
    "grain worker processes that decode and crop (0: this process).",
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
flags.DEFINE_float("momentum", None, "SGD (and LARS) momentum.")
flags.DEFINE_float(
    "wd",
    None,
    "Weight decay: L2, coupled as torch's SGD and MoCo v3's LARS; "
    "decoupled with --optimizer=adamw.",
)
flags.DEFINE_integer("seed", None, "Seed of weights, data order and draws.")
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
    "checkpoint_steps",
    None,
    "Also checkpoint every N steps (0: per epoch).",
)
flags.DEFINE_integer(
    "log_every_steps",
    None,
    "TensorBoard: the step's loss, accuracy and lr every N steps.",
)
flags.DEFINE_integer(
    "keep_checkpoints",
    None,
    "Newest checkpoints to keep.",
)
flags.DEFINE_integer(
    "keep_every_epochs", None, "Also keep every N-th epoch's checkpoint."
)
flags.DEFINE_enum(
    "mixed_precision",
    None,
    ["mixed_float16", "mixed_bfloat16"],
    "Keras dtype policy (GPUs: mixed_float16 / mixed_bfloat16).",
)
flags.DEFINE_bool(
    "jit_compile",
    None,
    "Compile the train step: XLA (TensorFlow), torch.compile (torch). The "
    "JAX backend always compiles it.",
)
flags.DEFINE_bool(
    "deterministic",
    None,
    "TensorFlow backend: deterministic kernels (bitwise-repeatable runs).",
)
flags.DEFINE_bool(
    "health",
    None,
    "Log the feature measures (alignment, uniformity, q_std, l_pos, l_neg, "
    "l_neg_max) and warn on collapse; --nohealth saves their cost.",
)
flags.DEFINE_enum(
    "verbose",
    None,
    ["auto", "0", "1", "2"],
    "fit verbosity.",
)
flags.DEFINE_enum(
    "strategy",
    None,
    ["none", "mirrored", "multi_worker", "tpu", "data_parallel"],
    "Devices: 'none' (one device), 'mirrored' (all GPUs of this machine), "
    "'multi_worker' (several machines, TF_CONFIG), 'tpu' (TensorFlow "
    "backend); 'data_parallel' (all devices, JAX backend). --batch_size and "
    "--lr stay global.",
)
# recipes/lincls and recipes/export.
flags.DEFINE_string(
    "pretrained",
    None,
    "A pretraining workdir (its newest checkpoint is used), a MoCo "
    "checkpoint file (`.keras`), or a directory that recipes/convert wrote "
    "(official PyTorch or PaddleFleetX weights, with their normalization).",
)
flags.DEFINE_string(
    "output", None, "recipes/convert, recipes/export: the directory to write."
)
flags.DEFINE_integer(
    "cpu_devices",
    None,
    "Split the CPU into this many devices (to try --strategy on a CPU).",
)


# The one table from the recipes' flags to the config: flag -> (section,
# key). The sections and keys are the library's (`moco_keras.presets`).
FLAGS_TO_CONFIG = {
    # `MoCo(encoder, **config["model"])`, or `MoCoV3`'s (v3 presets).
    "moco_dim": ("model", "dim"),
    "moco_mlp_dim": ("model", "mlp_dim"),
    "mlp": ("model", "mlp"),
    "moco_k": ("model", "queue_size"),
    "moco_m": ("model", "momentum"),
    "moco_t": ("model", "temperature"),
    "arch": ("encoder", "arch"),
    "width": ("encoder", "width"),
    "bn_splits": ("encoder", "bn_splits"),
    "stop_grad_conv1": ("encoder", "stop_grad_conv1"),
    "aug_plus": ("augmentation", "aug_plus"),
    "blur": ("augmentation", "blur"),
    "crop_min": ("augmentation", "crop_min"),
    "dataset": ("data", "dataset"),
    "data_dir": ("data", "data_dir"),
    "image_size": ("data", "image_size"),
    "crop_fraction": ("data", "crop_fraction"),
    "train_limit": ("data", "train_limit"),
    "val_split": ("data", "val_split"),
    "val_limit": ("data", "val_limit"),
    "batch_size": ("data", "batch_size"),
    "workers": ("data", "workers"),
    "optimizer": ("optimizer", "name"),
    "lr": ("optimizer", "lr"),
    "lr_batch_size": ("optimizer", "lr_batch_size"),
    "momentum": ("optimizer", "momentum"),
    "wd": ("optimizer", "weight_decay"),
    "epochs": ("schedule", "epochs"),
    "schedule": ("schedule", "milestones"),
    "cos": ("schedule", "cosine"),
    "warmup_epochs": ("schedule", "warmup_epochs"),
    "moco_m_cos": ("schedule", "momentum_cosine"),
    "knn_every": ("knn", "every"),
    "knn_bank": ("knn", "bank"),
    "knn_test": ("knn", "test"),
    "knn_k": ("knn", "k"),
    "knn_t": ("knn", "t"),
    "pretrained": ("classifier", "pretrained"),
    "train_augment": ("classifier", "train_augment"),
    "cache_features": ("classifier", "cache_features"),
    "workdir": ("run", "workdir"),
    "seed": ("run", "seed"),
    "strategy": ("run", "strategy"),
    "cpu_devices": ("run", "cpu_devices"),
    "mixed_precision": ("run", "mixed_precision"),
    "jit_compile": ("run", "jit_compile"),
    "deterministic": ("run", "deterministic"),
    "verbose": ("run", "verbose"),
    "checkpoint_steps": ("run", "checkpoint_steps"),
    "keep_checkpoints": ("run", "keep_checkpoints"),
    "keep_every_epochs": ("run", "keep_every_epochs"),
    "log_every_steps": ("run", "log_every_steps"),
    "health": ("run", "health"),
}

CONFIG_TO_FLAGS = {
    f"{section}.{key}": flag for flag, (section, key) in FLAGS_TO_CONFIG.items()
}


def config_value(name, value):
    """A flag's value as the config holds it: `--schedule` lists epochs."""
    if name != "schedule":
        return value
    try:
        return [int(epoch) for epoch in value or []]
    except ValueError:
        raise configs.ConfigError(
            f"--schedule must list epochs (e.g. 120,160): {value}"
        ) from None


def with_flags(config, **values):
    """A copy of `config` with `values`, by flag name as on the command
    line, in place: `with_flags(preset, moco_k=4096, cos=False)`.

    Raises:
        configs.ConfigError: a flag that `config` has no place for (e.g.
            `--moco_k` in a linear classification config).
    """
    config = copy.deepcopy(config)
    for name, value in values.items():
        section, key = FLAGS_TO_CONFIG[name]
        if section not in config:
            raise configs.ConfigError(
                f"--{name} has no effect in this recipe (its config has no "
                f"{section!r} section: {sorted(config)}); drop it."
            )
        if key not in config[section]:
            # E.g. --moco_k with a MoCo v3 preset (no queue), --cos with
            # v3's warm-up and cosine, --width with a ViT.
            raise configs.ConfigError(
                f"--{name} has no effect with this preset (its {section!r} "
                f"values are {', '.join(sorted(config[section]))}); drop it."
            )
        config[section][key] = config_value(name, value)
    return config


def recipe_config(table, preset=None):
    """The run's config: `preset` of `table` (`moco_keras.presets`; by
    default `--preset`) with the flags given, on the command line or in a
    flagfile, in place of its values (`with_flags`)."""
    preset = preset or FLAGS.preset
    try:
        config = presets.get(table, preset)
    except ValueError as error:
        raise configs.ConfigError(f"--preset={preset}: {error}") from None
    given = {
        name: FLAGS[name].value
        for name in FLAGS_TO_CONFIG
        if name in FLAGS and FLAGS[name].present
    }
    return with_flags(config, **given)


def flag_values(config):
    """`{flag: value}` of the flags that `config` holds a value of."""
    return {
        name: config[section][key]
        for name, (section, key) in FLAGS_TO_CONFIG.items()
        if key in config.get(section, {})
    }


def in_flag_names(message):
    """`message` with each config value it names (`model.queue_size`) as
    the flag that sets it (`--moco_k`)."""
    return re.sub(
        r"\b([a-z]+\.[a-z_]+)\b",
        lambda m: (
            f"--{CONFIG_TO_FLAGS[m[1]]}" if m[1] in CONFIG_TO_FLAGS else m[0]
        ),
        message,
    )


def run(main, table, preset):
    """`app.run(main)`, `preset` of `table` the default `--preset`.

    Its values become the flags' defaults too, so that `--help` shows them.
    A `configs.ConfigError` ends the run with its message in flag names; a
    `convert.CheckpointError` (a file that cannot be read, or that was
    refused) with its message alone, exit status 1; neither with a
    traceback.
    """

    def checked_main(argv):
        try:
            return main(argv)
        except configs.ConfigError as error:
            raise app.UsageError(in_flag_names(str(error))) from None
        except convert.CheckpointError as error:
            print(f"Error: {error}", file=sys.stderr)
            sys.exit(1)

    FLAGS.set_default("preset", preset)
    for name, value in flag_values(table[preset]).items():
        if name in FLAGS:
            FLAGS.set_default(name, value)
    app.run(checked_main)
