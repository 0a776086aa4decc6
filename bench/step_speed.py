r"""Quick MoCo training-step speed of the quick start's network, per backend.

    KERAS_BACKEND=torch python bench/step_speed.py [--jit]

A width-16 CIFAR ResNet-18 (split BN, 8 groups), MoCo v2 head, K 4096, batch
256 of 32 px images already in memory (no input pipeline): images per second
of `model.fit` over 6 steps after a 2-step warm-up, and of the encoder's
`predict` on 10,000 images (what the kNN evaluation does). The side-by-side
benchmark against the official PyTorch step is `bench/train_step.py`.
"""

import argparse
import time

import keras
import numpy as np

from moco_keras import MoCo
from moco_keras import encoders


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--jit", action="store_true", help="XLA jit_compile")
    parser.add_argument("--batch_size", type=int, default=256)
    args = parser.parse_args()
    encoder = encoders.cifar_resnet18(
        width=16, bn_splits=8, input_shape=(32, 32, 3)
    )
    model = MoCo.from_preset(
        "mocov2", encoder, queue_size=4096, momentum=0.99, temperature=0.1
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.03, momentum=0.9),
        jit_compile=args.jit,
    )
    x = np.random.default_rng(0).random((args.batch_size * 6, 32, 32, 3))
    x = x.astype("float32")
    warm = x[: 2 * args.batch_size]
    model.fit(warm, warm, batch_size=args.batch_size, verbose=0)
    start = time.perf_counter()
    model.fit(x, x, batch_size=args.batch_size, verbose=0)
    seconds = time.perf_counter() - start
    images = np.concatenate([x] * 7)[:10000]
    start = time.perf_counter()
    encoder.predict(images, batch_size=512, verbose=0)
    embed_seconds = time.perf_counter() - start
    print(
        f"{keras.backend.backend()} jit={args.jit}: "
        f"train {len(x) / seconds:.1f} images/s, "
        f"embed (predict) {len(images) / embed_seconds:.0f} images/s"
    )


if __name__ == "__main__":
    main()
