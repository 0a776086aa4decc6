r"""What the feature health measures cost a training step, side by side.

    KERAS_BACKEND=jax python bench/health_cost.py --output=BENCHMARKS.md

The quick start's step (a width-16 CIFAR ResNet-18 with 8 split-BN groups,
MoCo v2 head, K 4096, batch 256 of 32 px images in memory) as `MoCo(health=
True)` and `MoCo(health=False)` build it, compiled as `model.fit` compiles
it; rounds of `--steps` steps alternate between the two in one process, and
the table gives each one's median ms per step and the cost of the measures
as a share of the step. The measures' work does not grow with the encoder,
so on ResNet-50 at 224 px their share is smaller still.
"""

import argparse
import statistics
import time

import keras
import numpy as np
import tables

from moco_keras import MoCo
from moco_keras import encoders


def build(health, batch_size):
    encoder = encoders.cifar_resnet18(
        width=16, bn_splits=8, input_shape=(32, 32, 3)
    )
    model = MoCo.from_preset(
        "mocov2",
        encoder,
        queue_size=4096,
        momentum=0.99,
        temperature=0.1,
        seed=0,
        health=health,
    )
    model.compile(optimizer=keras.optimizers.SGD(0.03, momentum=0.9))
    return model


def seconds_per_step(model, images, batch_size):
    start = time.perf_counter()
    model.fit(images, images, batch_size=batch_size, verbose=0, shuffle=False)
    return (time.perf_counter() - start) / (len(images) // batch_size)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", default="")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = rng.random((args.batch_size * args.steps, 32, 32, 3))
    images = images.astype("float32")
    models = {"with the measures": build(True, args.batch_size)}
    models["without"] = build(False, args.batch_size)
    for model in models.values():  # compile and warm up
        seconds_per_step(model, images[: 2 * args.batch_size], args.batch_size)
    times = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            times[name].append(seconds_per_step(model, images, args.batch_size))
    base = statistics.median(times["without"])
    lines = [
        f"MoCo v2 step, width-16 CIFAR ResNet-18, batch {args.batch_size}, "
        f"K 4096, {keras.backend.backend()}; {args.rounds} alternating "
        f"rounds of {args.steps} steps",
        "",
        "| step | ms/step min | median | max | cost vs without |",
        "|---|---|---|---|---|",
    ]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(
            f"| {name} | {1000 * min(values):.1f} | {1000 * median:.1f} | "
            f"{1000 * max(values):.1f} | {100 * (median / base - 1):+.1f} % |"
        )
    text = "\n".join(lines)
    print(text)
    tables.write(args.output, "health_cost", text)


if __name__ == "__main__":
    main()
