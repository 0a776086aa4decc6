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
from moco_keras.recipes import pretrain  # noqa: F401 - defines its flags

FLAGS = flags.FLAGS
# The shared recipe flags (common, pretrain) with the quick start's values;
# --lr is for a batch of 512 and scales with --batch_size.
DEFAULTS = {
    "workdir": "runs/quickstart",
    "dataset": "fashion_mnist",
    "epochs": 4,
    "batch_size": 256,
    "lr": 0.06,
    "lr_batch_size": 512,
    "wd": 5e-4,
    "train_limit": 20000,
    "moco_k": 4096,
    "moco_m": 0.99,
    "moco_t": 0.1,
    "bn_splits": 8,
    "width": 16,
}
flags.DEFINE_integer("knn_k", 200, "k of the kNN monitor.")
flags.DEFINE_float("knn_t", 0.1, "Temperature of the kNN monitor.")
flags.DEFINE_integer(
    "monitor_bank", 5000, "Bank size of the per-epoch kNN monitor (0: off)."
)
flags.DEFINE_integer("monitor_test", 1000, "Test images of the kNN monitor.")


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

    from moco_keras import MoCo
    from moco_keras import augment
    from moco_keras import data
    from moco_keras import encoders
    from moco_keras import knn
    from moco_keras import optimizers

    os.makedirs(FLAGS.workdir, exist_ok=True)
    values = {
        name: FLAGS[name].value
        for name in sorted(
            {"data_dir", "seed", *DEFAULTS}
            | {f.name for f in FLAGS.get_flags_for_module(__name__)}
        )
    }
    common.write_json_atomically(
        os.path.join(FLAGS.workdir, "flags.json"), values
    )
    keras.utils.set_random_seed(FLAGS.seed)
    started = time.time()

    train_images, train_labels = data.load_fashion_mnist(
        "train", FLAGS.data_dir
    )
    test_images, test_labels = data.load_fashion_mnist("test", FLAGS.data_dir)
    bank = data.fashion_mnist_eval_images(train_images)
    test = data.fashion_mnist_eval_images(test_images)
    source = data.image_array_source(
        train_images, train_labels, data.FASHION_MNIST_CLASSES, pad=2
    ).subset(FLAGS.train_limit, FLAGS.seed)
    augmentation = augment.get_augmentation(
        "cifar",
        scale=(0.2, 1.0),
        mean=data.FASHION_MNIST_MEAN,
        std=data.FASHION_MNIST_STD,
    )
    pairs = data.two_view_dataset(
        source, augmentation, FLAGS.batch_size, seed=FLAGS.seed
    )
    steps_per_epoch = source.num_examples // FLAGS.batch_size

    encoder = encoders.cifar_resnet18(
        width=FLAGS.width, bn_splits=FLAGS.bn_splits, input_shape=(32, 32, 3)
    )
    model = MoCo.from_preset(
        "mocov2",
        encoder,
        queue_size=FLAGS.moco_k,
        momentum=FLAGS.moco_m,
        temperature=FLAGS.moco_t,
        seed=FLAGS.seed,
    )
    lr = common.learning_rate(values)
    schedule = optimizers.EpochSchedule(
        lr, steps_per_epoch, FLAGS.epochs, cosine=True
    )
    model.compile(
        optimizer=optimizers.SGD(schedule, momentum=0.9, weight_decay=FLAGS.wd)
    )

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
                    FLAGS.knn_k,
                    FLAGS.knn_t,
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
        FLAGS.knn_k,
        FLAGS.knn_t,
    )
    callbacks = [
        keras.callbacks.CSVLogger(os.path.join(FLAGS.workdir, "epochs.csv"))
    ]
    if FLAGS.monitor_bank:
        bank_ids = data.stratified_indices(
            train_labels, FLAGS.monitor_bank, FLAGS.seed
        )
        test_ids = data.stratified_indices(
            test_labels, FLAGS.monitor_test, FLAGS.seed
        )
        callbacks.insert(
            0,
            knn.KNNMonitor(
                bank[bank_ids],
                train_labels[bank_ids],
                test[test_ids],
                test_labels[test_ids],
                10,
                k=FLAGS.knn_k,
                t=FLAGS.knn_t,
            ),
        )
    print(
        f"Pretraining MoCo v2 on {source.num_examples} Fashion-MNIST images, "
        f"{FLAGS.epochs} epochs of {steps_per_epoch} steps "
        f"(backend: {keras.backend.backend()})"
    )
    history = model.fit(
        pairs,
        epochs=FLAGS.epochs,
        callbacks=callbacks,
        verbose=2,
        shuffle=False,  # tf.data shuffles; Keras would warn it cannot
    )
    trained_knn, trained_head_knn = full_knn()

    monitor = callbacks[0].accuracies if FLAGS.monitor_bank else []
    knn_curves = {
        "backbone, 60k bank": [(0, random_knn), (FLAGS.epochs, trained_knn)],
        "head, 60k bank": [
            (0, random_head_knn),
            (FLAGS.epochs, trained_head_knn),
        ],
        f"backbone, monitor ({FLAGS.monitor_bank} bank)": [
            (epoch, 100 * accuracy) for epoch, accuracy in monitor
        ],
    }
    _plot(
        os.path.join(FLAGS.workdir, "curves.png"), history.history, knn_curves
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
        os.path.join(FLAGS.workdir, "results.json"), results
    )
    with open(os.path.join(FLAGS.workdir, "knn.csv"), "w", newline="") as f:
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
            FLAGS.knn_k,
            FLAGS.knn_t,
            FLAGS.epochs,
            trained_knn,
            trained_head_knn,
            random_knn,
            random_head_knn,
            pixel_knn,
            FLAGS.workdir,
            results["wall_seconds"],
        )
    )


if __name__ == "__main__":
    common.run(main, DEFAULTS)
