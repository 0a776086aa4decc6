r"""Quick start: MoCo v2 on Fashion-MNIST on a CPU, then kNN accuracy.

    python -m moco_keras.recipes.quickstart --workdir=runs/quickstart

Runs `pretrain --preset=quickstart` (`moco_keras.runs.pretrain`: a width-16
ResNet-18 on 28 px views, MoCo v2 with split BN of 8 groups, K 4096, m 0.99,
T 0.2, crops of half the image or more, cosine lr, 5 epochs of the 60k
Fashion-MNIST training images; checkpoints, and resume when run again; the
values were chosen by `bench/quickstart_search.py`), then prints
the kNN top-1 (k 200, t 0.1, weighted voting, all 60k training images as
the bank, the 10k test images) of the trained encoder, of the same encoder
at random initialisation, and of raw pixels (`moco_keras.runs.knn_evaluation`),
and the top-1 of a linear probe of the trained and of the random backbone
(`runs.linear_probe`: main_lincls.py's classifier and optimizer on cached
features, `LINEAR_EPOCHS` epochs).
The workdir is a pretraining run's, its `curves.png` the loss and kNN
curves, and `results.json` and `knn.csv` add the kNN numbers.
"""

import csv
import os
import time

from moco_keras.recipes import common
from moco_keras.recipes import pretrain

# The linear probe's epochs on the 60k cached features: about 5 s each on 2
# CPU cores; main_lincls.py's 100 are for ImageNet's augmented crops.
LINEAR_EPOCHS = 10


