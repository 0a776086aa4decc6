r"""Quick start: MoCo v2 on Fashion-MNIST on a CPU, then kNN accuracy.

    python -m moco_keras.recipes.quickstart --workdir=runs/quickstart

Pretrains a width-16 CIFAR-style ResNet-18 with MoCo v2 (split BN with 8
groups, K 4096, m 0.99, T 0.1, cosine lr) on `--train_limit` Fashion-MNIST
training images (drawn at random, each class in proportion), then prints
the kNN top-1 (k 200, t 0.1, weighted voting, all 60k training images as
the bank, the 10k test images) of the trained encoder, of the same encoder
at random initialisation, and of raw pixels. The workdir gets the resolved
flags, a CSV of the epochs and a PNG of the loss and kNN curves.
"""

import csv
import os
import time

from absl import flags
from absl import logging

from moco_keras.recipes import common
from moco_keras.recipes import pretrain

FLAGS = flags.FLAGS
# The run is the quickstart preset (moco_keras.presets), the same as
# `pretrain --preset=quickstart`; --knn_bank / --knn_test size the per-epoch
# monitor, the final kNN uses all 60k training images.
flags.DEFINE_integer("knn_k", 200, "k of the kNN monitor.")
flags.DEFINE_float("knn_t", 0.1, "Temperature of the kNN monitor.")


def _plot(path, history, knn_curves):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = range(1, len(history["loss"]) + 1)
    ax_loss.plot(epochs, history["loss"], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="InfoNCE loss", title="MoCo v2 loss")
    for label, points in knn_curves.items():
        if points:
            ax_knn.plot(*zip(*points, strict=True), marker="o", label=label)
    ax_knn.set(xlabel="epoch", ylabel="kNN top-1 (%)", title="kNN accuracy")
    ax_knn.legend()
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def main(argv):
    del argv
    import keras

    from moco_keras import data
    from moco_keras import knn

    values = common.recipe_values(
        [pretrain.__name__, __name__], pretrain.PRESETS
    )
    milestones = pretrain.check_flags(values)
    common.check(
        values["dataset"] == "fashion_mnist",
        "The quick start evaluates on Fashion-MNIST's 60k / 10k images; "
        f"--dataset={values['dataset']} is for recipes/pretrain.",
    )
    os.makedirs(values["workdir"], exist_ok=True)
    common.write_json_atomically(
        os.path.join(values["workdir"], "flags.json"), values
    )
    keras.utils.set_random_seed(values["seed"])
    started = time.time()

    train_images, train_labels = data.load_fashion_mnist(
        "train", values["data_dir"]
    )
    test_images, test_labels = data.load_fashion_mnist(
        "test", values["data_dir"]
    )
    bank = data.fashion_mnist_eval_images(train_images)
    test = data.fashion_mnist_eval_images(test_images)
    # The same source, augmentation, model and optimizer as
    # `pretrain --preset=quickstart`.
    source = common.load_source(
        values["dataset"],
        values["data_dir"],
        "train",
        limit=values["train_limit"],
        seed=values["seed"],
    )
    pairs = data.two_view_dataset(
        source,
        pretrain.augmentation_config(values),
        values["batch_size"],
        seed=values["seed"],
    )
    steps_per_epoch = source.num_examples // values["batch_size"]
    model = pretrain.build(values, milestones, steps_per_epoch)

    def full_knn():
        """kNN top-1 (%) of the backbone features and of the MoCo head."""
        accuracies = []
        bank_features = model.encoder_q.predict(bank, batch_size=512, verbose=0)
        test_features = model.encoder_q.predict(test, batch_size=512, verbose=0)
        for head in (None, model.head_q):
            if head is None:
                bank_x, test_x = bank_features, test_features
            else:
                bank_x = head.predict(bank_features, batch_size=4096, verbose=0)
                test_x = head.predict(test_features, batch_size=4096, verbose=0)
            accuracies.append(
                100
                * knn.knn_accuracy(
                    knn.flatten_normalize(bank_x),
                    train_labels,
                    knn.flatten_normalize(test_x),
                    test_labels,
                    10,
                    values["knn_k"],
                    values["knn_t"],
                )
            )
        return accuracies

    logging.info("kNN of the random encoder and of raw pixels ...")
    random_knn, random_head_knn = full_knn()
    pixel_knn = 100 * knn.knn_accuracy(
        knn.flatten_normalize(train_images),
        train_labels,
        knn.flatten_normalize(test_images),
        test_labels,
        10,
        values["knn_k"],
        values["knn_t"],
    )
    callbacks = [
        keras.callbacks.CSVLogger(os.path.join(values["workdir"], "epochs.csv"))
    ]
    if values["knn_every"]:
        bank_ids = data.stratified_indices(
            train_labels, values["knn_bank"], values["seed"]
        )
        test_ids = data.stratified_indices(
            test_labels, values["knn_test"], values["seed"]
        )
        callbacks.insert(
            0,
            knn.KNNMonitor(
                bank[bank_ids],
                train_labels[bank_ids],
                test[test_ids],
                test_labels[test_ids],
                10,
                k=values["knn_k"],
                t=values["knn_t"],
                every=values["knn_every"],
            ),
        )
    print(
        f"Pretraining MoCo v2 on {source.num_examples} Fashion-MNIST images, "
        f"{values['epochs']} epochs of {steps_per_epoch} steps "
        f"(backend: {keras.backend.backend()})"
    )
    history = model.fit(
        pairs,
        epochs=values["epochs"],
        callbacks=callbacks,
        verbose=2,
        shuffle=False,  # tf.data shuffles; Keras would warn it cannot
    )
    trained_knn, trained_head_knn = full_knn()

    monitor = callbacks[0].accuracies if values["knn_every"] else []
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
        history.history,
        knn_curves,
    )
    results = {
        "knn_top1_trained": round(trained_knn, 2),
        "knn_top1_random": round(random_knn, 2),
        "knn_top1_raw_pixels": round(pixel_knn, 2),
        "knn_top1_head_trained": round(trained_head_knn, 2),
        "knn_top1_head_random": round(random_head_knn, 2),
        "final_loss": round(float(history.history["loss"][-1]), 4),
        "wall_seconds": round(time.time() - started, 1),
        "backend": keras.backend.backend(),
    }
    common.write_json_atomically(
        os.path.join(values["workdir"], "results.json"), results
    )
    with open(os.path.join(values["workdir"], "knn.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("features", "epoch", "knn_top1"))
        for label, points in knn_curves.items():
            writer.writerows((label, epoch, value) for epoch, value in points)
    print(
        "\nkNN top-1 on the Fashion-MNIST test set (k=%d, t=%g, 60k bank):\n"
        "                                 backbone   MoCo head\n"
        "  MoCo v2 encoder, %d epochs     %6.2f %%   %6.2f %%\n"
        "  same encoder, random init      %6.2f %%   %6.2f %%\n"
        "  raw pixels                     %6.2f %%\n"
        "Outputs in %s (%.0f s)"
        % (
            values["knn_k"],
            values["knn_t"],
            values["epochs"],
            trained_knn,
            trained_head_knn,
            random_knn,
            random_head_knn,
            pixel_knn,
            values["workdir"],
            results["wall_seconds"],
        )
    )


if __name__ == "__main__":
    common.run(main, pretrain.PRESETS, "quickstart")
