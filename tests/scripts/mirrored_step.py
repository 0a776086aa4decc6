"""MirroredStrategy over 4 CPU devices against split BN on one device
(tests/test_distribute.py): prints one JSON line of differences."""

import json

import keras
import numpy as np
import tensorflow as tf
from keras import ops
from support import conv_bn_encoder

from moco_keras import MoCo
from moco_keras import distribute
from moco_keras import moco
from moco_keras import optimizers


def main():
    strategy = distribute.make_strategy("mirrored", cpu_devices=4)

    def build(bn_splits):
        keras.utils.set_random_seed(0)
        encoder = conv_bn_encoder(bn_splits, size=16)
        model = MoCo(encoder, dim=8, queue_size=64, mlp=True, seed=1)
        model.compile(
            optimizer=optimizers.SGD(0.03, momentum=0.9, weight_decay=1e-4)
        )
        return model

    def diff(a, b):
        return float(
            np.max(np.abs(ops.convert_to_numpy(a) - ops.convert_to_numpy(b)))
        )

    rng = np.random.default_rng(0)
    views = rng.normal(size=(2, 3 * 16, 16, 16, 3)).astype("float32")
    single = build(bn_splits=4)
    with strategy.scope():
        mirrored = build(bn_splits=1)
    results = []
    # One step, then two more: the same global batches for both models.
    for first, last in ((0, 16), (16, 48)):
        pairs = tf.data.Dataset.from_tensor_slices(
            (views[0, first:last], views[1, first:last])
        ).batch(16)
        single_loss = single.fit(pairs, verbose=0).history["loss"][0]
        mirrored_loss = mirrored.fit(pairs, verbose=0).history["loss"][0]
        replicas = mirrored.queue.value.values
        results.append(
            {
                "replicas": strategy.num_replicas_in_sync,
                "loss": [single_loss, mirrored_loss],
                "queue": diff(single.queue, mirrored.queue),
                "ptr": [
                    int(single.queue_ptr.numpy()),
                    int(mirrored.queue_ptr.numpy()),
                ],
                "weights": {
                    w.path: diff(w, v)
                    for w, v in zip(
                        single.weights, mirrored.weights, strict=True
                    )
                },
                "replica_queues": max(diff(q, replicas[0]) for q in replicas),
                "replica_ptrs": sorted(
                    {int(p.numpy()) for p in mirrored.queue_ptr.value.values}
                ),
            }
        )

    # Colour ops in the model: every image of the global batch draws its
    # own, as on one device, though every replica holds the same seed state.
    from moco_keras import color

    def colour_layer():
        return color.ColorAugmentation(
            jitter_p=1.0, grayscale_p=0.0, blur_p=0.0, seed=5
        )

    with strategy.scope():
        colour = colour_layer()
    image = rng.integers(0, 256, (8, 8, 3)).astype("uint8")
    same = np.broadcast_to(image, (16, 8, 8, 3)).copy()  # 4 per replica

    def per_replica(function, array):
        batches = strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensor_slices(array).batch(16)
        )
        out = strategy.run(tf.function(function), args=(next(iter(batches)),))
        return [
            np.concatenate(
                [t.numpy() for t in strategy.experimental_local_results(part)]
            )
            for part in (out if isinstance(out, tuple) else (out,))
        ]

    (views,) = per_replica(lambda x: colour(x, training=True), same)
    alone = ops.convert_to_numpy(colour_layer()(same, training=True))
    # The key shuffle: one permutation for all replicas. Keys = the images'
    # row numbers; each replica gets back its own rows and the global
    # batch's, in order, only if every replica drew the same permutation.
    with strategy.scope():
        generator = keras.random.SeedGenerator(7)
    rows = np.broadcast_to(
        np.arange(16, dtype="float32")[:, None, None, None], (16, 2, 2, 3)
    ).copy()

    def keys(x):
        context = tf.distribute.get_replica_context()
        return moco.shuffled_keys(
            x, lambda v: tf.reshape(v, (-1, 12))[:, :1], generator, context
        )

    local_keys, global_keys = per_replica(keys, rows)
    results.append(
        {
            "distinct_views": len({v.round(4).tobytes() for v in views}),
            "views_vs_one_device": float(np.max(np.abs(views - alone))),
            "local_keys": local_keys[:, 0].tolist(),
            "global_keys": global_keys[:, 0].tolist(),
        }
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
