r"""Learning benchmark "fmnist-moco-v2": kNN during training, per backend.

    python bench/learning.py [--configs=torch-plain,tensorflow,jax,torch]

MoCo v2 pretraining on Fashion-MNIST under the protocol that BENCHMARKS.md
writes out ("fmnist-moco-v2"), run by this package under each Keras backend
and by the official algorithm in plain PyTorch (`bench/torch_moco.py`), each
in a fresh process pinned to the same cores. Every configuration reads the
same crops from this package's pipeline (`views.two_view_batches`, a
function of the seed, the epoch and the image), whose colour half the
package's colour layer draws (in the model for this package; before the
step for plain PyTorch), so what differs is the training step; the kNN
evaluation is the same numpy code for all.

Reports, per configuration: kNN top-1 (k 200, t 0.1, weighted voting; the
10k test images against all 60k training images) of the pooled backbone
features and of the MoCo head's output after epochs 0, 2, 4, 6 and 8;
training images per second (evaluation excluded); wall time; peak resident
memory. Also the kNN of raw pixels. Writes `learning.json`, `learning.md`
and `learning.png` (the curves) into `--output`.

The defaults are the protocol; `--train_images`, `--epochs`, `--bank` and
`--test` shrink it for a smoke run (the tests do), and the table then says
so.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import tables

from moco_keras import presets
from moco_keras.recipes import common

CONFIGS = ("torch-plain", "tensorflow", "jax", "torch")
# The protocol "fmnist-moco-v2" (BENCHMARKS.md): the `fmnist_moco_v2`
# preset for 8 epochs, on the first 20k training images (the subset the
# recorded tables used), kNN against all 60k / 10k.
QUICKSTART = presets.get(presets.PRETRAINING, "fmnist_moco_v2")
# Its values by the recipes' flag names (the official scripts'), which the
# plain PyTorch configuration reads too.
_FLAGS = common.flag_values(QUICKSTART)
PROTOCOL = {
    "train_images": _FLAGS["train_limit"],
    "epochs": 8,
    "eval_every": 2,
    **{
        key: _FLAGS[key]
        for key in (
            "batch_size",
            "width",
            "bn_splits",
            "moco_k",
            "moco_m",
            "moco_t",
            "lr",  # for a batch of lr_batch_size, scaled linearly
            "lr_batch_size",
            "momentum",
            "wd",
            "knn_k",
            "knn_t",
        )
    },
    "dim": _FLAGS["moco_dim"],
    "bank": 60000,
    "test": 10000,
    "seed": 0,
}


# --- Shared by every configuration: data and kNN ---------------------------


def load(protocol):
    """The training pairs (`epoch -> uint8 crops`, grain) and the kNN bank
    and test sets."""
    from moco_keras import datasets
    from moco_keras import views

    train_images, train_labels = datasets.load_fashion_mnist("train")
    test_images, test_labels = datasets.load_fashion_mnist("test")
    limit = protocol["train_images"]
    source = datasets.image_array_source(
        train_images[:limit],
        train_labels[:limit],
        datasets.FASHION_MNIST_CLASSES,
        pad=2,
    )
    augmentation = views.get_augmentation(
        "cifar",
        scale=(QUICKSTART["augmentation"]["crop_min"], 1.0),
        mean=datasets.FASHION_MNIST_MEAN,
        std=datasets.FASHION_MNIST_STD,
    )

    def pairs(epoch):
        return views.two_view_batches(
            source,
            augmentation,
            protocol["batch_size"],
            seed=protocol["seed"],
            epoch=epoch,
        )

    bank = slice(0, protocol["bank"])
    test = slice(0, protocol["test"])
    return {
        "pairs": pairs,
        "augmentation": augmentation,
        "steps_per_epoch": source.num_examples // protocol["batch_size"],
        "bank": datasets.fashion_mnist_eval_images(train_images[bank]),
        "bank_labels": train_labels[bank],
        "test": datasets.fashion_mnist_eval_images(test_images[test]),
        "test_labels": test_labels[test],
    }


def normalize_rows(x):
    x = np.asarray(x, np.float32).reshape(len(x), -1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_top1(bank, bank_labels, test, test_labels, k=200, t=0.1, classes=10):
    """Weighted kNN top-1 (%) as the official CIFAR demo's `knn_predict`."""
    bank, test = normalize_rows(bank), normalize_rows(test)
    k = min(k, len(bank))
    correct = 0
    for start in range(0, len(test), 1000):
        similarity = test[start : start + 1000] @ bank.T  # n x M
        index = np.argpartition(-similarity, k - 1, axis=1)[:, :k]  # n x k
        weight = np.exp(np.take_along_axis(similarity, index, 1) / t)  # n x k
        votes = np.zeros((len(index), classes))  # n x classes
        np.add.at(
            votes,
            (np.arange(len(index))[:, None], bank_labels[index]),
            weight,
        )
        correct += int(
            np.sum(votes.argmax(1) == test_labels[start : start + 1000])
        )
    return 100.0 * correct / len(test)


