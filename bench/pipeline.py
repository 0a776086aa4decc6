r"""Input pipeline throughput: MoCo v2 two-crop views from JPEG files.

    python bench/pipeline.py [--files=256] [--seconds=20] [--rounds=3]

Builds a folder of ImageNet-sized JPEGs (about 500 x 375, quality 90) from
the real photos that ship with scikit-image, then measures pairs per second
of (a) a baseline that does what the official loader does: PIL decode, then
the torchvision v2 transforms written with PIL and numpy, one image at a
time in Python; (b) this package's pipeline, its CPU half
(`datasets.image_folder` + `views.two_view_batches`: PIL decode, crop,
resize, flip, uint8 out, batched by grain) in this process (one core) and
in one grain worker process per core; (c) the colour
half, `color.ColorAugmentation`, which runs in the model on an accelerator,
here on the CPU under each Keras backend (a process each). Rounds
alternate all of them on the same files, in one job.
"""

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time

import numpy as np
import tables
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageFilter

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def make_jpegs(directory, count, seed=0, photos=None):
    """`count` JPEGs of 500 x 375 or 375 x 500 cut from `photos`.

    `photos` defaults to the real photos of scikit-image (uint8 HWC arrays).
    """
    if photos is None:
        import skimage.data

        photos = [
            getattr(skimage.data, name)()
            for name in (
                "astronaut",
                "coffee",
                "chelsea",
                "rocket",
                "hubble_deep_field",
                "immunohistochemistry",
                "retina",
            )
        ]
    rng = random.Random(seed)
    os.makedirs(os.path.join(directory, "n00000000"), exist_ok=True)
    for index in range(count):
        photo = Image.fromarray(rng.choice(photos))
        w, h = photo.size
        scale = rng.uniform(0.6, 1.0)
        cw, ch = int(w * scale), int(h * scale)
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = photo.crop((left, top, left + cw, top + ch))
        size = (500, 375) if rng.random() < 0.7 else (375, 500)
        crop.resize(size, Image.BILINEAR).save(
            os.path.join(directory, "n00000000", f"{index:05d}.JPEG"),
            quality=90,
        )
    return directory


# --- The baseline: torchvision's v2 transforms on PIL images, in Python ----


def rrc_params(width, height, rng, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    return 0, 0, height, width


def adjust_hue(image, factor):
    h, s, v = image.convert("HSV").split()
    shifted = (np.array(h, np.uint8).astype(np.int16) + int(factor * 255)) % 256
    h = Image.fromarray(shifted.astype(np.uint8), "L")
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def color_jitter(image, rng, b=0.4, c=0.4, s=0.4, h=0.1):
    ops = [
        lambda x: ImageEnhance.Brightness(x).enhance(rng.uniform(1 - b, 1 + b)),
        lambda x: ImageEnhance.Contrast(x).enhance(rng.uniform(1 - c, 1 + c)),
        lambda x: ImageEnhance.Color(x).enhance(rng.uniform(1 - s, 1 + s)),
        lambda x: adjust_hue(x, rng.uniform(-h, h)),
    ]
    rng.shuffle(ops)
    for op in ops:
        image = op(image)
    return image


def baseline_view(image, rng):
    top, left, h, w = rrc_params(*image.size, rng)
    view = image.resize(
        (224, 224), Image.BILINEAR, box=(left, top, left + w, top + h)
    )
    if rng.random() < 0.8:
        view = color_jitter(view, rng)
    if rng.random() < 0.2:
        view = view.convert("L").convert("RGB")
    if rng.random() < 0.5:
        view = view.filter(
            ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0))
        )
    if rng.random() < 0.5:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(view, np.float32) / 255.0
    return (array - MEAN) / STD


def run_baseline(paths, seconds, seed=0):
    rng = random.Random(seed)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        with Image.open(paths[count % len(paths)]) as image:
            image = image.convert("RGB")
            baseline_view(image, rng), baseline_view(image, rng)
        count += 1
    return count / (time.perf_counter() - start)


# --- Ours ------------------------------------------------------------------


