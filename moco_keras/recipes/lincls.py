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

The flags are put into the `--preset`'s config (moco_keras.presets) by the
one table `common.FLAGS_TO_CONFIG`, and run by
`moco_keras.linear_classification.linear_classification`. Without
`--preset`, the protocol is that of the method `--pretrained` was trained
with (`linear_classification.linear_preset`): MoCo v3's `main_lincls.py`
for a v3 run or converted v3 checkpoint, `imagenet` otherwise; `--help`
shows `imagenet`'s values.
"""

from absl import flags

from moco_keras import linear_classification
from moco_keras import presets
from moco_keras.recipes import common

FLAGS = flags.FLAGS

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
    "val_split",
    None,
    "The tfds split used for validation.",
)
flags.DEFINE_integer(
    "val_limit",
    None,
    "Validate on N validation images drawn at random, each class in "
    "proportion (0: all, as the papers report).",
)

PRESETS = presets.LINEAR_CLASSIFICATION
DEFAULT_PRESET = "imagenet"


def main(argv):
    del argv
    preset = FLAGS.preset
    if not FLAGS["preset"].present:
        # The protocol of the method the checkpoint was trained with.
        preset, why = linear_classification.linear_preset(FLAGS.pretrained)
        if why:
            print(f"Linear protocol: --preset={preset}, from {why}.")
    linear_classification.linear_classification(
        common.recipe_config(PRESETS, preset)
    )


if __name__ == "__main__":
    common.run(main, PRESETS, DEFAULT_PRESET)
