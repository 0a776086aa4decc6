"""MoCo v1 and v2, and the runs built on them, as plain dicts.

Each value is written once, here, at one of three levels:

- `MOCOV1`, `MOCOV2` (`PRESETS`): `MoCo` constructor arguments. The values
  of the papers and the official code (facebookresearch/moco
  `main_moco.py`): v1 (arXiv 1911.05722) has a linear head and temperature
  0.07; v2 (arXiv 2003.04297) a 2-layer MLP head and temperature 0.2. Both
  use 128-d features, a queue of 65536 keys and key encoder momentum 0.999.
- `VIEWS`: the official views' crop, which the views of
  `views.AUGMENTATIONS` and the runs below share.
- `PRETRAINING`, `LINEAR_CLASSIFICATION`: whole runs. A pretraining run
  names its method (`method`: `"mocov1"`, `"mocov2"` or `"mocov3"`,
  `moco_keras.methods`); then one section per part of the library that
  takes them, each section's keys its arguments:

  - `model`: `MoCo(encoder, **config["model"])` (`MOCOV1` / `MOCOV2`), or
    `MoCoV3`'s (`MOCOV3_RESNET` / `MOCOV3_VIT`);
  - `encoder`: `encoders.get_encoder(**config["encoder"], ...)`;
  - `augmentation`: the views (`aug_plus` picks v2's, `crop_min` is
    RandomResizedCrop's smallest area, ...);
  - `data`: the dataset, its size, the crop size and the global batch;
  - `optimizer`: `optimizers.SGD`'s lr (for `lr_batch_size` images, scaled
    linearly to the batch when > 0), momentum and weight decay;
  - `schedule`: `optimizers.EpochSchedule`'s epochs, milestones, cosine;
  - `knn`: the kNN monitor (`knn.KNNMonitor`: every, k, t; bank and test
    image counts);
  - `classifier`: linear classification's backbone and training views;
  - `run`: how it executes and what it keeps (`RUN`): workdir, seed,
    devices, precision, checkpoints, logs.

The recipes' flags keep the official scripts' names (`--moco_t`,
`--aug_plus`, `--cos`, ...); one table,
`moco_keras.recipes.common.FLAGS_TO_CONFIG`, maps each onto its section and
key. `configs.config` merges overrides into a preset.

Example:

    >>> PRETRAINING["mocov2"]["model"]["temperature"]
    0.2
    >>> PRETRAINING["mocov2"]["model"] == MOCOV2
    True
"""

import copy

MOCOV1 = {
    "dim": 128,
    "mlp": False,
    "queue_size": 65536,
    "momentum": 0.999,
    "temperature": 0.07,
}

MOCOV2 = {**MOCOV1, "mlp": True, "temperature": 0.2}

PRESETS = {"mocov1": MOCOV1, "mocov2": MOCOV2}

# `MoCoV3` arguments of the official v3 recipes (facebookresearch/moco-v3
# `main_moco.py`, CONFIG.md): 256-d outputs, 4096-d hidden layers, momentum
# 0.99 (raised to 1 along a cosine with --moco-m-cos); ResNet-50 at T 1.0
# with a 2-layer projector and a predictor without a last BN, ViT at T 0.2
# with a 3-layer projector and a predictor with one.
MOCOV3_RESNET = {
    "dim": 256,
    "mlp_dim": 4096,
    "projector_layers": 2,
    "predictor_last_bn": False,
    "momentum": 0.99,
    "temperature": 1.0,
}
MOCOV3_VIT = {
    **MOCOV3_RESNET,
    "projector_layers": 3,
    "predictor_last_bn": True,
    "temperature": 0.2,
}

# The official views' crop (`main_moco.py`), which `views.AUGMENTATIONS`
# and the runs' `augmentation` sections both take: RandomResizedCrop's
# smallest area fraction (MoCo v3's --crop-min).
VIEWS = {"crop_min": 0.2}

# How a run executes, for every protocol; none of it changes what it learns
# but `seed`.
RUN = {
    "workdir": None,
    "seed": 0,
    "strategy": "none",
    "cpu_devices": 0,
    "mixed_precision": None,
    "jit_compile": False,
    "deterministic": False,
    "verbose": "auto",
    "checkpoint_steps": 0,
    "keep_checkpoints": 3,
    "keep_every_epochs": 0,
    "log_every_steps": 10,
    # The feature measures of `MoCo(health=True)` (health.HEALTH): a few
    # matrix products of the step's queries; off to save their cost.
    "health": True,
}

