"""MoCo v3 under MirroredStrategy over 4 CPU devices against one device
with the whole batch (tests/test_mocov3.py): prints one JSON line."""

import json

import keras
import numpy as np
import tensorflow as tf
from keras import ops
from support import conv_bn_encoder

from moco_keras import distribute
from moco_keras import optimizers
from moco_keras.batch_norm import SplitBatchNormalization
from moco_keras.mocov3 import MoCoV3


def main():
    strategy = distribute.make_strategy("mirrored", cpu_devices=4)

    def build(sync_bn):
        keras.utils.set_random_seed(0)
        # What is under test is the step across replicas (SyncBN, the
        # gathered keys, the labels' offsets), not the ResNet, whose graph
        # made the test 360 s long (a CIFAR ResNet-18 of width 4; 128 s
        # with this encoder, both beside another test process).
        encoder = conv_bn_encoder(size=16, synchronized=sync_bn)
        model = MoCoV3(encoder, dim=8, mlp_dim=16, momentum=0.9)
        model.compile(
            optimizer=optimizers.LARS(
                1.0, weight_decay=1e-3, trust_coefficient=0.01
            )
        )
        return model

    def diff(a, b):
        return float(
            np.max(np.abs(ops.convert_to_numpy(a) - ops.convert_to_numpy(b)))
        )

    rng = np.random.default_rng(0)
    views = rng.normal(size=(2, 32, 16, 16, 3)).astype("float32")
    pairs = tf.data.Dataset.from_tensor_slices((views[0], views[1])).batch(16)
    single = build(sync_bn=False)
    initial = [ops.convert_to_numpy(w).copy() for w in single.weights]
    single_logs = single.fit(pairs, verbose=0).history
    with strategy.scope():
        mirrored = build(sync_bn=True)
    mirrored_logs = mirrored.fit(pairs, verbose=0).history
    refused = ""
    with strategy.scope():
        try:
            build(sync_bn=False)
        except ValueError as error:
            refused = str(error)
    # SyncBN alone, three steps of 16 images over the 4 replicas: the test
    # holds its moving statistics to one torch BatchNorm2d over the 16.
    bn_batches = (rng.normal(size=(48, 6, 6, 3)) * 2 + 1).astype("float32")
    with strategy.scope():
        inputs = keras.Input((6, 6, 3))
        bn = SplitBatchNormalization(synchronized=True)
        bn_model = keras.Model(inputs, bn(inputs))
        bn_model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    bn_model.fit(
        bn_batches,
        np.zeros_like(bn_batches),
        batch_size=16,
        shuffle=False,
        verbose=0,
    )
    print(
        json.dumps(
            {
                "replicas": strategy.num_replicas_in_sync,
                "loss": [single_logs["loss"], mirrored_logs["loss"]],
                "acc1": [single_logs["acc1"], mirrored_logs["acc1"]],
                # Each variable's gap, and its change in the two steps.
                "weights": {
                    w.path: [diff(w, v), diff(w, w0)]
                    for w, v, w0 in zip(
                        single.weights, mirrored.weights, initial, strict=True
                    )
                },
                "refused": refused,
                "sync_bn": {
                    "batches": bn_batches.tolist(),
                    "moving_mean": ops.convert_to_numpy(
                        bn.moving_mean
                    ).tolist(),
                    "moving_variance": ops.convert_to_numpy(
                        bn.moving_variance
                    ).tolist(),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