def run_grain(root, seconds, workers, batch_size=32):
    """Pairs/s of the pipeline's CPU half (`views.two_view_batches`: PIL
    decode, crop, resize, flip; uint8 out), in this process (one core) or
    in `workers` grain worker processes."""
    from moco_keras import datasets
    from moco_keras import views

    folder = datasets.image_folder(root)
    # One long epoch of the files repeated: grain starts its workers once
    # an epoch, which a real epoch of thousands of batches amortizes.
    repeats = 200
    source = datasets.Source(
        np.tile(folder.paths_or_arrays, repeats),
        np.tile(folder.labels, repeats),
        folder.class_names,
        encoded=True,
    )
    config = views.get_augmentation("mocov2")
    iterator = iter(
        views.two_view_batches(source, config, batch_size, workers=workers)
    )
    next(iterator)  # the workers' start and the first fills are not throughput
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        q, _ = next(iterator)
        count += len(q)
    return count / (time.perf_counter() - start)


def run_color_layer(seconds, batch_size=32):
    """Pairs/s of `color.ColorAugmentation` alone on 224 px uint8 crops.

    The colour half of the split pipeline, here on the CPU (all cores, the
    backend's own threads); on a GPU it runs inside the training step.
    """
    import keras

    from moco_keras import color
    from moco_keras import views

    layer = color.ColorAugmentation.from_augmentation(
        views.get_augmentation("mocov2"), seed=0
    )
    crops = np.random.default_rng(0).integers(
        0, 256, (batch_size, 224, 224, 3), dtype=np.uint8
    )

    class Training(keras.layers.Layer):
        # `predict` would call the layer with training=False: force True.
        def call(self, x):
            return layer(x, training=True)

    inputs = keras.Input((224, 224, 3), batch_size=batch_size, dtype="uint8")
    # Compiled as a training step would compile it (tf.function / jit).
    model = keras.Model(inputs, Training()(inputs))
    first = model.predict_on_batch(crops)
    normalized = layer(crops, training=False)
    if np.allclose(first, keras.ops.convert_to_numpy(normalized), atol=1e-3):
        raise RuntimeError("The colour layer did not augment.")
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.predict_on_batch(crops)
        count += batch_size // 2  # two views make a pair
    return count / (time.perf_counter() - start)


def colour_layer_rate(backend, seconds):
    """`run_color_layer` under Keras backend `backend`, in a process of its
    own (a process runs one backend)."""
    result = subprocess.run(
        [sys.executable, __file__, "--colour_layer", f"--seconds={seconds}"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "KERAS_BACKEND": backend},
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--backends",
        default="tensorflow,jax,torch",
        help="Keras backends whose colour layer is timed",
    )
    parser.add_argument(
        "--colour_layer",
        action="store_true",
        help="only time the colour layer (this process's backend); print it",
    )
    parser.add_argument("--output", help="also write the table here (md)")
    args = parser.parse_args()
    if args.colour_layer:
        print(json.dumps(run_color_layer(args.seconds)))
        return
    cores = len(os.sched_getaffinity(0))
    backends = [b for b in args.backends.split(",") if b]
    with tempfile.TemporaryDirectory() as tmp:
        root = make_jpegs(tmp, args.files)
        paths = sorted(
            os.path.join(root, "n00000000", f)
            for f in os.listdir(os.path.join(root, "n00000000"))
        )
        runs = {
            "baseline (1 core)": lambda: run_baseline(paths, args.seconds),
            "CPU half (in process, 1 core)": lambda: run_grain(
                root, args.seconds, 0
            ),
            f"CPU half ({cores} grain workers)": lambda: run_grain(
                root, args.seconds, cores
            ),
        }
        for backend in backends:
            runs[f"colour layer on the CPU, {backend}"] = (
                lambda backend=backend: colour_layer_rate(backend, args.seconds)
            )
        results = {name: [] for name in runs}
        # Rounds alternate every path, so that a slower minute of the
        # machine falls on all of them.
        for _ in range(args.rounds):
            for name, run in runs.items():
                results[name].append(run())
    lines = [
        f"MoCo v2 two-crop pairs/s, 224 px, {args.files} JPEGs ~500x375, "
        f"{args.rounds} rounds of {args.seconds:.0f} s, {cores} cores",
        "",
        "| pipeline | pairs/s min | median | max | vs baseline median |",
        "|---|---|---|---|---|",
    ]
    base = np.median(results["baseline (1 core)"])
    for name, values in results.items():
        values = np.array(values)
        lines.append(
            f"| {name} | {values.min():.1f} | {np.median(values):.1f} "
            f"| {values.max():.1f} | {np.median(values) / base:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    tables.write(args.output, "pipeline", text)


if __name__ == "__main__":
    main()
