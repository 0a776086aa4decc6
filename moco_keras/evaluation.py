"""Evaluation on frozen features, and the quick start's protocol.

`knn_evaluation`: kNN top-1 of encoders on a config's dataset (weighted
voting, as the official CIFAR demo), optionally with `linear_probe`, a
linear classifier on the same cached features (`main_lincls.py`'s
classifier and optimizer). `quickstart`: pretraining (`pretraining.pretrain`),
then the kNN and linear-probe top-1 of the trained encoder against the
same encoder at its random initialisation and against raw pixels: what
`make demo` (`python -m moco_keras.recipes.quickstart`) runs and prints.

Example:

```python
from moco_keras import configs, evaluation, presets

config = configs.config(
    presets.PRETRAINING["quickstart"],
    run={"workdir": "runs/fmnist"},
    schedule={"epochs": 1},
)
results = evaluation.quickstart(config)
print(evaluation.summary(config, results))
```
"""

import csv
import os
import time

import keras
import numpy as np

from moco_keras import configs
from moco_keras import datasets
from moco_keras import knn
from moco_keras import linear_classification
from moco_keras import methods
from moco_keras import presets
from moco_keras import pretraining
from moco_keras import runs
from moco_keras import sources
from moco_keras import training

# The linear probe's epochs on the 60k cached features: about 5 s each on 2
# CPU cores; main_lincls.py's 100 are for ImageNet's augmented crops.
LINEAR_EPOCHS = 10


def knn_evaluation(
    config,
    encoders,
    bank_limit=0,
    test_limit=0,
    linear_probe_of=(),
    linear_epochs=LINEAR_EPOCHS,
):
    """kNN top-1 (%) of frozen features on the config's dataset, and the
    linear probe's.

    The bank is `bank_limit` training images (0: all), the test set
    `test_limit` validation images (0: all), both class-stratified draws in
    their evaluation views; weighted voting with `knn.k` neighbours and
    temperature `knn.t`, as the official CIFAR demo. The encoders named in
    `linear_probe_of` also get `linear_probe` on the same features (the
    bank as its training set).

    Args:
        config: a pretraining config (its dataset, size, kNN values).
        encoders: `{name: model}`, each mapping evaluation views to
            features (e.g. `moco.encoder_q`), or `{name: (backbone, head)}`:
            the features of the entry named `backbone` (listed before it)
            through `head` (e.g. `moco.head_q`, the MoCo embedding), which
            spares a second pass of the images through the backbone.
        linear_probe_of: names of `encoders` to probe linearly too.
        linear_epochs: int, the linear probe's epochs.

    Returns:
        `{name: top-1 %}`, plus `{f"{name} linear": top-1 %}` for each name
        of `linear_probe_of`.
    """
    bank, bank_labels, source = sources.evaluation_arrays(
        config, "train", bank_limit
    )
    test, test_labels, _ = sources.evaluation_arrays(config, "val", test_limit)
    classes = len(source.class_names)
    scores, raw = {}, {}
    for name, encoder in encoders.items():
        if isinstance(encoder, tuple):
            backbone, head = encoder
            configs.check(
                backbone in raw,
                f"knn_evaluation: {name!r} takes the features of "
                f"{backbone!r}, which is not an encoder listed before it.",
            )
            raw[name] = [
                knn.embed(head, x, normalize=False) for x in raw[backbone]
            ]
        else:
            raw[name] = [
                knn.embed(encoder, x, normalize=False) for x in (bank, test)
            ]
        bank_features, test_features = (
            knn.flatten_normalize(x) for x in raw[name]
        )
        scores[name] = 100 * knn.knn_accuracy(
            bank_features,
            bank_labels,
            test_features,
            test_labels,
            classes,
            config["knn"]["k"],
            config["knn"]["t"],
        )
        if name in linear_probe_of:
            scores[f"{name} linear"] = linear_probe(
                (bank_features, bank_labels),
                (test_features, test_labels),
                classes,
                linear_epochs,
                seed=config["run"]["seed"],
            )
    return scores