# ImageNet as the official code reads it: a folder of class folders, views
# of 224 px, evaluation by resize 256 and center crop 224.
_IMAGENET = {
    "dataset": "folder",
    "data_dir": None,
    "image_size": 224,
    "crop_fraction": 0.875,
    "train_limit": 0,
    "val_split": "validation",
    "val_limit": 0,
    "batch_size": 256,
    # grain's worker processes that decode and crop (0: threads of the
    # training process, which PIL's decode and resize share well).
    "workers": 0,
}

# MoCo v1 on ImageNet as `main_moco.py` runs it (arXiv 1911.05722): ResNet-50,
# batch 256 on 8 GPUs (8 BN groups), SGD lr 0.03, x0.1 at 120 and 160.
_MOCOV1_IMAGENET = {
    "method": "mocov1",
    "model": MOCOV1,
    "encoder": {"arch": "resnet50", "width": 64, "bn_splits": 8},
    "augmentation": {
        "aug_plus": False,
        "blur": True,
        **VIEWS,
    },
    "data": _IMAGENET,
    "optimizer": {
        "lr": 0.03,
        "lr_batch_size": 0,
        "momentum": 0.9,
        "weight_decay": 1e-4,
    },
    "schedule": {"epochs": 200, "milestones": [120, 160], "cosine": False},
    # The kNN of the official CIFAR demo: 200 neighbours, temperature 0.1;
    # off on ImageNet (the linear recipe is the number reported).
    "knn": {"every": 0, "bank": 5000, "test": 1000, "k": 200, "t": 0.1},
    "run": {**RUN, "keep_every_epochs": 10},
}


def merge(preset, **sections):
    """A deep copy of `preset` with the keys of `sections` replaced, section
    by section: `merge(p, model={"queue_size": 4096})`; a value that is not
    a section replaces the preset's (`merge(p, method="mocov2")`)."""
    merged = copy.deepcopy(preset)
    for name, values in sections.items():
        if isinstance(values, dict):
            merged[name] = {**merged.get(name, {}), **values}
        else:
            merged[name] = copy.deepcopy(values)
    return merged


# The v2 paper's four changes: MLP head, T 0.2, blur augmentation, cosine.
_MOCOV2_IMAGENET = merge(
    _MOCOV1_IMAGENET,
    method="mocov2",
    model=MOCOV2,
    augmentation={"aug_plus": True},
    schedule={"cosine": True},
)

# MoCo v2 on Fashion-MNIST on a CPU: a width-16 ResNet, lr 0.06 for a batch
# of 512 (scaled to the batch), wd 5e-4, a queue of 4096 keys, m 0.99, no
# blur on images this small, the kNN monitor every epoch.
_MOCOV2_FASHION_MNIST = merge(
    _MOCOV2_IMAGENET,
    model={"queue_size": 4096, "momentum": 0.99},
    encoder={"width": 16},
    augmentation={"blur": False},
    data={"dataset": "fashion_mnist", "crop_fraction": 1.0},
    optimizer={"lr": 0.06, "lr_batch_size": 512, "weight_decay": 5e-4},
    knn={"every": 1},
    run={"keep_every_epochs": 0},
)

# MoCo v3, ResNet-50, 100 epochs, as CONFIG.md runs it (`--moco-m-cos
# --crop-min=.2` on `main_moco.py`'s defaults): batch 4096, LARS at lr 0.6
# per 256 images, wd 1e-6, 10 warm-up epochs then a cosine; BN over the
# global batch (SyncBN), torchvision's zero_init_residual; BYOL's pair of
# views (`views.AUGMENTATIONS["mocov3"]`).
_MOCOV3_R50_IMAGENET = {
    "method": "mocov3",
    "model": MOCOV3_RESNET,
    "encoder": {"arch": "resnet50", "width": 64},
    "augmentation": {
        "blur": True,
        **VIEWS,
    },
    "data": {**_IMAGENET, "batch_size": 4096},
    "optimizer": {
        "name": "lars",
        "lr": 0.6,
        "lr_batch_size": 256,
        "momentum": 0.9,
        "weight_decay": 1e-6,
    },
    "schedule": {"epochs": 100, "warmup_epochs": 10, "momentum_cosine": True},
    "knn": _MOCOV1_IMAGENET["knn"],
    "run": {**RUN, "keep_every_epochs": 10},
}

