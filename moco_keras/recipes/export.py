r"""Exports a pretrained encoder as a SavedModel feature extractor.

    KERAS_BACKEND=tensorflow python -m moco_keras.recipes.export \
        --pretrained=runs/mocov2 --output=exported/mocov2

`--pretrained` is what `recipes/lincls` takes: a pretraining workdir, a
`.keras` checkpoint, or a directory of `recipes/convert`. The SavedModel's
`serving_default` takes `images`, a uint8 `N x H x W x 3` batch of any size,
and returns `features` (`N x 2048` for ResNet-50): the evaluation transform
(short side to `--image_size / --crop_fraction`, center crop, normalization
with the statistics the encoder was trained with) runs inside. Load it with
`tf.saved_model.load(DIR)` in any TensorFlow process. For a run of
`recipes/pretrain`, `--dataset`, `--image_size` and `--crop_fraction`
default to the run's own (its `config.json`), so the export preprocesses as
the run did; given on the command line, they win. Runs under the
TensorFlow and JAX backends. `--format=keras_hub` writes a keras-hub preset
of the backbone instead (any backend).
"""

import json
import os

from absl import flags

from moco_keras import linear_classification
from moco_keras import runs
from moco_keras.recipes import common

FLAGS = flags.FLAGS

flags.DEFINE_enum(
    "format",
    "saved_model",
    ["saved_model", "keras_hub"],
    "saved_model: a TensorFlow SavedModel feature extractor (uint8 images "
    "of any size in, features out); keras_hub: a keras-hub ResNetBackbone "
    "preset with its image converter (ResNet-18/34/50 of width 64).",
)


# The pretraining run's values the export preprocesses with, in its
# config's `data` section.
RUN_FLAGS = ("dataset", "image_size", "crop_fraction")


def preprocessing_flags(pretrained, checkpoint):
    """`--dataset`, `--image_size`, `--crop_fraction`: the command line's,
    else those of the pretraining run that wrote `checkpoint`, else the
    defaults."""
    run = {}
    # A workdir, or a checkpoint in its checkpoints/ folder.
    for directory in (pretrained, os.path.dirname(os.path.dirname(checkpoint))):
        path = os.path.join(directory, runs.CONFIG_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                run = json.load(f)["data"]
            break
    return {
        name: FLAGS[name].value
        if FLAGS[name].present
        else run.get(name, FLAGS[name].value)
        for name in RUN_FLAGS
    }


def main(argv):
    del argv
    runs.check(FLAGS.output, "--output=DIRECTORY is required.")
    checkpoint = linear_classification.resolve_pretrained(FLAGS.pretrained)
    backbone, normalization = linear_classification.load_backbone(checkpoint)
    values = preprocessing_flags(FLAGS.pretrained, checkpoint)
    mean, std = normalization or runs.dataset_stats(values["dataset"])
    from moco_keras import export

    size = values["image_size"]
    fixed = backbone.input_shape[1]
    if fixed is not None and not FLAGS["image_size"].present:
        size = fixed  # the encoder's own input size, unless told otherwise
    if FLAGS.format == "keras_hub":
        try:
            export.export_keras_hub_preset(
                backbone, FLAGS.output, size=size, mean=mean, std=std
            )
        except (ImportError, ValueError) as error:
            runs.check(False, str(error))
        print(
            f"Wrote the keras-hub preset of {checkpoint} to {FLAGS.output}: "
            "keras_hub.models.ResNetBackbone.from_preset(DIR) and "
            "keras_hub.layers.ResNetImageConverter.from_preset(DIR) (crop "
            f"{size}, mean {tuple(mean)}, std {tuple(std)})."
        )
        return
    try:
        key = export.export_feature_extractor(
            backbone,
            FLAGS.output,
            size=size,
            mean=mean,
            std=std,
            crop_fraction=values["crop_fraction"],
        )
    except ValueError as error:
        runs.check(False, str(error))
    print(
        f"Exported the encoder of {checkpoint} to {FLAGS.output}: "
        f"signature serving_default, input `images` (uint8, any size), "
        f"output `{key}` ({backbone.output_shape[-1]}-d); crop "
        f"{size} (crop fraction {values['crop_fraction']}), mean "
        f"{tuple(mean)}, std {tuple(std)}."
    )


if __name__ == "__main__":
    from moco_keras import presets

    # Without a pretraining run's config.json: the ImageNet preset's
    # preprocessing.
    common.run(main, presets.PRETRAINING, "mocov1")
