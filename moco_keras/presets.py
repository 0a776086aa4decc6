"""MoCo v1 and v2, and the runs built on them, as plain dicts.

Two levels, each value written once:

- `MOCOV1`, `MOCOV2` (`PRESETS`): `MoCo` constructor arguments. The values
  of the papers and the official code (facebookresearch/moco
  `main_moco.py`): v1 (arXiv 1911.05722) has a linear head and temperature
  0.07; v2 (arXiv 2003.04297) a 2-layer MLP head and temperature 0.2. Both
  use 128-d features, a queue of 65536 keys and key encoder momentum 0.999.
- `PRETRAINING`, `LINEAR_CLASSIFICATION`: whole runs (model, augmentation,
  optimizer, schedule, data), keyed by the official scripts' flag names
  (`moco_k`, `moco_m`, `moco_t`, `mlp`, `aug_plus`, `cos`, ...), which are
  the recipes' flags (`--preset=mocov2`) and the keys of a run's
  `flags.json`. A recipe's flag given on the command line or in a flagfile
  replaces the preset's value; `recipes/*.flags` hold only what differs.

Example:

>>> PRETRAINING["mocov2"]["moco_t"], PRETRAINING["mocov2"]["aug_plus"]
(0.2, True)
>>> MOCOV2["temperature"] == PRETRAINING["mocov2"]["moco_t"]
True
"""

MOCOV1 = {
    "dim": 128,
    "mlp": False,
    "queue_size": 65536,
    "momentum": 0.999,
    "temperature": 0.07,
}

MOCOV2 = {**MOCOV1, "mlp": True, "temperature": 0.2}

PRESETS = {"mocov1": MOCOV1, "mocov2": MOCOV2}

# The recipe flags that are `MoCo` arguments: flag name -> argument name.
MOCO_ARGUMENTS = {
    "moco_dim": "dim",
    "mlp": "mlp",
    "moco_k": "queue_size",
    "moco_m": "momentum",
    "moco_t": "temperature",
}


def _moco_flags(preset):
    return {flag: preset[argument] for flag, argument in MOCO_ARGUMENTS.items()}


# MoCo v1 on ImageNet as `main_moco.py` runs it (arXiv 1911.05722): ResNet-50,
# batch 256 on 8 GPUs (8 BN groups), SGD lr 0.03, x0.1 at 120 and 160.
_MOCOV1_IMAGENET = {
    "arch": "resnet50",
    "width": 64,
    "dataset": "folder",
    "image_size": 224,
    "crop_fraction": 0.875,
    "train_limit": 0,
    "epochs": 200,
    "batch_size": 256,
    "lr": 0.03,
    "lr_batch_size": 0,
    "schedule": ["120", "160"],
    "cos": False,
    "momentum": 0.9,
    "wd": 1e-4,
    **_moco_flags(MOCOV1),
    "aug_plus": False,
    "blur": True,
    # RandomResizedCrop's smallest area fraction (MoCo v3's --crop-min).
    "crop_min": 0.2,
    "bn_splits": 8,
    "knn_every": 0,
    "knn_bank": 5000,
    "knn_test": 1000,
    # The kNN of the official CIFAR demo: 200 neighbours, temperature 0.1.
    "knn_k": 200,
    "knn_t": 0.1,
    "keep_every_epochs": 10,
}

_MOCOV2_IMAGENET = {
    **_MOCOV1_IMAGENET,
    # The v2 paper's four changes: MLP head, T 0.2, blur augmentation, cosine.
    **_moco_flags(MOCOV2),
    "aug_plus": True,
    "cos": True,
}

# MoCo v2 on Fashion-MNIST on a CPU: a width-16 ResNet, lr 0.06 for a batch
# of 512 (scaled to the batch), wd 5e-4, a queue of 4096 keys, m 0.99, no
# blur on images this small, the kNN monitor every epoch.
_MOCOV2_FASHION_MNIST = {
    **_MOCOV2_IMAGENET,
    "width": 16,
    "dataset": "fashion_mnist",
    "crop_fraction": 1.0,
    "lr": 0.06,
    "lr_batch_size": 512,
    "wd": 5e-4,
    "moco_k": 4096,
    "moco_m": 0.99,
    "blur": False,
    "knn_every": 1,
    "keep_every_epochs": 0,
}

PRETRAINING = {
    "mocov1": _MOCOV1_IMAGENET,
    "mocov2": _MOCOV2_IMAGENET,
    # `make demo` and `recipes/quickstart.flags` on 2 CPU cores: values
    # measured to pass raw pixels' kNN within 10 minutes
    # (bench/quickstart_search.py, BENCHMARKS.md "Learning: the quick
    # start"): ResNet-18 with torchvision's stem (1/16 of the CIFAR stem's
    # compute, so 5 epochs of all 60k images fit) at the images' 28 px,
    # crops of half the image or more, v2's T 0.2.
    "quickstart": {
        **_MOCOV2_FASHION_MNIST,
        "arch": "resnet18",
        "image_size": 28,
        "crop_min": 0.5,
        "train_limit": 60000,
        "epochs": 5,
    },
    # The learning benchmark's protocol (bench/learning.py, "fmnist-moco-v2"
    # in BENCHMARKS.md) and the notebooks' network, fixed so that the
    # benchmark's tables stay comparable with the official code's: the
    # official CIFAR demo's ResNet-18 stem on Fashion-MNIST padded to 32 px,
    # T 0.1, 20k training images.
    "fmnist_moco_v2": {
        **_MOCOV2_FASHION_MNIST,
        "arch": "cifar_resnet18",
        "image_size": 32,
        "train_limit": 20000,
        "epochs": 4,
        "moco_t": 0.1,
    },
}

LINEAR_CLASSIFICATION = {
    # `main_lincls.py`: frozen backbone, lr 30, momentum 0.9, wd 0, batch
    # 256, 100 epochs, x0.1 at 60 and 80, RandomResizedCrop(0.08-1) + flip.
    "imagenet": {
        "dataset": "folder",
        "image_size": 224,
        "crop_fraction": 0.875,
        "train_limit": 0,
        "epochs": 100,
        "batch_size": 256,
        "lr": 30.0,
        "lr_batch_size": 0,
        "schedule": ["60", "80"],
        "cos": False,
        "momentum": 0.9,
        "wd": 0.0,
        "train_augment": True,
        "cache_features": False,
        "keep_every_epochs": 0,
    },
}


def get(table, name):
    """A copy of preset `name` of `table` (`PRETRAINING`, ...), or a
    `ValueError` that lists the names."""
    if name not in table:
        raise ValueError(
            f"Unknown preset {name!r}: expected one of {sorted(table)}."
        )
    return dict(table[name])
