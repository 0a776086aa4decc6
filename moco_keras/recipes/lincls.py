r"""Linear classification on frozen MoCo features: the number papers report.

    python -m moco_keras.recipes.lincls --flagfile=recipes/lincls.flags \
        --pretrained=runs/mocov2 --data_dir=/data/ILSVRC2012 \
        --workdir=runs/mocov2_lincls

The protocol of the official `main_lincls.py`: the pretrained query encoder,
frozen and in inference mode (BN uses its moving statistics), its pooled
features into one Dense layer initialised N(0, 0.01) with a zero bias; SGD
lr 30, momentum 0.9, weight decay 0, batch 256, 100 epochs, x0.1 at epochs
60 and 80; training views RandomResizedCrop(224, scale 0.08-1) + flip,
evaluation resize 256 + center crop 224; top-1 and top-5 on the validation
split. At the end the backbone is checked to be unchanged.

`--cache_features` is the fast path for small data: the features of the
evaluation view of every training image are computed once and the linear
layer trains on them (no random crops, so use it with
`--notrain_augment` semantics in mind); with `--notrain_augment`, the full
path gives the same result (tested).
"""

import os
import time

from absl import app
from absl import flags

from moco_keras import presets
from moco_keras.recipes import common

FLAGS = flags.FLAGS

flags.DEFINE_string(
    "pretrained",
    None,
    "A pretraining workdir (its newest checkpoint is used), a MoCo "
    "checkpoint file (`.keras`), or a directory that recipes/convert wrote "
    "(official PyTorch or PaddleFleetX weights, with their normalization).",
)
flags.DEFINE_bool(
    "train_augment",
    None,
    "Train on RandomResizedCrop(scale 0.08-1) + flip views; off: on the "
    "evaluation views.",
)
flags.DEFINE_bool(
    "cache_features",
    None,
    "Fast path: extract the frozen features once, train the linear layer on "
    "them (implies --notrain_augment).",
)
flags.DEFINE_string(
    "val_split", "validation", "The tfds split used for validation."
)
flags.DEFINE_integer(
    "val_limit",
    0,
    "Validate on N validation images drawn at random, each class in "
    "proportion (0: all, as the papers report).",
)

PRESETS = presets.LINEAR_CLASSIFICATION
DEFAULT_PRESET = "imagenet"


def resolve_pretrained(path):
    """The checkpoint file (or converted directory) `--pretrained` names."""
    from moco_keras import convert
    from moco_keras import training

    common.check(path, "--pretrained is required: a workdir or a checkpoint.")
    if os.path.isfile(os.path.join(path, convert.METADATA)):
        return path  # written by recipes/convert
    if os.path.isdir(path):
        directory = os.path.join(path, "checkpoints")
        found, _ = training.latest_checkpoint(directory)
        if found is None:
            found, _ = training.latest_checkpoint(path)
        common.check(
            found is not None,
            f"--pretrained={path} is a folder without MoCo checkpoints "
            "(expected checkpoints/ckpt-<step>.keras, as the pretrain "
            "recipe writes).",
        )
        return found
    common.check(
        os.path.isfile(path),
        f"--pretrained={path} does not exist.",
    )
    return path


