r"""MoCo v1 / v2 pretraining, with the official script's flags.

    python -m moco_keras.recipes.pretrain --flagfile=recipes/mocov1.flags \
        --data_dir=/data/ILSVRC2012 --workdir=runs/mocov1

Flags follow `main_moco.py` (`--arch`, `--epochs`, `--batch_size`, `--lr`,
`--schedule`, `--cos`, `--momentum`, `--wd`, `--moco_dim`, `--moco_k`,
`--moco_m`, `--moco_t`, `--mlp`, `--aug_plus`) plus the dataset, split BN and
run-keeping flags. The workdir gets `flags.json`, `epochs.csv`, `curves.png`,
`tensorboard/`, `checkpoints/ckpt-<step>.keras` and `results.json`. Run the
same command again after the run dies and it resumes from the newest
checkpoint, mid-epoch included.
"""

import time

from absl import flags

from moco_keras import presets
from moco_keras.recipes import common

FLAGS = flags.FLAGS

# Defaults None: the values come from the --preset (moco_keras.presets).
flags.DEFINE_enum(
    "arch",
    None,
    ["resnet18", "resnet34", "resnet50", "cifar_resnet18"],
    "Encoder.",
)
flags.DEFINE_integer(
    "width", None, "Base width of the ResNet (64 as torchvision; 16 is small)."
)
flags.DEFINE_integer("moco_dim", None, "Feature dimension.")
flags.DEFINE_integer("moco_k", None, "Queue size K (negative keys).")
flags.DEFINE_float("moco_m", None, "Key encoder momentum m.")
flags.DEFINE_float("moco_t", None, "Softmax temperature T.")
flags.DEFINE_bool("mlp", None, "MoCo v2's MLP head.")
flags.DEFINE_bool("aug_plus", None, "MoCo v2's augmentation (blur etc.).")
flags.DEFINE_bool(
    "blur", None, "With --aug_plus: the Gaussian blur (off for tiny images)."
)
flags.DEFINE_bool(
    "color_in_model",
    False,
    "Run colour jitter, grayscale, blur and normalization batched in the "
    "model (for accelerators); the CPU only decodes, crops and flips.",
)
flags.DEFINE_integer("knn_every", None, "kNN monitor every N epochs (0: off).")
flags.DEFINE_integer(
    "knn_bank",
    None,
    "Training images in the kNN bank (drawn at random, each class in "
    "proportion).",
)
flags.DEFINE_integer(
    "knn_test", None, "Validation images the kNN classifies (drawn so too)."
)

PRESETS = presets.PRETRAINING
DEFAULT_PRESET = "mocov1"


def check_flags(values):
    """Every contradiction, before any data is read.

    Returns:
        The lr milestones as ints.
    """
    check = common.check
    milestones = common.check_common(values)
    batch, k = values["batch_size"], values["moco_k"]
    check(
        k % batch == 0,
        f"--moco_k={k} is not divisible by the global --batch_size={batch}; "
        "the official code asserts it so that each step replaces whole "
        f"batches of keys. Use e.g. --moco_k={max(batch, k // batch * batch)}.",
    )
    splits = values["bn_splits"]
    check(
        splits >= 1 and batch % splits == 0,
        f"--bn_splits={splits} does not divide the global batch of {batch}: "
        f"split BN needs equal groups. Pick a divisor of {batch}.",
    )
    check(
        0 <= values["moco_m"] <= 1,
        f"--moco_m must be in [0, 1]: {values['moco_m']}",
    )
    check(values["moco_t"] > 0, f"--moco_t must be > 0: {values['moco_t']}")
    check(
        values["arch"] != "cifar_resnet18" or values["image_size"] <= 64,
        "--arch=cifar_resnet18 has the CIFAR stem (no downsampling): use it "
        f"with small images (--image_size <= 64), not {values['image_size']}.",
    )
    return milestones


def build(values, milestones, steps_per_epoch, replicas=1):
    """The compiled MoCo model of the flags.

    Args:
        replicas: `tf.distribute` replicas the model runs on; each normalizes
            `bn_splits / replicas` groups of its slice. (JAX's data parallel
            runs the global batch as one program: its split BN groups, all
            `bn_splits`, line up with the device shards.)
    """
    from moco_keras import MoCo
    from moco_keras import color
    from moco_keras import encoders

    size = values["image_size"]
    encoder = encoders.get_encoder(
        values["arch"],
        width=values["width"],
        bn_splits=values["bn_splits"] // replicas,
        input_shape=(size, size, 3),
    )
    augmentation = None
    if values["color_in_model"]:
        augmentation = color.ColorAugmentation.from_augmentation(
            augmentation_config(values), seed=values["seed"]
        )
    model = MoCo(
        encoder,
        dim=values["moco_dim"],
        mlp=values["mlp"],
        queue_size=values["moco_k"],
        momentum=values["moco_m"],
        temperature=values["moco_t"],
        augmentation=augmentation,
        seed=values["seed"],
    )
    model.compile(
        optimizer=common.optimizer(values, milestones, steps_per_epoch),
        jit_compile=values["jit_compile"],
    )
    return model


