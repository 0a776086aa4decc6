r"""MoCo v1 / v2 / v3 pretraining, with the official scripts' flags.

    python -m moco_keras.recipes.pretrain --flagfile=recipes/mocov1.flags \
        --data_dir=/data/ILSVRC2012 --workdir=runs/mocov1

Flags follow `main_moco.py` of facebookresearch/moco (`--arch`, `--epochs`,
`--batch_size`, `--lr`, `--schedule`, `--cos`, `--momentum`, `--wd`,
`--moco_dim`, `--moco_k`, `--moco_m`, `--moco_t`, `--mlp`, `--aug_plus`) and of
facebookresearch/moco-v3 (`--preset=mocov3_r50`, `mocov3_vit_small`,
`mocov3_vit_base`), each official `--a-b` spelt `--a_b` here: `--moco-mlp-dim`
is `--moco_mlp_dim`, `--moco-m-cos` `--moco_m_cos`, `--stop-grad-conv1`
`--stop_grad_conv1`, `--warmup-epochs` `--warmup_epochs`, `--crop-min`
`--crop_min`, `--weight-decay` `--wd`, `--optimizer` as is; v3's `--lr` is
per 256 images (`--lr_batch_size=256`), as `main_moco.py` scales it. Plus the
dataset, split BN and run-keeping flags, put into the `--preset`'s config
(moco_keras.presets) by the one table `common.FLAGS_TO_CONFIG`, and run by
`moco_keras.pretraining.pretrain`. A flag that the preset has no value for
(`--moco_k` with v3, which has no queue) is refused. The workdir gets
`config.json`, `epochs.csv`, `curves.png`, `tensorboard/`,
`checkpoints/ckpt-<step>.keras` and `results.json`. Run the same command again
after the run dies and it resumes from the newest checkpoint, mid-epoch
included.
"""

from absl import flags

from moco_keras import configs
from moco_keras import presets
from moco_keras import pretraining
from moco_keras import sources
from moco_keras.recipes import common

FLAGS = flags.FLAGS

# Defaults None: the values come from the --preset (moco_keras.presets).
flags.DEFINE_enum(
    "arch",
    None,
    list(pretraining.ARCHS),
    "Encoder (vit_small, vit_base: MoCo v3 presets).",
)
flags.DEFINE_integer(
    "width", None, "Base width of the ResNet (64 as torchvision; 16 is small)."
)
flags.DEFINE_integer("moco_dim", None, "Feature dimension.")
flags.DEFINE_integer("moco_k", None, "Queue size K (negative keys).")
flags.DEFINE_float("moco_m", None, "Key encoder momentum m.")
flags.DEFINE_float("moco_t", None, "Softmax temperature T.")
flags.DEFINE_bool("mlp", None, "MoCo v2's MLP head.")
flags.DEFINE_integer(
    "moco_mlp_dim", None, "MoCo v3: hidden size of the projector and predictor."
)
flags.DEFINE_bool(
    "moco_m_cos",
    None,
    "MoCo v3: raise the momentum to 1 along a half cosine over the run.",
)
flags.DEFINE_bool(
    "stop_grad_conv1",
    None,
    "MoCo v3, ViT: keep the random patch projection frozen.",
)
flags.DEFINE_enum(
    "optimizer",
    None,
    ["lars", "adamw"],
    "MoCo v3: LARS (ResNet) or AdamW (ViT); v1/v2 train with SGD.",
)
flags.DEFINE_integer(
    "warmup_epochs",
    None,
    "MoCo v3: epochs of linear lr warm-up before the cosine.",
)
flags.DEFINE_bool("aug_plus", None, "MoCo v2's augmentation (blur etc.).")
flags.DEFINE_bool(
    "blur",
    None,
    "With --aug_plus or v3: the Gaussian blur (off for tiny images).",
)
flags.DEFINE_float(
    "crop_min",
    None,
    "The random crop's smallest area fraction of the image (the papers' "
    "0.2); milder for tiny images.",
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
flags.DEFINE_integer("knn_k", None, "Neighbours of the kNN vote.")
flags.DEFINE_float("knn_t", None, "Temperature of the kNN vote weights.")

PRESETS = presets.PRETRAINING
DEFAULT_PRESET = "mocov1"


# The values `presets.own_images_rules` sets, as the flags that set them.
OWN_IMAGES_FLAGS = {
    ("model", "queue_size"): "moco_k",
    ("model", "momentum"): "moco_m",
    ("augmentation", "blur"): "blur",
    ("augmentation", "crop_min"): "crop_min",
}


def own_images_config(config):
    """`--preset=own_images`: the rules of `presets.own_images_rules` for
    the dataset at hand, printed; a flag given keeps its value."""
    configs.check_common(config)
    sources.check_input(config)
    data = config["data"]
    source = sources.data_source(config, "train", data["train_limit"])
    sections, reasons = presets.own_images_rules(
        source.num_examples, data["image_size"], data["batch_size"]
    )
    for (section, key), flag in OWN_IMAGES_FLAGS.items():
        if FLAGS[flag].present:
            del sections[section][key]
            reasons.append(f"--{flag} as given: {config[section][key]}")
    print("--preset=own_images for this dataset:")
    for reason in reasons:
        print(f"  {reason}")
    return presets.merge(config, **sections)


def main(argv):
    del argv
    config = common.recipe_config(PRESETS)
    if FLAGS.preset == "own_images":
        config = own_images_config(config)
    pretraining.pretrain(config)


if __name__ == "__main__":
    common.run(main, PRESETS, DEFAULT_PRESET)