def load_backbone(path):
    """The query encoder of a MoCo checkpoint (`app.UsageError` if none).

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
        raise app.UsageError(
            f"--pretrained={path} is not a MoCo checkpoint that Keras can "
            f"read ({type(error).__name__}: {error}). Pass a `.keras` file "
            "written by moco_keras.recipes.pretrain, or its workdir."
        ) from error
    common.check(
        isinstance(model, MoCo),
        f"--pretrained={path} holds a {type(model).__name__}, not a MoCo "
        "model; pass a checkpoint of moco_keras.recipes.pretrain.",
    )
    return model.encoder_q, None


def check_flags(values):
    milestones = common.check_common(values)
    common.check(
        not (values["cache_features"] and values["train_augment"]),
        "--cache_features extracts each training image's features once, "
        "from its evaluation view; it cannot train on random crops. Add "
        "--notrain_augment (or drop --cache_features).",
    )
    return milestones


def linear_head(feature_dim, num_classes, name="fc"):
    import keras

    return keras.layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.RandomNormal(0.0, 0.01),
        bias_initializer="zeros",
        name=name,
    )


def compile_classifier(model, values, milestones, steps_per_epoch, classes):
    import keras

    model.compile(
        optimizer=common.optimizer(values, milestones, steps_per_epoch),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="acc1"),
            keras.metrics.SparseTopKCategoricalAccuracy(
                k=min(5, classes), name="acc5"
            ),
        ],
        jit_compile=values["jit_compile"],
    )


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


def main(argv):
    del argv
    values = common.recipe_values([__name__], PRESETS)
    milestones = check_flags(values)
    checkpoint = resolve_pretrained(values["pretrained"])

    from moco_keras import distribute

    paths, strategy = common.set_up(values)
    common.check_devices(values, distribute.device_count(strategy))
    # Everything that makes variables (backbone, head, optimizer) belongs to
    # the strategy, and fit may run in its scope too.
    with distribute.scope(strategy):
        train_and_evaluate(values, milestones, checkpoint, paths)


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


def train_and_evaluate(values, milestones, checkpoint, paths):
    """Trains the linear head on the frozen backbone; writes results.json."""
    import keras

    from moco_keras import data
    from moco_keras import training

    backbone, normalization = load_backbone(checkpoint)
    backbone.trainable = False  # inference mode: BN moving statistics
    size = values["image_size"]
    # A converted checkpoint expects the statistics its source trained with.
    mean, std = normalization or common.dataset_stats(values["dataset"])
    train = common.load_source(
        values["dataset"],
        values["data_dir"],
        "train",
        limit=values["train_limit"],
        val_split=values["val_split"],
        seed=values["seed"],
    )
    val = common.load_source(
        values["dataset"],
        values["data_dir"],
        "val",
        limit=values["val_limit"],
        val_split=values["val_split"],
        seed=values["seed"],
    )
    classes = len(train.class_names)
    batch_size = values["batch_size"]
    steps_per_epoch = train.num_examples // batch_size
    common.check(
        steps_per_epoch >= 1,
        f"{train.num_examples} training images make no full batch of "
        f"{batch_size}; lower --batch_size.",
    )
    augmentation = None
    if values["train_augment"]:
        augmentation = data.linear_augmentation(size, mean, std)

    def labelled(source, **kwargs):
        return data.labelled_dataset(
            source,
            batch_size,
            size,
            mean,
            std,
            crop_fraction=values["crop_fraction"],
            seed=values["seed"],
            **kwargs,
        )

    feature_dim = backbone.output_shape[-1]
    head = linear_head(feature_dim, classes)
    if values["cache_features"]:
        print("Extracting the frozen features once ...")
        train_x, train_y = _features(backbone, labelled(train))
        val_x, val_y = _features(backbone, labelled(val))
        inputs = keras.Input((feature_dim,))
        model = keras.Model(inputs, head(inputs), name="linear_head")
        # In the order of `train`: the image path's order for each epoch.
        cached = data.Source(train_x, train_y, train.class_names, False)

        def epoch_dataset(epoch, skip):
            keys = cached.order(values["seed"], epoch).skip(skip * batch_size)
            return keys.map(cached.read).batch(batch_size, drop_remainder=True)

        val_data = data.Source(val_x, val_y, val.class_names, False)
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
    compile_classifier(model, values, milestones, steps_per_epoch, classes)
    callbacks = common.callbacks(
        paths,
        steps_per_epoch,
        values,
        "Linear classification",
        extra=[training.ScoreLog()],
    )
    print(
        f"Linear classification on {checkpoint}: {train.num_examples} "
        f"training images, {classes} classes, {values['epochs']} epochs, "
        f"validation on {val.num_examples} images after each"
    )
    started = time.time()
    common.fit(
        model,
        epoch_dataset,
        values,
        steps_per_epoch,
        paths,
        callbacks,
        validation_data=val_data,
    )
    check_backbone_unchanged(backbone, checkpoint)
    if not paths["chief"]:
        print("Done (this worker writes nothing; the chief has the results).")
        return
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
        "cache_features": values["cache_features"],
        "normalization": {"mean": list(mean), "std": list(std)},
        "seconds_this_session": round(time.time() - started, 1),
        "backend": keras.backend.backend(),
    }
    common.write_json_atomically(paths["results"], results)
    print(
        f"Validation top-1 {results['top1']:.2f} %, top-5 "
        f"{results['top5']:.2f} % after epoch {epochs[-1]['epoch']} "
        f"({val.num_examples} images); best top-1 {best['top1']:.2f} % "
        f"(top-5 {best['top5']:.2f} %) at epoch {best['epoch']}. The "
        "backbone is unchanged (checked against the checkpoint on disk)."
    )


if __name__ == "__main__":
    common.run(main, PRESETS, DEFAULT_PRESET)
