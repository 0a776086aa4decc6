r"""Milliseconds per augmentation op, one thread, in a `tf.function`.

    python bench/pipeline_ops.py

Where a MoCo v2 pair's time goes in `bench/pipeline.py`: each op on one
~500 x 375 JPEG cut from scikit-image's `coffee` photo, or on a batch of 32
views of 224 px (the colour half runs batched, after `.batch()`).
"""

import io
import time

import numpy as np
import skimage.data
import tensorflow as tf
from PIL import Image

from moco_keras import augment
from moco_keras import color


def main():
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    buffer = io.BytesIO()
    photo = Image.fromarray(skimage.data.coffee()).resize((500, 375))
    photo.save(buffer, "JPEG", quality=90)
    jpeg = tf.constant(buffer.getvalue())
    rng = np.random.default_rng(0)
    views = tf.constant(rng.random((32, 224, 224, 3)), tf.float32)
    crop = tf.constant(rng.random((300, 280, 3)) * 255, tf.float32)
    seed = tf.constant([1, 2])
    config = augment.get_augmentation("mocov2")
    layer = color.ColorAugmentation.from_augmentation(config, seed=0)
    parameters = {
        k: tf.constant(v) for k, v in layer.sample_parameters(32).items()
    }
    factors, order = parameters["factors"], parameters["order"]
    ops = {
        "full JPEG decode": lambda: tf.io.decode_jpeg(jpeg, channels=3),
        "colour jitter, 32 views": lambda: color.color_jitter(
            views, factors, order, color.TF_OPS
        ),
        "hue rotation, 32 views": lambda: color.adjust_hue(
            views, factors[:, 3], color.TF_OPS
        ),
        "Gaussian blur, 32 views": lambda: color.gaussian_blur(
            views, parameters["sigma"], color.TF_OPS
        ),
        "colour half, 32 views": lambda: color.augment(
            views, parameters, config, color.TF_OPS
        ),
        "resize, antialiased": lambda: tf.image.resize(
            crop, [224, 224], antialias=True
        ),
        "resize, plain": lambda: tf.image.resize(crop, [224, 224]),
        "two views from one file": lambda: augment.two_crops(
            jpeg, seed, config, encoded=True
        ),
    }
    for name, op in ops.items():
        function = tf.function(op)
        function()
        start, repeats = time.perf_counter(), 50
        for _ in range(repeats):
            function()
        ms = 1000 * (time.perf_counter() - start) / repeats
        print(f"{name:26s} {ms:6.2f} ms")


if __name__ == "__main__":
    main()
