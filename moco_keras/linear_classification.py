"""Linear classification on frozen MoCo features, as the official
`main_lincls.py` runs it: the number the papers report.

`linear_classification(config)` loads the pretrained query encoder
(`classifier.pretrained`: a pretraining workdir, a MoCo `.keras`
checkpoint, or a directory that `recipes/convert` wrote), freezes it in
inference mode, trains `linear_head` on its pooled features with the
config's optimizer and schedule, validates after every epoch, and at the end
checks the backbone against the checkpoint on disk. The config is a
`moco_keras.presets.LINEAR_CLASSIFICATION` preset; the run-keeping is
`moco_keras.runs`.

Example:

```python
from moco_keras import configs, linear_classification, presets

config = configs.config(
    presets.LINEAR_CLASSIFICATION["imagenet"],
    classifier={"pretrained": "runs/mocov2"},
    data={"data_dir": "/data/ILSVRC2012"},
    run={"workdir": "runs/mocov2_lincls"},
)
results = linear_classification.linear_classification(config)
```
"""

import json
import os
import time

import keras
import numpy as np
from keras import ops

from moco_keras import configs
from moco_keras import convert
from moco_keras import distribute
from moco_keras import methods
from moco_keras import momentum_pair
from moco_keras import optimizers
from moco_keras import runs
from moco_keras import sources
from moco_keras import training
from moco_keras import views
from moco_keras.configs import check


def check_linear_classification(config):
    """Every contradiction of a linear classification config.

    Returns:
        The lr milestones as ints.
    """
    milestones = configs.check_common(config)
    sources.check_input(config)
    check(
        not (
            config["classifier"]["cache_features"]
            and config["classifier"]["train_augment"]
        ),
        "--cache_features extracts each training image's features once, "
        "from its evaluation view; it cannot train on random crops. Add "
        "--notrain_augment (or drop --cache_features).",
    )
    return milestones


def linear_preset(pretrained):
    """The linear protocol of the method `pretrained` was trained with.

    A pretraining workdir (or a checkpoint in its `checkpoints/`) names its
    method in `config.json`; a directory of `recipes/convert` its kind and
    architecture. Each method names its protocol
    (`methods.Method.linear_preset`): `"imagenet"` (`main_lincls.py` of
    MoCo v1/v2), `"mocov3"` or `"mocov3_vit"` (MoCo v3's).

    Returns:
        `(preset, why)`: a key of `presets.LINEAR_CLASSIFICATION` and what
        chose it; `("imagenet", None)` where `pretrained` names no method
        (a run from before configs named it, or a lone `.keras` file).
    """
    path = os.path.abspath(pretrained or ".")
    metadata = os.path.join(path, convert.METADATA)
    if os.path.isfile(metadata):
        try:
            with open(metadata) as f:
                converted = json.load(f)
            kind, arch = converted["kind"], converted["arch"]
        except (OSError, ValueError, KeyError, TypeError):
            return "imagenet", None  # load_converted says what is wrong
        method = methods.of_converted(kind)
        if method is None:
            return "imagenet", None
        why = f"the converted checkpoint's kind ({kind}, {arch})"
        return method.linear_preset(arch), why
    workdir = (
        path if os.path.isdir(path) else os.path.dirname(os.path.dirname(path))
    )
    try:
        with open(os.path.join(workdir, configs.CONFIG_FILE)) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return "imagenet", None
    if not isinstance(config, dict) or config.get("method") not in (
        methods.METHODS
    ):
        return "imagenet", None
    method = methods.get(config)
    arch = config.get("encoder", {}).get("arch")
    why = f"the pretraining run's method ({method.title}, {arch})"
    return method.linear_preset(arch), why


def resolve_pretrained(path):
    """The checkpoint file (or converted directory) `pretrained` names."""
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
    if os.path.isfile(os.path.join(path, convert.METADATA)):
        model, metadata = convert.load_converted(path)
        normalization = (tuple(metadata["mean"]), tuple(metadata["std"]))
        return convert.backbone_of(model), normalization
    return load_moco(path).encoder_q, None


def load_moco(path):
    """The `MoCo` model of a `.keras` checkpoint (`ConfigError` if none)."""
    try:
        model = convert.load_keras(path)
    except convert.CheckpointError as error:
        raise configs.ConfigError(
            f"--pretrained is not a MoCo checkpoint: {error} Pass a `.keras` "
            "file written by moco_keras.recipes.pretrain, or its workdir."
        ) from None
    check(
        isinstance(model, momentum_pair.MomentumPair),
        f"--pretrained={path} holds a {type(model).__name__}, not a MoCo "
        "model; pass a checkpoint of moco_keras.recipes.pretrain.",
    )
    return model


def linear_head(feature_dim, num_classes, name="fc"):
    """`main_lincls.py`'s classifier: weights N(0, 0.01), zero bias."""

    return keras.layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.RandomNormal(0.0, 0.01),
        bias_initializer="zeros",
        name=name,
    )


