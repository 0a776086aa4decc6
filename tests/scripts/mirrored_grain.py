"""The pretraining recipe reading grain under MirroredStrategy over 2 CPU
devices, against the same run on one device (tests/test_distribute.py):
prints one JSON line of differences."""

import json
import sys

import keras
import numpy as np
from support import recipe_defaults

from moco_keras import presets
from moco_keras import pretraining


def run(workdir, **flags):
    """Two steps of the smoke run (batch 32 of 64 images), read by grain,
    a checkpoint after each; its results.json."""
    config = recipe_defaults(
        presets.PRETRAINING,
        "quickstart",
        workdir=workdir,
        data_dir=None,
        width=4,
        train_limit=64,
        batch_size=32,
        moco_k=64,
        bn_splits=2,
        epochs=1,
        knn_every=0,
        checkpoint_steps=1,
        keep_checkpoints=10,
        verbose="2",
        **flags,
    )
    return pretraining.pretrain(config)


def main(root):
    # The mirrored run first: it splits the CPU into 2 devices, which the
    # one-device run then leaves alone (it runs on the first).
    mirrored = run(f"{root}/mirrored", strategy="mirrored", cpu_devices=2)
    single = run(f"{root}/single")
    result = {"devices": [mirrored["devices"], single["devices"]]}
    for step in (1, 2):
        name = f"checkpoints/ckpt-{step:09d}.keras"
        a = keras.saving.load_model(f"{root}/mirrored/{name}")
        b = keras.saving.load_model(f"{root}/single/{name}")
        gaps = {
            v.path: float(
                np.max(
                    np.abs(
                        keras.ops.convert_to_numpy(v)
                        - keras.ops.convert_to_numpy(w)
                    )
                )
            )
            for v, w in zip(a.weights, b.weights, strict=True)
        }
        result[f"step{step}"] = gaps
        result[f"ptr{step}"] = [
            int(keras.ops.convert_to_numpy(m.queue_ptr.value)) for m in (a, b)
        ]
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