def linear_probe(train, test, classes, epochs, seed=0):
    """Linear classification top-1 (%) on cached frozen features.

    `main_lincls.py`'s classifier (`linear_head`) and optimizer (the
    `imagenet` preset of `LINEAR_CLASSIFICATION`: lr 30, momentum 0.9, no
    weight decay, x0.1 at 60 % and 80 % of the epochs, batch 256) for
    `epochs` epochs, on features computed once (BN in inference mode), as
    `linear_classification` with `cache_features` trains its head; without
    the papers' 100 epochs of augmented crops, so a quick figure, not the
    papers' protocol.

    Args:
        train: `(features, labels)` to train on, `N x D` and `N`.
        test: `(features, labels)` to score.
        classes: int, the number of classes.
        epochs: int, >= 1.
        seed: int, the head's initialisation and the batches' order.
    """
    configs.check(epochs >= 1, f"The linear probe needs epochs >= 1: {epochs}")
    probe = configs.config(
        presets.LINEAR_CLASSIFICATION["imagenet"], schedule={"epochs": epochs}
    )
    milestones = sorted(
        {m for m in (int(0.6 * epochs), int(0.8 * epochs)) if m}
    )
    features, labels = train
    steps_per_epoch = -(-len(features) // probe["data"]["batch_size"])
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((features.shape[-1],)),
            linear_classification.linear_head(features.shape[-1], classes),
        ]
    )
    linear_classification.compile_classifier(
        model, probe, milestones, steps_per_epoch, classes
    )
    model.fit(
        features,
        labels,
        batch_size=probe["data"]["batch_size"],
        epochs=epochs,
        shuffle=True,
        verbose=0,
    )
    scores = model.evaluate(*test, batch_size=1024, verbose=0, return_dict=True)
    return 100 * float(scores["acc1"])