def evaluate(embed, sets, protocol):
    """kNN top-1 of the backbone features and of the head's output."""
    bank_backbone, bank_head = embed(sets["bank"])
    test_backbone, test_head = embed(sets["test"])
    args = (protocol["knn_k"], protocol["knn_t"])
    return {
        "knn_backbone": knn_top1(
            bank_backbone,
            sets["bank_labels"],
            test_backbone,
            sets["test_labels"],
            *args,
        ),
        "knn_head": knn_top1(
            bank_head,
            sets["bank_labels"],
            test_head,
            sets["test_labels"],
            *args,
        ),
    }


def eval_epochs(protocol):
    every, epochs = protocol["eval_every"], protocol["epochs"]
    return sorted({0, epochs, *range(every, epochs + 1, every)})


# --- The configurations ---------------------------------------------------


def run_keras(protocol, sets, log):
    import keras

    from moco_keras import pretraining

    keras.utils.set_random_seed(protocol["seed"])
    steps = sets["steps_per_epoch"]
    # The quick start's model and optimizer, as `pretraining.pretrain`
    # builds them.
    config = common.with_flags(
        QUICKSTART,
        **{
            key: protocol[key]
            for key in PROTOCOL
            if key in _FLAGS and key != "train_limit"
        },
        moco_dim=protocol["dim"],
    )
    model = pretraining.build_moco(config, [], steps)

    def embed(images):
        features = model.encoder_q.predict(images, batch_size=512, verbose=0)
        head = model.head_q.predict(features, batch_size=4096, verbose=0)
        return features, head

    wanted = eval_epochs(protocol)

    class Bench(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self.started
            scores = None
            if epoch + 1 in wanted:
                scores = evaluate(embed, sets, protocol)
            log(epoch + 1, (seconds, float(logs["loss"])), scores)

    log(0, None, evaluate(embed, sets, protocol))
    for epoch in range(protocol["epochs"]):
        # Each epoch's order and crops are its own (`two_view_batches`).
        model.fit(
            sets["pairs"](epoch),
            initial_epoch=epoch,
            epochs=epoch + 1,
            callbacks=[Bench()],
            verbose=0,
        )


def run_torch_plain(protocol, sets, log, threads):
    import keras
    import torch
    import torch_moco
    from torch import nn

    from moco_keras import color

    torch.set_num_threads(threads)
    torch.manual_seed(protocol["seed"])

    def encoder():
        return torch_moco.ResNet(
            "cifar_resnet18",
            protocol["width"],
            protocol["bn_splits"],
            dim=protocol["dim"],
        )

    model = torch_moco.MoCo(
        encoder,
        dim=protocol["dim"],
        K=protocol["moco_k"],
        m=protocol["moco_m"],
        T=protocol["moco_t"],
    )
    lr = protocol["lr"] * protocol["batch_size"] / protocol["lr_batch_size"]
    optimizer = torch.optim.SGD(
        model.encoder_q.parameters(),
        lr,
        momentum=protocol["momentum"],
        weight_decay=protocol["wd"],
    )
    criterion = nn.CrossEntropyLoss()
    # The package's colour half, before the step: the official loader
    # colours its views on the CPU.
    colour = color.ColorAugmentation.from_augmentation(
        sets["augmentation"], seed=protocol["seed"]
    )

    def coloured(crops):
        views = colour(crops, training=True)
        return keras.ops.convert_to_numpy(views)

    def nchw(x):
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

    @torch.no_grad()
    def embed(images):
        model.encoder_q.eval()
        features, heads = [], []
        for start in range(0, len(images), 512):
            feature = model.encoder_q.features(
                nchw(images[start : start + 512])
            )
            features.append(feature.numpy())
            heads.append(model.encoder_q.fc(feature).numpy())
        model.encoder_q.train()
        return np.concatenate(features), np.concatenate(heads)

    wanted = eval_epochs(protocol)
    model.train()
    log(0, None, evaluate(embed, sets, protocol))
    for epoch in range(protocol["epochs"]):
        for group in optimizer.param_groups:
            group["lr"] = torch_moco.cosine_lr(lr, epoch, protocol["epochs"])
        started = time.perf_counter()
        total, count = 0.0, 0
        for crops_q, crops_k in sets["pairs"](epoch):
            view_q, view_k = coloured(crops_q), coloured(crops_k)
            logits, labels = model(nchw(view_q), nchw(view_k))
            loss = criterion(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, count = total + loss.item(), count + 1
        seconds = time.perf_counter() - started
        scores = (
            evaluate(embed, sets, protocol) if epoch + 1 in wanted else None
        )
        log(epoch + 1, (seconds, total / count), scores)


def worker(config, protocol, threads):
    """One configuration in this process; prints a JSON line at the end."""
    started = time.perf_counter()
    record = {"config": config, "epochs": []}

    def log(epoch, trained, scores):
        entry = {"epoch": epoch}
        if trained is not None:
            entry["train_seconds"], entry["loss"] = trained
        if scores is not None:
            entry.update(scores)
        record["epochs"].append(entry)
        print(json.dumps(entry), file=sys.stderr, flush=True)

    sets = load(protocol)
    if config == "torch-plain":
        run_torch_plain(protocol, sets, log, threads)
    else:
        run_keras(protocol, sets, log)
    train_seconds = sum(e.get("train_seconds", 0.0) for e in record["epochs"])
    images = protocol["epochs"] * sets["steps_per_epoch"]
    images *= protocol["batch_size"]
    record.update(
        train_seconds=train_seconds,
        images_per_s=images / train_seconds,
        wall_seconds=time.perf_counter() - started,
        peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    print(json.dumps(record))


# --- The driver -----------------------------------------------------------


def raw_pixels(protocol):
    from moco_keras import datasets

    train_images, train_labels = datasets.load_fashion_mnist("train")
    test_images, test_labels = datasets.load_fashion_mnist("test")
    return knn_top1(
        train_images[: protocol["bank"]],
        train_labels[: protocol["bank"]],
        test_images[: protocol["test"]],
        test_labels[: protocol["test"]],
        protocol["knn_k"],
        protocol["knn_t"],
    )


def steady_images_per_s(protocol, record):
    """Median images/s of the epochs after the first (which also compiles).

    A median, so that one epoch slowed by another job on a shared machine
    does not move it.
    """
    per_epoch = protocol["train_images"] // protocol["batch_size"]
    per_epoch *= protocol["batch_size"]
    seconds = [e["train_seconds"] for e in record["epochs"][2:]]
    return per_epoch / float(np.median(seconds)) if seconds else None


def report(protocol, records, pixels):
    changed = {
        key: value
        for key, value in protocol.items()
        if value != PROTOCOL.get(key, value)
    }
    lines = [
        "fmnist-moco-v2"
        + (f" (shrunk: {changed})" if changed else " (the full protocol)"),
        "",
        "| config | epoch | kNN backbone | kNN head | loss |",
        "|---|---|---|---|---|",
    ]
    for record in records:
        for entry in record["epochs"]:
            if "knn_backbone" not in entry:
                continue
            loss = entry.get("loss")
            lines.append(
                f"| {record['config']} | {entry['epoch']} "
                f"| {entry['knn_backbone']:.2f} | {entry['knn_head']:.2f} "
                f"| {'-' if loss is None else f'{loss:.4f}'} |"
            )
    lines += [
        f"| raw pixels | - | {pixels:.2f} | - | - |",
        "",
        "| config | img/s, all epochs | img/s, median epoch 2+ "
        "| train s | wall s "
        "| peak MiB | best kNN backbone | best kNN head |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for record in records:
        scored = [e for e in record["epochs"] if "knn_backbone" in e]
        steady = steady_images_per_s(protocol, record)
        steady = "-" if steady is None else f"{steady:.1f}"
        lines.append(
            f"| {record['config']} | {record['images_per_s']:.1f} "
            f"| {steady} | {record['train_seconds']:.0f} "
            f"| {record['wall_seconds']:.0f} "
            f"| {record['peak_mib']:.0f} "
            f"| {max(e['knn_backbone'] for e in scored):.2f} "
            f"| {max(e['knn_head'] for e in scored):.2f} |"
        )
    return "\n".join(lines)


def plot(path, records, pixels):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in (
        (axes[0], "knn_backbone", "pooled backbone features"),
        (axes[1], "knn_head", "MoCo head output"),
    ):
        for record in records:
            points = [
                (e["epoch"], e[key]) for e in record["epochs"] if key in e
            ]
            ax.plot(
                *zip(*points, strict=True), marker="o", label=record["config"]
            )
        ax.axhline(pixels, color="gray", linestyle="--", label="raw pixels")
        ax.set(xlabel="epoch", title=f"kNN top-1 (%), {title}")
        ax.legend()
    fig.suptitle(
        "fmnist-moco-v2: MoCo v2 on Fashion-MNIST, kNN on the test set"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--output", default="bench/results")
    parser.add_argument(
        "--markdown",
        help="write the tables into this file's section (BENCHMARKS.md) "
        "instead of --output's learning.md",
    )
    parser.add_argument("--threads", type=int, default=0)
    for key in ("train_images", "epochs", "eval_every", "bank", "test"):
        parser.add_argument(f"--{key}", type=int, default=PROTOCOL[key])
    parser.add_argument(
        "--report_only",
        action="store_true",
        help="rebuild the table and plot from the learning-<config>.json "
        "files in --output (runs measured apart, e.g. one backend later)",
    )
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    protocol = {
        **PROTOCOL,
        **{k: getattr(args, k) for k in PROTOCOL if hasattr(args, k)},
    }
    cores = sorted(os.sched_getaffinity(0))
    threads = args.threads or len(cores)
    if args.config:
        return worker(args.config, protocol, threads)
    configs = args.configs.split(",")
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown config(s) {sorted(unknown)}; known: {CONFIGS}")
    if protocol["batch_size"] > protocol["train_images"]:
        parser.error(
            f"--train_images={protocol['train_images']} is less than one "
            f"batch ({protocol['batch_size']}); use at least one batch."
        )
    os.makedirs(args.output, exist_ok=True)
    records = []
    if args.report_only:
        for config in configs:
            path = os.path.join(args.output, f"learning-{config}.json")
            if not os.path.exists(path):
                parser.error(f"--report_only: no {path}; run {config} first.")
            with open(path) as f:
                saved = json.load(f)
            if saved["protocol"] != protocol:
                parser.error(
                    f"{path} was measured under {saved['protocol']}, not "
                    f"{protocol}; pass the same size flags."
                )
            records.append(saved["record"])
    for config in [] if args.report_only else configs:
        command = [
            "taskset",
            "-c",
            ",".join(map(str, cores[:threads])),
            sys.executable,
            os.path.abspath(__file__),
            f"--config={config}",
            f"--threads={threads}",
        ] + [
            f"--{key}={protocol[key]}"
            for key in ("train_images", "epochs", "eval_every", "bank", "test")
        ]
        env = {
            **os.environ,
            "KERAS_BACKEND": "torch" if config == "torch-plain" else config,
            "PYTHONPATH": os.path.dirname(
                os.path.dirname(os.path.abspath(__file__))
            ),
        }
        print(f"=== {config}", flush=True)
        out = subprocess.run(
            command, env=env, stdout=subprocess.PIPE, text=True, check=False
        )
        if out.returncode != 0:
            raise RuntimeError(f"{config} failed (exit {out.returncode})")
        records.append(json.loads(out.stdout.strip().splitlines()[-1]))
        # Each configuration's record as soon as it is done: a long run that
        # dies later keeps what it measured.
        with open(
            os.path.join(args.output, f"learning-{config}.json"), "w"
        ) as f:
            json.dump({"protocol": protocol, "record": records[-1]}, f)
    pixels = raw_pixels(protocol)
    text = report(protocol, records, pixels)
    print(text)
    tables.write(
        args.markdown or os.path.join(args.output, "learning.md"),
        "learning",
        text + "\n\n![kNN top-1 during pretraining, per configuration]"
        "(bench/results/learning.png)",
    )
    with open(os.path.join(args.output, "learning.json"), "w") as f:
        json.dump(
            {"protocol": protocol, "raw_pixels": pixels, "records": records},
            f,
            indent=1,
        )
    plot(os.path.join(args.output, "learning.png"), records, pixels)


if __name__ == "__main__":
    main()
