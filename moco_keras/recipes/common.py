"""The flags shared by the recipes, and how they become a run's config.

A recipe is a command-line wrapper: its absl flags (the official scripts'
names) are resolved against its `--preset` (`recipe_values`) into the
config of a run function of `moco_keras.runs`; `run` reports a config that
cannot run (`runs.ConfigError`) as a usage error, without a traceback.
"""

from absl import flags

from moco_keras.runs import RUN_DEFAULTS

FLAGS = flags.FLAGS

# Shared by the recipes. A flag whose default is None here takes its value
# from the recipe's preset (`moco_keras.presets`, `--preset`) unless given.
flags.DEFINE_string(
    "preset",
    None,
    "The run's preset in moco_keras.presets: pretrain: mocov1 (default), "
    "mocov2, quickstart, fmnist_moco_v2; lincls: imagenet (default). Flags "
    "given replace its values.",
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
flags.DEFINE_integer(
    "seed", RUN_DEFAULTS["seed"], "Seed of weights, data order and draws."
)
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
    RUN_DEFAULTS["checkpoint_steps"],
    "Also checkpoint every N steps (0: per epoch).",
)
flags.DEFINE_integer(
    "log_every_steps",
    RUN_DEFAULTS["log_every_steps"],
    "TensorBoard: the step's loss, accuracy and lr every N steps.",
)
flags.DEFINE_integer(
    "keep_checkpoints",
    RUN_DEFAULTS["keep_checkpoints"],
    "Newest checkpoints to keep.",
)
flags.DEFINE_integer(
    "keep_every_epochs", None, "Also keep every N-th epoch's checkpoint."
)
flags.DEFINE_enum(
    "mixed_precision",
    RUN_DEFAULTS["mixed_precision"],
    ["mixed_float16", "mixed_bfloat16"],
    "Keras dtype policy (GPUs: mixed_float16 / mixed_bfloat16).",
)
flags.DEFINE_bool(
    "jit_compile",
    RUN_DEFAULTS["jit_compile"],
    "Compile the train step: XLA (TensorFlow), torch.compile (torch). The "
    "JAX backend always compiles it.",
)
flags.DEFINE_bool(
    "deterministic",
    RUN_DEFAULTS["deterministic"],
    "TensorFlow backend: deterministic kernels (bitwise-repeatable runs).",
)
flags.DEFINE_enum(
    "verbose",
    RUN_DEFAULTS["verbose"],
    ["auto", "0", "1", "2"],
    "fit verbosity.",
)
flags.DEFINE_enum(
    "strategy",
    RUN_DEFAULTS["strategy"],
    ["none", "mirrored", "multi_worker", "tpu", "data_parallel"],
    "Devices: 'none' (one device), 'mirrored' (all GPUs of this machine), "
    "'multi_worker' (several machines, TF_CONFIG), 'tpu' (TensorFlow "
    "backend); 'data_parallel' (all devices, JAX backend). --batch_size and "
    "--lr stay global.",
)
# recipes/lincls and recipes/export.
flags.DEFINE_string(
    "pretrained",
    RUN_DEFAULTS["pretrained"],
    "A pretraining workdir (its newest checkpoint is used), a MoCo "
    "checkpoint file (`.keras`), or a directory that recipes/convert wrote "
    "(official PyTorch or PaddleFleetX weights, with their normalization).",
)
flags.DEFINE_string(
    "output", None, "recipes/convert, recipes/export: the directory to write."
)
flags.DEFINE_integer(
    "cpu_devices",
    RUN_DEFAULTS["cpu_devices"],
    "Split the CPU into this many devices (to try --strategy on a CPU).",
)


def recipe_values(modules, table):
    """The run's values: the flags of `modules` (and of this one) that were
    given, on the command line or in a flagfile; for the others the value
    of the `--preset` of `table` (`moco_keras.presets`), else the flag's
    default. `preset` holds the preset's name."""
    from moco_keras import presets
    from moco_keras import runs

    names = {flag.name for flag in FLAGS.get_flags_for_module(__name__)}
    for module in modules:
        names |= {flag.name for flag in FLAGS.get_flags_for_module(module)}
    try:
        preset = presets.get(table, FLAGS.preset)
    except ValueError as error:
        raise runs.ConfigError(f"--preset={FLAGS.preset}: {error}") from None
    values = {}
    for name in sorted(names):
        flag = FLAGS[name]
        given = flag.present or name not in preset
        values[name] = flag.value if given else preset[name]
    return values


def run(main, table, preset):
    """`app.run(main)`, `preset` of `table` the default `--preset`.

    Its values become the flags' defaults too, so that `--help` shows them.
    """
    from absl import app

    from moco_keras import runs

    def checked_main(argv):
        try:
            return main(argv)
        except runs.ConfigError as error:
            raise app.UsageError(str(error)) from None

    FLAGS.set_default("preset", preset)
    for name, value in table[preset].items():
        if name in FLAGS:
            FLAGS.set_default(name, value)
    app.run(checked_main)
