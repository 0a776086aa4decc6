r"""Where a pair's time goes in the split path's CPU half, inside tf.data.

    python bench/pipeline_parts.py [--files=128] [--seconds=6]

Each row maps a different function over the same ImageNet-sized JPEGs
(`pipeline.make_jpegs`), held in memory, with tf.data on one thread, and
prints pairs/s: the decode alone, at half DCT scale, the decode and two
crops with a plain or a box-filter resize, and the package's CPU half
(`augment.two_crops(..., color_in_model=True)`) with and without
antialiasing.
"""

import argparse
import os
import tempfile
import time

import tables
import tensorflow as tf
from pipeline import make_jpegs

from moco_keras import augment


def rate(blobs, function, seconds):
    files = tf.data.Dataset.from_tensor_slices(blobs).repeat()
    seeds = tf.data.Dataset.random(seed=1).batch(2)
    pairs = tf.data.Dataset.zip((files, seeds)).map(
        function, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    iterator = iter(pairs.batch(32).prefetch(2).with_options(options))
    next(iterator)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += int(next(iterator)[0].shape[0])
    return count / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--output", help="also write the table here (md)")
    args = parser.parse_args()
    config = augment.get_augmentation("mocov2")
    aliased = {**config, "antialias": False}

    def decoded(contents, ratio=1):
        image = tf.io.decode_jpeg(contents, channels=3, ratio=ratio)
        return image[:8, :8], image[:8, :8]

    def cropped(contents, seed, method):
        image = tf.io.decode_jpeg(contents, channels=3)
        windows = augment.random_resized_crop_window(
            tf.shape(image), seed, config["scale"], config["ratio"], count=2
        )
        views = []
        for window in tf.unstack(windows):
            crop = tf.slice(
                image, [window[0], window[1], 0], [window[2], window[3], 3]
            )
            view = tf.image.resize(crop, [224, 224], method=method)
            views.append(tf.saturate_cast(tf.round(view), tf.uint8))
        return tuple(views)

    functions = {
        "decode only": lambda c, s: decoded(c),
        "decode at half scale (ratio=2)": lambda c, s: decoded(c, 2),
        "decode + two crops, plain bilinear": lambda c, s: cropped(
            c, s, "bilinear"
        ),
        "decode + two crops, box filter (area)": lambda c, s: cropped(
            c, s, "area"
        ),
        "split CPU half, antialiased (default)": lambda c, s: augment.two_crops(
            c, s, config, True, color_in_model=True
        ),
        "split CPU half, --noantialias": lambda c, s: augment.two_crops(
            c, s, aliased, True, color_in_model=True
        ),
    }
    with tempfile.TemporaryDirectory() as root:
        folder = os.path.join(make_jpegs(root, args.files), "n00000000")
        blobs = []
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb") as f:
                blobs.append(f.read())
    lines = ["| what the map does (1 thread) | pairs/s |", "|---|---|"]
    for name, function in functions.items():
        lines.append(f"| {name} | {rate(blobs, function, args.seconds):.1f} |")
        print(lines[-1], flush=True)
    tables.write(args.output, "pipeline_parts", "\n".join(lines))


if __name__ == "__main__":
    main()
