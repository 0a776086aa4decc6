r"""What the feature health measures cost a training step, side by side.

    KERAS_BACKEND=jax python bench/health_cost.py --output=BENCHMARKS.md

(and under `tensorflow` and `torch`: each backend its own table).

The quick start's step (a width-16 CIFAR ResNet-18 with 8 split-BN groups,
MoCo v2 head, K 4096, batch 256 of 32 px images in memory) as `MoCo(health=
True)` and `MoCo(health=False)` build it, compiled as `model.fit` compiles
it, and a second `health=False` model as the noise floor (an A/A pair:
whatever separates the two copies is the machine, not the code); rounds of
`--steps` steps rotate through the three in one process. The cost is
paired: each round divides a model's time by the first copy's time in the
same round, so that the machine's drift over minutes cancels, and the
table gives the median of those ratios and their quartiles. Then the
measures alone: `health.health_measures` on the step's shapes (N 256, C 128,
K 4096), compiled where the backend compiles (jax.jit), timed over 50
calls, as a share of the median step. The measures' work does not grow
with the encoder, so on ResNet-50 at 224 px their share is smaller still.
"""

import argparse
import statistics
import time

import keras
import numpy as np
import tables

from moco_keras import MoCo
from moco_keras import encoders
from moco_keras import health as health_lib


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


def measures_alone(batch_size, calls=50):
    """Seconds per call of `health_measures` on the step's shapes."""
    rng = np.random.default_rng(0)
    q = rng.normal(size=(batch_size, 128)).astype("float32")
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    queue = rng.normal(size=(128, 4096)).astype("float32")
    args = (q, q, np.sum(q * q, axis=1, keepdims=True), q @ queue)
    function = health_lib.health_measures
    if keras.backend.backend() == "jax":
        import jax

        function = jax.jit(function)

    def call():
        values = function(*args)
        return [keras.ops.convert_to_numpy(v) for v in values.values()]

    call()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls


def quartiles(values):
    if len(values) < 2:
        return values * 3
    return statistics.quantiles(values, n=4, method="inclusive")


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
    models = {
        "without": build(False, args.batch_size),
        "without, a second copy (noise floor)": build(False, args.batch_size),
        "with the measures": build(True, args.batch_size),
    }
    for model in models.values():  # compile and warm up
        seconds_per_step(model, images[: 2 * args.batch_size], args.batch_size)
    times = {name: [] for name in models}
    names = list(models)
    for round_ in range(args.rounds):
        # Each model takes each place in the round in turn.
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = seconds_per_step(models[name], images, args.batch_size)
            times[name].append(seconds)
    base = statistics.median(times["without"])
    lines = [
        f"MoCo v2 step, width-16 CIFAR ResNet-18, batch {args.batch_size}, "
        f"K 4096, {keras.backend.backend()}; {args.rounds} "
        f"rounds of {args.steps} steps, the order rotating",
        "",
        "| step | median ms/step | cost vs without, same round: median "
        "| quartiles |",
        "|---|---|---|---|",
    ]
    for name, values in times.items():
        costs = [
            100 * (seconds / without - 1)
            for seconds, without in zip(values, times["without"], strict=True)
        ]
        low, _, high = quartiles(costs)
        lines.append(
            f"| {name} | {1000 * statistics.median(values):.1f} | "
            f"{statistics.median(costs):+.1f} % | "
            f"{low:+.1f} % to {high:+.1f} % |"
        )
    alone = measures_alone(args.batch_size)
    lines += [
        "",
        f"The measures alone: {1000 * alone:.2f} ms a call, "
        f"{100 * alone / base:.2f} % of the median step without them.",
    ]
    text = "\n".join(lines)
    print(text)
    tables.write(args.output, f"health_cost_{keras.backend.backend()}", text)


if __name__ == "__main__":
    main()