def augmentation_config(values):
    from moco_keras import augment

    mean, std = common.dataset_stats(values["dataset"])
    overrides = {"size": values["image_size"], "mean": mean, "std": std}
    if values["aug_plus"] and not values["blur"]:
        overrides["blur_p"] = 0.0
    name = "mocov2" if values["aug_plus"] else "mocov1"
    return augment.get_augmentation(name, **overrides)


def knn_monitor(values):
    """The kNN callback on `knn_bank` training and `knn_test` val images."""
    import numpy as np

    from moco_keras import data
    from moco_keras import knn

    mean, std = common.dataset_stats(values["dataset"])

    def arrays(split, count):
        source = common.load_source(
            values["dataset"],
            values["data_dir"],
            split,
            limit=count,
            seed=values["seed"],
        )
        images, labels = [], []
        for x, y in data.labelled_dataset(
            source,
            256,
            values["image_size"],
            mean,
            std,
            crop_fraction=values["crop_fraction"],
        ):
            images.append(x.numpy())
            labels.append(y.numpy())
        return np.concatenate(images), np.concatenate(labels), source

    bank, bank_labels, source = arrays("train", values["knn_bank"])
    test, test_labels, _ = arrays("val", values["knn_test"])
    return knn.KNNMonitor(
        bank,
        bank_labels,
        test,
        test_labels,
        len(source.class_names),
        every=values["knn_every"],
    )


def main(argv):
    del argv
    values = common.recipe_values([__name__], PRESETS)
    milestones = check_flags(values)
    import keras

    from moco_keras import data
    from moco_keras import distribute
    from moco_keras import training

    paths, strategy = common.set_up(values)
    devices = distribute.device_count(strategy)
    common.check_devices(values, devices)
    source = common.load_source(
        values["dataset"],
        values["data_dir"],
        "train",
        limit=values["train_limit"],
        seed=values["seed"],
    )
    steps_per_epoch = source.num_examples // values["batch_size"]
    common.check(
        steps_per_epoch >= 1,
        f"{source.num_examples} training images make no full batch of "
        f"{values['batch_size']}; lower --batch_size.",
    )
    with distribute.scope(strategy):
        model = build(
            values,
            milestones,
            steps_per_epoch,
            replicas=devices if strategy is not None else 1,
        )
    config = augmentation_config(values)

    def epoch_dataset(epoch, skip):
        return distribute.distribute_dataset(
            strategy,
            lambda shard: data.two_view_dataset(
                source,
                config,
                values["batch_size"],
                seed=values["seed"],
                color_in_model=values["color_in_model"],
                epoch=epoch,
                skip_batches=skip,
                shard=shard,
            ),
        )

    extra = [knn_monitor(values)] if values["knn_every"] else []
    callbacks = common.callbacks(
        paths,
        steps_per_epoch,
        values,
        f"MoCo {'v2' if values['aug_plus'] else 'v1'} pretraining",
        extra=extra,
        queue_size=values["moco_k"],
    )
    print(
        f"MoCo pretraining: {source.num_examples} images, "
        f"{values['epochs']} epochs of {steps_per_epoch} steps, "
        f"backend {keras.backend.backend()}, strategy {values['strategy']} "
        f"over {devices} device(s), workdir {values['workdir']}"
    )
    started = time.time()
    start_step = common.fit(
        model, epoch_dataset, values, steps_per_epoch, paths, callbacks
    )
    if not paths["chief"]:
        print("Done (this worker writes nothing; the chief has the results).")
        return
    columns = training.read_csv_log(paths["csv"])
    results = {
        "final_loss": columns.get("loss", [None])[-1],
        "final_acc1": columns.get("acc1", [None])[-1],
        "epochs": values["epochs"],
        "resumed_from_step": start_step,
        "seconds_this_session": round(time.time() - started, 1),
        "backend": keras.backend.backend(),
        "strategy": values["strategy"],
        "devices": devices,
        "checkpoint": training.latest_checkpoint(paths["checkpoints"])[0],
    }
    if extra:
        results["knn_top1"] = (
            extra[0].accuracies[-1][1] if (extra[0].accuracies) else None
        )
    common.write_json_atomically(paths["results"], results)
    print(
        f"Done: loss {results['final_loss']:.4f}, acc1 "
        f"{results['final_acc1']:.2f}; checkpoint {results['checkpoint']}"
    )


if __name__ == "__main__":
    common.run(main, PRESETS, DEFAULT_PRESET)
