"""MoCo pretraining from one config, as the official `main_moco.py` runs it.

`pretrain(config)` reads top to bottom: check the config, set up the
workdir and devices, read the data, build the model of the config's method
(`MoCo(encoder, **config["model"])` for `"mocov1"` and `"mocov2"`,
`MoCoV3` for `"mocov3"`) with its optimizer, and `fit` with checkpoints,
logs and the kNN monitor, resuming the workdir's run where it stopped. The
config is a `moco_keras.presets.PRETRAINING` preset (`configs.config` changes
it); what differs between the methods is `moco_keras.methods`, the
run-keeping `moco_keras.runs`.

Example:

```python
from moco_keras import configs, pretraining, presets

config = configs.config(
    presets.PRETRAINING["quickstart"],
    run={"workdir": "runs/fmnist"},
    schedule={"epochs": 1},
)
results = pretraining.pretrain(config)
```
"""

import time

import keras

from moco_keras import configs
from moco_keras import distribute
from moco_keras import encoders
from moco_keras import health
from moco_keras import knn
from moco_keras import methods
from moco_keras import optimizers
from moco_keras import runs
from moco_keras import sources
from moco_keras import training
from moco_keras import views
from moco_keras import vits
from moco_keras.configs import check

# The encoders a pretraining config names (`encoder.arch`): the ResNets of
# `encoders.ENCODERS` and, for MoCo v3, the ViTs of `vits.VITS`.
ARCHS = (*encoders.ENCODERS, *vits.VITS)


def check_pretraining(config):
    """Every contradiction of a pretraining config, before any data is read.

    Returns:
        The lr milestones as ints.
    """
    milestones = configs.check_common(config)
    sources.check_input(config)
    methods.get(config).check(config)
    encoder = config["encoder"]
    crop_min = config["augmentation"]["crop_min"]
    check(
        0 < crop_min <= 1,
        f"--crop_min is an area fraction in (0, 1]: {crop_min}",
    )
    size = config["data"]["image_size"]
    check(
        encoder["arch"] in ARCHS,
        f"Unknown --arch={encoder['arch']!r}: expected one of {ARCHS}.",
    )
    check(
        encoder["arch"] != "cifar_resnet18" or size <= 64,
        "--arch=cifar_resnet18 has the CIFAR stem (no downsampling): use it "
        f"with small images (--image_size <= 64), not {size}.",
    )
    return milestones


def augmentation_config(config):
    """The views of the config at its size and its dataset's
    normalization: the method's (`methods.Method.views`): v1's or v2's
    (`aug_plus`), one dict for both views; or for MoCo v3, BYOL's pair
    (`views.AUGMENTATIONS["mocov3"]`)."""
    settings = config["augmentation"]
    mean, std = sources.dataset_stats(config["data"]["dataset"])
    overrides = {
        "size": config["data"]["image_size"],
        "mean": mean,
        "std": std,
        "scale": (settings["crop_min"], 1.0),
    }
    name = methods.get(config).views(config)
    if name != "mocov1" and not settings["blur"]:
        overrides["blur_p"] = 0.0
    return views.get_augmentation(name, **overrides)


def build_moco(config, milestones, steps_per_epoch, replicas=1):
    """The compiled model of a pretraining config's method: `MoCo` (v1/v2)
    or `MoCoV3` (`methods.Method.build_model`).

    Args:
        replicas: `tf.distribute` replicas the model runs on; with v1/v2
            each normalizes `bn_splits / replicas` groups of its slice; v3's
            BN is synchronized over them, as SyncBN in the official code.
    """
    method = methods.get(config)
    encoder = method.build_encoder(config, replicas)
    # The pipeline crops and flips; the colour half runs in the model.
    pair = views.view_pair(augmentation_config(config))
    model = method.build_model(config, encoder, pair, steps_per_epoch)
    model.compile(
        optimizer=optimizers.from_config(config, milestones, steps_per_epoch),
        jit_compile=configs.jit_compile(config),
    )
    return model


def knn_monitor(config):
    """The kNN callback on `knn.bank` training and `knn.test` val images."""
    settings = config["knn"]
    bank, bank_labels, source = sources.evaluation_arrays(
        config, "train", settings["bank"]
    )
    test, test_labels, _ = sources.evaluation_arrays(
        config, "val", settings["test"]
    )
    return knn.KNNMonitor(
        bank,
        bank_labels,
        test,
        test_labels,
        len(source.class_names),
        every=settings["every"],
        k=settings["k"],
        t=settings["t"],
    )