# MoCo v3, ViT-Small/16, 300 epochs, as CONFIG.md runs it: AdamW at lr
# 1.5e-4 per 256 images, wd 0.1, 40 warm-up epochs, the frozen random patch
# projection (--stop-grad-conv1), T 0.2, crops of 0.08 or more.
_MOCOV3_VIT_SMALL_IMAGENET = merge(
    _MOCOV3_R50_IMAGENET,
    model=MOCOV3_VIT,
    augmentation={"crop_min": 0.08},
    optimizer={"name": "adamw", "lr": 1.5e-4, "weight_decay": 0.1},
    schedule={"epochs": 300, "warmup_epochs": 40},
)
_MOCOV3_VIT_SMALL_IMAGENET["encoder"] = {
    "arch": "vit_small",
    "stop_grad_conv1": True,
}
del _MOCOV3_VIT_SMALL_IMAGENET["optimizer"]["momentum"]

PRETRAINING = {
    "mocov1": _MOCOV1_IMAGENET,
    "mocov2": _MOCOV2_IMAGENET,
    "mocov3_r50": _MOCOV3_R50_IMAGENET,
    "mocov3_vit_small": _MOCOV3_VIT_SMALL_IMAGENET,
    "mocov3_vit_base": merge(
        _MOCOV3_VIT_SMALL_IMAGENET, encoder={"arch": "vit_base"}
    ),
    # `make demo` and `recipes/quickstart.flags` on 2 CPU cores: values
    # chosen to pass raw pixels' kNN within 10 minutes
    # (bench/quickstart_search.py, BENCHMARKS.md "Learning: the quick
    # start's values"): ResNet-18 with torchvision's stem (1/16 of the
    # CIFAR stem's compute, so 5 epochs of all 60k images fit) at the
    # images' 28 px, crops of half the image or more, v2's T 0.2.
    "quickstart": merge(
        _MOCOV2_FASHION_MNIST,
        encoder={"arch": "resnet18"},
        augmentation={"crop_min": 0.5},
        data={"image_size": 28, "train_limit": 60000},
        schedule={"epochs": 5},
    ),
    # The learning benchmark's protocol (bench/learning.py, "fmnist-moco-v2"
    # in BENCHMARKS.md) and the notebooks' network, fixed so that the
    # benchmark's tables stay comparable with the official code's: the
    # official CIFAR demo's ResNet-18 stem on Fashion-MNIST padded to 32 px,
    # T 0.1, 20k training images.
    "fmnist_moco_v2": merge(
        _MOCOV2_FASHION_MNIST,
        model={"temperature": 0.1},
        encoder={"arch": "cifar_resnet18"},
        data={"image_size": 32, "train_limit": 20000},
        schedule={"epochs": 4},
    ),
}

# MoCo v3 beside the quick start's v2 (`--preset=quickstart_mocov3`): the
# same network, images, crops and epochs, no blur on 28 px images; the
# values of solo-learn's CIFAR MoCo v3 where the ImageNet ones assume a
# 4096 batch and 100 epochs (T 0.2, LARS at lr 0.3 per 256 images, wd
# 1e-5), one warm-up epoch of five, and 1024-d hidden layers, a quarter of
# the step's time saved beside 4096 on a width-16 encoder.
PRETRAINING["quickstart_mocov3"] = merge(
    _MOCOV3_R50_IMAGENET,
    model={"mlp_dim": 1024, "temperature": 0.2},
    encoder=PRETRAINING["quickstart"]["encoder"],
    augmentation={"blur": False, "crop_min": 0.5},
    data=PRETRAINING["quickstart"]["data"],
    optimizer={"lr": 0.3, "weight_decay": 1e-5},
    schedule={"epochs": 5, "warmup_epochs": 1},
    knn=PRETRAINING["quickstart"]["knn"],
    run=PRETRAINING["quickstart"]["run"],
)
del PRETRAINING["quickstart_mocov3"]["encoder"]["bn_splits"]

# MoCo v2 on a folder of one's own images (`--preset=own_images`): the
# pretraining recipe sizes the queue, the key momentum, the blur and the
# crops to the data (`own_images_rules`) where the command line does not
# set them; the lr is 0.03 per 256 images of batch, scaled linearly.
PRETRAINING["own_images"] = merge(
    _MOCOV2_IMAGENET,
    data={"dataset": "folder"},
    optimizer={"lr_batch_size": 256},
    knn={"every": 0},
    run={"keep_every_epochs": 0},
)