def compile_classifier(model, config, milestones, steps_per_epoch, classes):
    """Compiles `model` with the config's SGD and schedule, the softmax
    cross-entropy, and top-1 / top-5 accuracy (`acc1`, `acc5`)."""
    model.compile(
        optimizer=optimizers.from_config(config, milestones, steps_per_epoch),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="acc1"),
            keras.metrics.SparseTopKCategoricalAccuracy(
                k=min(5, classes), name="acc5"
            ),
        ],
        jit_compile=configs.jit_compile(config),
    )


def check_backbone_unchanged(backbone, checkpoint):
    """Raises unless `backbone` equals the one in `checkpoint`, read again.

    `main_lincls.py`'s `sanity_check`: the frozen weights after training
    are compared with the checkpoint on disk, not with a copy taken after
    loading, so a backbone that training changed and one that was loaded
    wrong (the wrong encoder, weights left at their initialisation) both
    fail.
    """

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
    features, labels = [], []
    for images, batch_labels in dataset:
        images = ops.convert_to_tensor(np.asarray(images))
        batch = backbone(images, training=False)
        features.append(ops.convert_to_numpy(batch))
        labels.append(np.asarray(batch_labels))
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
        config: a `LINEAR_CLASSIFICATION` preset with `run.workdir` and
            `classifier.pretrained` (a pretraining workdir, a MoCo `.keras`
            file, or a directory that recipes/convert wrote).

    Returns:
        The run's `results.json` as a dict (None on workers but the chief).
    """
    milestones = check_linear_classification(config)
    checkpoint = resolve_pretrained(config["classifier"]["pretrained"])

    paths, strategy = runs.set_up(config)
    check(
        distribute.process_shard() is None,
        "Linear classification under --strategy=data_parallel runs in one "
        "process (all of one host's devices); this job has several "
        "(KERAS_DISTRIBUTION_NUM_PROCESSES). Run it on one host.",
    )
    configs.check_devices(config, distribute.device_count(strategy))
    # Everything that makes variables (backbone, head, optimizer) belongs to
    # the strategy, and fit may run in its scope too.
    with distribute.scope(strategy):
        return _train_linear(config, milestones, checkpoint, paths)


def _train_linear(config, milestones, checkpoint, paths):
    backbone, normalization = load_backbone(checkpoint)
    backbone.trainable = False  # inference mode: BN moving statistics
    size = config["data"]["image_size"]
    # A converted checkpoint expects the statistics its source trained with.
    mean, std = normalization or sources.dataset_stats(
        config["data"]["dataset"]
    )
    train = sources.data_source(config, "train", config["data"]["train_limit"])
    val = sources.data_source(config, "val", config["data"]["val_limit"])
    classes = len(train.class_names)
    batch_size = config["data"]["batch_size"]
    steps_per_epoch = train.num_examples // batch_size
    check(
        steps_per_epoch >= 1,
        f"{train.num_examples} training images make no full batch of "
        f"{batch_size}; lower --batch_size.",
    )
    augmentation = None
    if config["classifier"]["train_augment"]:
        augmentation = views.linear_augmentation(size, mean, std)
    seed = config["run"]["seed"]

    def labelled(source, **kwargs):
        return views.labelled_batches(
            source,
            batch_size,
            size,
            mean,
            std,
            crop_fraction=config["data"]["crop_fraction"],
            seed=seed,
            workers=config["data"]["workers"],
            **kwargs,
        )

    feature_dim = backbone.output_shape[-1]
    head = linear_head(feature_dim, classes)
    if config["classifier"]["cache_features"]:
        print("Extracting the frozen features once ...")
        train_x, train_y = _features(backbone, labelled(train))
        val_x, val_y = _features(backbone, labelled(val))
        inputs = keras.Input((feature_dim,))
        model = keras.Model(inputs, head(inputs), name="linear_head")

        # In the order of `train`: the image path's order for each epoch.
        def epoch_dataset(epoch, skip):
            return views.array_batches(
                (train_x, train_y), batch_size, seed, epoch, skip
            )

        val_data = views.array_batches((val_x, val_y), batch_size)
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
    run_callbacks = runs.callbacks(
        paths,
        steps_per_epoch,
        config,
        "Linear classification",
        extra=[training.ScoreLog()],
    )
    print(
        f"Linear classification on {checkpoint}: {train.num_examples} "
        f"training images, {classes} classes, "
        f"{config['schedule']['epochs']} epochs, validation on "
        f"{val.num_examples} images after each"
    )
    started = time.time()
    runs.fit(
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
        "cache_features": config["classifier"]["cache_features"],
        "normalization": {"mean": list(mean), "std": list(std)},
        "seconds_this_session": round(time.time() - started, 1),
        "backend": keras.backend.backend(),
    }
    runs.write_json_atomically(paths["results"], results)
    print(
        f"Validation top-1 {results['top1']:.2f} %, top-5 "
        f"{results['top5']:.2f} % after epoch {epochs[-1]['epoch']} "
        f"({val.num_examples} images); best top-1 {best['top1']:.2f} % "
        f"(top-5 {best['top5']:.2f} %) at epoch {best['epoch']}. The "
        "backbone is unchanged (checked against the checkpoint on disk)."
    )
    return results