def pretrain(config):
    """MoCo pretraining of `config` in its workdir, resumed if it exists.

    Args:
        config: a `PRETRAINING` preset with `run.workdir` (`configs.config`).

    Returns:
        The run's `results.json` as a dict (the chief's; other workers get
        None): final loss and acc1, the kNN top-1 of the last monitor
        evaluation, the newest checkpoint, the step it resumed from.
    """
    milestones = check_pretraining(config)
    method = methods.get(config)
    data, run = config["data"], config["run"]
    paths, strategy = runs.set_up(config)
    devices = distribute.device_count(strategy)
    configs.check_devices(config, devices)
    method.check_devices(config, devices)
    check(
        not config["knn"]["every"] or distribute.process_shard() is None,
        "The kNN monitor embeds its images in one process; this "
        "--strategy=data_parallel job has several. Set --knn_every=0 and "
        "evaluate the checkpoint afterwards (the linear recipe, on one "
        "host).",
    )
    source = sources.data_source(config, "train", data["train_limit"])
    batch_size = data["batch_size"]
    steps_per_epoch = source.num_examples // batch_size
    check(
        steps_per_epoch >= 1,
        f"{source.num_examples} training images make no full batch of "
        f"{batch_size}; lower --batch_size.",
    )
    with distribute.scope(strategy):
        model = build_moco(
            config,
            milestones,
            steps_per_epoch,
            replicas=devices if strategy is not None else 1,
        )
    augmentation = augmentation_config(config)

    def two_view_batches(batch_size, epoch, skip=0, shard=None, workers=None):
        return views.two_view_batches(
            source,
            augmentation,
            batch_size,
            seed=run["seed"],
            epoch=epoch,
            skip_batches=skip,
            shard=shard,
            workers=data["workers"] if workers is None else workers,
        )

    def epoch_dataset(epoch, skip):
        return distribute.distribute_dataset(
            strategy,
            lambda shard: two_view_batches(batch_size, epoch, skip, shard),
        )

    extra = [knn_monitor(config)] if config["knn"]["every"] else []
    preview = None
    fresh = training.latest_checkpoint(paths["checkpoints"])[0] is None
    if paths["chief"] and fresh:
        # A new run shows the crops of epoch 0's first images (before the
        # in-model colour ops), from a pipeline of its own so that the
        # training pipeline's draws stay as they are.
        preview = next(
            iter(two_view_batches(min(batch_size, 8), epoch=0, workers=0))
        )
    run_callbacks = runs.callbacks(
        paths,
        steps_per_epoch,
        config,
        f"{method.title} pretraining",
        extra=extra,
        queue_size=method.queue_size(config),
        views=preview,
    )
    epochs = config["schedule"]["epochs"]
    print(
        f"{method.title} pretraining: {source.num_examples} images, "
        f"{epochs} epochs of {steps_per_epoch} steps, backend "
        f"{keras.backend.backend()}, strategy {run['strategy']} over "
        f"{devices} device(s), workdir {run['workdir']}"
    )
    started = time.time()
    start_step = runs.fit(
        model, epoch_dataset, config, steps_per_epoch, paths, run_callbacks
    )
    if not paths["chief"]:
        print("Done (this worker writes nothing; the chief has the results).")
        return None
    columns = training.read_csv_log(paths["csv"])
    results = {
        "final_loss": columns.get("loss", [None])[-1],
        "final_acc1": columns.get("acc1", [None])[-1],
        # The last epoch's feature measures (`health.HEALTH`).
        "final_health": {
            name: columns[name][-1] for name in health.HEALTH if name in columns
        },
        "epochs": epochs,
        "resumed_from_step": start_step,
        "seconds_this_session": round(time.time() - started, 1),
        "backend": keras.backend.backend(),
        "strategy": run["strategy"],
        "devices": devices,
        "checkpoint": training.latest_checkpoint(paths["checkpoints"])[0],
    }
    if extra:
        results["knn_top1"] = (
            extra[0].accuracies[-1][1] if (extra[0].accuracies) else None
        )
    runs.write_json_atomically(paths["results"], results)
    print(
        f"Done: loss {results['final_loss']:.4f}, acc1 "
        f"{results['final_acc1']:.2f}; checkpoint {results['checkpoint']}"
    )
    return results
