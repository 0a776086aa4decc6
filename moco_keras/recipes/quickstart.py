r"""Quick start: MoCo v2 on Fashion-MNIST on a CPU, then kNN accuracy.

    python -m moco_keras.recipes.quickstart --workdir=runs/quickstart

Runs `pretrain --preset=quickstart` (`moco_keras.pretraining.pretrain`: a
width-16 ResNet-18 on 28 px views, MoCo v2 with split BN of 8 groups, K 4096, m
0.99, T 0.2, crops of half the image or more, cosine lr, 5 epochs of the 60k
Fashion-MNIST training images; checkpoints, and resume when run again; the
values were chosen by `bench/quickstart_search.py`), then prints the kNN top-1
(k 200, t 0.1, weighted voting, all 60k training images as the bank, the 10k
test images) of the trained encoder, of the same encoder at random
initialisation, and of raw pixels, and the top-1 of a linear probe of the
trained and of the random backbone (main_lincls.py's classifier and optimizer
on cached features, `--linear_epochs` epochs):
`moco_keras.evaluation.quickstart`.
The workdir is a pretraining run's, its `curves.png` the loss and kNN
curves, and `results.json` and `knn.csv` add the kNN numbers.
`--preset=quickstart_mocov3` runs MoCo v3 on the same network and crops
(BENCHMARKS.md sets it beside v2).
"""

from absl import flags

from moco_keras import evaluation
from moco_keras.recipes import common
from moco_keras.recipes import pretrain

flags.DEFINE_integer(
    "linear_epochs",
    evaluation.LINEAR_EPOCHS,
    "Epochs of the linear probes on the cached features.",
)


def main(argv):
    del argv
    config = common.recipe_config(pretrain.PRESETS)
    results = evaluation.quickstart(config, flags.FLAGS.linear_epochs)
    print(evaluation.summary(config, results))


if __name__ == "__main__":
    common.run(main, pretrain.PRESETS, "quickstart")