def plot_curves(path, history, knn_curves, references, subtitle):
    """The loss and kNN curves, with `references` ({label: top-1}) as
    horizontal lines on the kNN panel (raw pixels, the random encoder)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, also without a display
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


def quickstart(config, linear_epochs=LINEAR_EPOCHS, progress=None):
    """Pretraining on Fashion-MNIST, then kNN and linear-probe top-1.

    `pretraining.pretrain(config)` (checkpoints, resume, logs in its workdir);
    before it the kNN of raw pixels, after it the kNN (k `knn.k`, t
    `knn.t`, the 60k training images as the bank, the 10k test images) of
    the trained encoder's backbone and MoCo head, and of the same encoder at
    its random initialisation (the run's own: seeded and built as
    `pretraining.pretrain` builds it), and a linear probe of both
    backbones. Adds to the workdir `curves.png` with the kNN beside the
    loss, `knn.csv`, and the numbers in `results.json`.

    Args:
        config: a pretraining config on `fashion_mnist`
            (`presets.PRETRAINING["quickstart"]`).
        linear_epochs: int, the linear probes' epochs.
        progress: called with a line as each phase starts (default: print
            it, flushed, with the seconds since the start).

    Returns:
        The run's `results.json` as a dict: `pretraining.pretrain`'s, plus
        `knn_top1_{trained,random,raw_pixels}`,
        `knn_top1_head_{trained,random}`, `linear_top1_{trained,random}`
        and `wall_seconds`.
    """
    milestones = pretraining.check_pretraining(config)
    configs.check(
        config["data"]["dataset"] == "fashion_mnist",
        "The quick start evaluates on Fashion-MNIST's 60k / 10k images; "
        f"--dataset={config['data']['dataset']} is for recipes/pretrain.",
    )
    started = time.time()
    if progress is None:

        def progress(message):
            # Flushed: under `make demo` stdout is a pipe, block-buffered.
            print(f"[{time.time() - started:5.0f} s] {message}", flush=True)

    epochs = config["schedule"]["epochs"]
    progress(
        f"Quick start: {methods.get(config).title} on Fashion-MNIST, "
        f"{epochs} epochs on the "
        f"{keras.backend.backend()} backend"
    )
    # The run's own initial weights: `pretraining.pretrain` seeds and builds
    # alike.
    keras.utils.set_random_seed(config["run"]["seed"])
    initial = pretraining.build_moco(config, milestones, 1)
    train_images, train_labels = datasets.load_fashion_mnist(
        "train", config["data"]["data_dir"]
    )
    test_images, test_labels = datasets.load_fashion_mnist(
        "test", config["data"]["data_dir"]
    )
    sizes = f"bank {len(train_images)}, test {len(test_images)} images"
    progress(f"kNN of raw pixels ({sizes})")
    pixel_knn = 100 * knn.knn_accuracy(
        knn.flatten_normalize(train_images),
        train_labels,
        knn.flatten_normalize(test_images),
        test_labels,
        10,
        config["knn"]["k"],
        config["knn"]["t"],
    )
    progress(f"raw pixels: kNN top-1 {pixel_knn:.2f} %; pretraining")
    # The pretraining recipe's run: checkpoints, resume, CSV, TensorBoard.
    run = pretraining.pretrain(config)
    trained = keras.saving.load_model(run["checkpoint"])
    progress(
        f"kNN of the trained and of the random encoder, backbone and head, "
        f"and linear probes of the backbones ({sizes})"
    )
    # One read of the 60k / 10k evaluation views for all four, one pass
    # through each backbone: the heads take its features.
    method = methods.get(config)
    scores = knn_evaluation(
        config,
        {
            "trained": trained.encoder_q,
            "trained head": ("trained", method.query_head(trained)),
            "random": initial.encoder_q,
            "random head": ("random", method.query_head(initial)),
        },
        linear_probe_of=("trained", "random"),
        linear_epochs=linear_epochs,
    )
    workdir = config["run"]["workdir"]
    history = training.read_csv_log(os.path.join(workdir, "epochs.csv"))
    monitor = [
        (int(epoch) + 1, top1)
        for epoch, top1 in zip(
            history["epoch"], history.get("knn_top1", []), strict=False
        )
        if np.isfinite(top1)
    ]
    knn_curves = {
        "backbone, 60k bank": [
            (0, scores["random"]),
            (config["schedule"]["epochs"], scores["trained"]),
        ],
        "head, 60k bank": [
            (0, scores["random head"]),
            (config["schedule"]["epochs"], scores["trained head"]),
        ],
        f"backbone, monitor ({config['knn']['bank']} bank)": [
            (epoch, 100 * accuracy) for epoch, accuracy in monitor
        ],
    }
    plot_curves(
        os.path.join(workdir, "curves.png"),
        history,
        knn_curves,
        {"raw pixels": pixel_knn, "random encoder": scores["random"]},
        f"Quick start on the {keras.backend.backend()} backend: "
        f"{(time.time() - started) / 60:.1f} min to this plot",
    )
    results = {
        **run,
        "knn_top1_trained": round(scores["trained"], 2),
        "knn_top1_random": round(scores["random"], 2),
        "knn_top1_raw_pixels": round(pixel_knn, 2),
        "knn_top1_head_trained": round(scores["trained head"], 2),
        "knn_top1_head_random": round(scores["random head"], 2),
        "linear_top1_trained": round(scores["trained linear"], 2),
        "linear_top1_random": round(scores["random linear"], 2),
        "linear_epochs": linear_epochs,
        "wall_seconds": round(time.time() - started, 1),
    }
    runs.write_json_atomically(os.path.join(workdir, "results.json"), results)
    with open(os.path.join(workdir, "knn.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("features", "epoch", "knn_top1"))
        for label, points in knn_curves.items():
            writer.writerows((label, epoch, value) for epoch, value in points)
    return results


def summary(config, results):
    """The table of `quickstart`'s `results`, as `make demo` prints it."""

    def row(label, *scores):
        return f"  {label:<30}" + "".join(f"{s:>10.2f} %" for s in scores)

    return "\n".join(
        [
            "",
            "Top-1 on the Fashion-MNIST test set: kNN (k=%d, t=%g, the 60k "
            "training images as the bank) of the backbone and of the MoCo "
            "head;" % (config["knn"]["k"], config["knn"]["t"]),
            "linear: a linear probe of the frozen backbone (main_lincls."
            "py's classifier and lr, %d epochs on cached features)."
            % results["linear_epochs"],
            f"  {'':<30}{'kNN':>12}{'kNN head':>12}{'linear':>12}",
            row(
                f"{methods.get(config).title} encoder, "
                f"{config['schedule']['epochs']} epochs",
                results["knn_top1_trained"],
                results["knn_top1_head_trained"],
                results["linear_top1_trained"],
            ),
            row(
                "same encoder, random init",
                results["knn_top1_random"],
                results["knn_top1_head_random"],
                results["linear_top1_random"],
            ),
            row("raw pixels", results["knn_top1_raw_pixels"]),
            f"Outputs in {config['run']['workdir']}; total time "
            f"{results['wall_seconds']:.0f} s",
        ]
    )