def own_images_rules(num_images, image_size, batch_size):
    """The `own_images` preset's values for a dataset, and why.

    - `queue_size`: at most a quarter of the images (and 65536), a multiple
      of the batch and at least one batch. A queue that spans most of an
      epoch holds keys from an encoder many steps old, and one longer than
      the epoch holds each query's own image, an earlier view of it, as a
      negative (ImageNet's 65536 keys are 1/20 of its images, the official
      CIFAR demo's 4096 1/12).
    - `momentum`: 0.99 where an epoch is under 1000 steps (the official
      CIFAR demo's value), else the paper's 0.999: the key encoder follows
      the query encoder over about 1/(1-m) steps, which must stay short
      beside the run.
    - images under 64 px: no blur (MoCo v2's 23 px kernel is for 224 px;
      the CIFAR demo drops it) and crops of at least half the image (the
      quick start's finding on 28 px, `bench/quickstart_search.py`); from
      64 px, v2's blur and crops of 0.2 or more.

    Args:
        num_images: training images in the dataset.
        image_size: the crops' side in pixels.
        batch_size: the global batch.

    Returns:
        `(sections, reasons)`: the values as `merge` takes them
        (`{"model": {...}, "augmentation": {...}}`) and one line per rule.

    Example:

    >>> sections, reasons = own_images_rules(20000, 96, 256)
    >>> sections["model"]
    {'queue_size': 4864, 'momentum': 0.99}
    """
    quarter = min(65536, num_images // 4)
    queue_size = max(batch_size, quarter // batch_size * batch_size)
    steps = num_images // batch_size
    momentum = 0.99 if steps < 1000 else MOCOV2["momentum"]
    small = image_size < 64
    sections = {
        "model": {"queue_size": queue_size, "momentum": momentum},
        "augmentation": {
            "blur": not small,
            "crop_min": 0.5 if small else VIEWS["crop_min"],
        },
    }
    reasons = [
        f"moco_k {queue_size}: at most a quarter of the {num_images} images "
        "(and 65536), a multiple of the batch: a longer queue holds stale "
        "keys, one longer than an epoch each image's own earlier key",
        f"moco_m {momentum}: {steps} steps an epoch"
        + (" (< 1000: the CIFAR demo's 0.99)" if steps < 1000 else ""),
        f"blur {not small}, crop_min {sections['augmentation']['crop_min']}: "
        + (
            f"{image_size} px images are small (no blur, crops of half the "
            "image or more)"
            if small
            else f"MoCo v2's views at {image_size} px"
        ),
    ]
    return sections, reasons


LINEAR_CLASSIFICATION = {
    # `main_lincls.py`: frozen backbone, lr 30, momentum 0.9, wd 0, batch
    # 256, 100 epochs, x0.1 at 60 and 80, RandomResizedCrop(0.08-1) + flip.
    "imagenet": {
        "classifier": {
            # A pretraining workdir, a MoCo `.keras` checkpoint, or a
            # directory that recipes/convert wrote.
            "pretrained": None,
            "train_augment": True,
            "cache_features": False,
        },
        "data": _IMAGENET,
        "optimizer": {
            "lr": 30.0,
            "lr_batch_size": 0,
            "momentum": 0.9,
            "weight_decay": 0.0,
        },
        "schedule": {"epochs": 100, "milestones": [60, 80], "cosine": False},
        "run": RUN,
    },
}
# MoCo v3's `main_lincls.py` (facebookresearch/moco-v3): the same frozen
# backbone, N(0, 0.01) layer and views; SGD at lr 0.1 per 256 images
# (0.4 at batch 1024), momentum 0.9, wd 0, 90 epochs of a per-epoch
# cosine. Its ViTs at lr 3 per 256 (CONFIG.md).
LINEAR_CLASSIFICATION["mocov3"] = {
    **LINEAR_CLASSIFICATION["imagenet"],
    "data": {**_IMAGENET, "batch_size": 1024},
    "optimizer": {
        **LINEAR_CLASSIFICATION["imagenet"]["optimizer"],
        "lr": 0.1,
        "lr_batch_size": 256,
    },
    "schedule": {"epochs": 90, "milestones": [], "cosine": True},
}
LINEAR_CLASSIFICATION["mocov3_vit"] = {
    **LINEAR_CLASSIFICATION["mocov3"],
    "optimizer": {**LINEAR_CLASSIFICATION["mocov3"]["optimizer"], "lr": 3.0},
}


def get(table, name):
    """A deep copy of preset `name` of `table` (`PRETRAINING`, ...), or a
    `ValueError` that lists the names."""
    if name not in table:
        raise ValueError(
            f"Unknown preset {name!r}: expected one of {sorted(table)}."
        )
    return copy.deepcopy(table[name])