def _plot(path, history, knn_curves, references, subtitle):
    """The loss and kNN curves, with `references` ({label: top-1}) as
    horizontal lines on the kNN panel (raw pixels, the random encoder)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(12, 4))
    epochs = [int(epoch) + 1 for epoch in history["epoch"]]
    ax_loss.plot(epochs, history["loss"], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="InfoNCE loss", title="MoCo v2 loss")
    for label, points in knn_curves.items():
        if points:
            ax_knn.plot(*zip(*points, strict=True), marker="o", label=label)
    for (label, top1), style in zip(
        references.items(), ("--", ":", "-."), strict=False
    ):
        ax_knn.axhline(
            top1, color="gray", linestyle=style, label=f"{label} {top1:.1f} %"
        )
    ax_knn.set(xlabel="epoch", ylabel="kNN top-1 (%)", title="kNN accuracy")
    # Beside the panel: inside, it would hide the lines it names.
    ax_knn.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1, 1))
    for ax in (ax_loss, ax_knn):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs
    fig.suptitle(subtitle, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def main(argv):
    del argv
    import keras
    import numpy as np

    from moco_keras import datasets
    from moco_keras import knn
    from moco_keras import runs
    from moco_keras import training

    values = common.recipe_values([pretrain.__name__], pretrain.PRESETS)
    milestones = runs.check_pretraining(values)
    runs.check(
        values["dataset"] == "fashion_mnist",
        "The quick start evaluates on Fashion-MNIST's 60k / 10k images; "
        f"--dataset={values['dataset']} is for recipes/pretrain.",
    )
    started = time.time()

    def progress(message):
        # Flushed: under `make demo` stdout is a pipe, block-buffered.
        print(f"[{time.time() - started:5.0f} s] {message}", flush=True)

    progress(
        f"Quick start: MoCo v2 on Fashion-MNIST, {values['epochs']} epochs "
        f"on the {keras.backend.backend()} backend"
    )
    # The run's own initial weights: `runs.pretrain` seeds and builds alike.
    keras.utils.set_random_seed(values["seed"])
    initial = runs.build_moco(values, milestones, 1)
    train_images, train_labels = datasets.load_fashion_mnist(
        "train", values["data_dir"]
    )
    test_images, test_labels = datasets.load_fashion_mnist(
        "test", values["data_dir"]
    )
    sizes = f"bank {len(train_images)}, test {len(test_images)} images"
    progress(f"kNN of raw pixels ({sizes})")
    pixel_knn = 100 * knn.knn_accuracy(
        knn.flatten_normalize(train_images),
        train_labels,
        knn.flatten_normalize(test_images),
        test_labels,
        10,
        values["knn_k"],
        values["knn_t"],
    )
    progress(f"raw pixels: kNN top-1 {pixel_knn:.2f} %; pretraining")
    # The pretraining recipe's run: checkpoints, resume, CSV, TensorBoard.
    run = runs.pretrain(values)
    trained = keras.saving.load_model(run["checkpoint"])
    progress(
        f"kNN of the trained and of the random encoder, backbone and head, "
        f"and linear probes of the backbones ({sizes})"
    )
    # One read of the 60k / 10k evaluation views for all four, one pass
    # through each backbone: the heads take its features.
    scores = runs.knn_evaluation(
        values,
        {
            "trained": trained.encoder_q,
            "trained head": ("trained", trained.head_q),
            "random": initial.encoder_q,
            "random head": ("random", initial.head_q),
        },
        linear_probe_of=("trained", "random"),
        linear_epochs=LINEAR_EPOCHS,
    )
    trained_knn, trained_head_knn = scores["trained"], scores["trained head"]
    random_knn, random_head_knn = scores["random"], scores["random head"]
    trained_linear, random_linear = (
        scores["trained linear"],
        scores["random linear"],
    )

    history = training.read_csv_log(
        os.path.join(values["workdir"], "epochs.csv")
    )
    monitor = [
        (int(epoch) + 1, top1)
        for epoch, top1 in zip(
            history["epoch"], history.get("knn_top1", []), strict=False
        )
        if np.isfinite(top1)
    ]
    knn_curves = {
        "backbone, 60k bank": [
            (0, random_knn),
            (values["epochs"], trained_knn),
        ],
        "head, 60k bank": [
            (0, random_head_knn),
            (values["epochs"], trained_head_knn),
        ],
        f"backbone, monitor ({values['knn_bank']} bank)": [
            (epoch, 100 * accuracy) for epoch, accuracy in monitor
        ],
    }
    _plot(
        os.path.join(values["workdir"], "curves.png"),
        history,
        knn_curves,
        {"raw pixels": pixel_knn, "random encoder": random_knn},
        f"Quick start on the {keras.backend.backend()} backend: "
        f"{(time.time() - started) / 60:.1f} min to this plot",
    )
    results = {
        **run,
        "knn_top1_trained": round(trained_knn, 2),
        "knn_top1_random": round(random_knn, 2),
        "knn_top1_raw_pixels": round(pixel_knn, 2),
        "knn_top1_head_trained": round(trained_head_knn, 2),
        "knn_top1_head_random": round(random_head_knn, 2),
        "linear_top1_trained": round(trained_linear, 2),
        "linear_top1_random": round(random_linear, 2),
        "wall_seconds": round(time.time() - started, 1),
    }
    runs.write_json_atomically(
        os.path.join(values["workdir"], "results.json"), results
    )
    with open(os.path.join(values["workdir"], "knn.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("features", "epoch", "knn_top1"))
        for label, points in knn_curves.items():
            writer.writerows((label, epoch, value) for epoch, value in points)

    def row(label, *scores):
        return f"  {label:<30}" + "".join(f"{s:>10.2f} %" for s in scores)

    print(
        "\n".join(
            [
                "",
                "Top-1 on the Fashion-MNIST test set: kNN (k=%d, t=%g, the 60k "
                "training images as the bank) of the backbone and of the MoCo "
                "head;" % (values["knn_k"], values["knn_t"]),
                "linear: a linear probe of the frozen backbone (main_lincls."
                "py's classifier and lr, %d epochs on cached features)."
                % LINEAR_EPOCHS,
                f"  {'':<30}{'kNN':>12}{'kNN head':>12}{'linear':>12}",
                row(
                    f"MoCo v2 encoder, {values['epochs']} epochs",
                    trained_knn,
                    trained_head_knn,
                    trained_linear,
                ),
                row(
                    "same encoder, random init",
                    random_knn,
                    random_head_knn,
                    random_linear,
                ),
                row("raw pixels", pixel_knn),
                f"Outputs in {values['workdir']}; total time "
                f"{results['wall_seconds']:.0f} s",
            ]
        )
    )


if __name__ == "__main__":
    common.run(main, pretrain.PRESETS, "quickstart")
