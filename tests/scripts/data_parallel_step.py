"""JAX data parallel over 4 CPU devices against split BN on one device
(tests/test_distribute.py): prints one JSON line of differences."""

import json

import jax
import keras
import numpy as np
from keras import ops
from support import conv_bn_encoder

from moco_keras import MoCo
from moco_keras import distribute
from moco_keras import optimizers


def main():
    def build():
        keras.utils.set_random_seed(0)
        encoder = conv_bn_encoder(bn_splits=4, size=16)
        model = MoCo(encoder, dim=8, queue_size=64, mlp=True, seed=1)
        model.compile(
            optimizer=optimizers.SGD(0.03, momentum=0.9, weight_decay=1e-4)
        )
        return model

    def fit(model, views):
        return model.fit(
            views[0], views[1], batch_size=16, shuffle=False, verbose=0
        ).history["loss"]

    rng = np.random.default_rng(0)
    views = rng.normal(size=(2, 48, 16, 16, 3)).astype("float32")
    single = build()
    single_losses = fit(single, views)
    distribute.make_strategy("data_parallel")
    parallel = build()
    parallel_losses = fit(parallel, views)
    queue = parallel.queue.value

    # The BN groups are the device shards: the global batch lies on the 4
    # devices in 4 blocks of rows, and split BN's 4 groups are those blocks.
    # Rows of device d hold values around 10 * d: normalized per shard,
    # each shard has mean 0; with one BN group over the global batch, or
    # groups across the shards, they would not.
    from moco_keras import SplitBatchNormalization
    from moco_keras import color

    distribution = keras.distribution.distribution()
    offsets = np.repeat(10.0 * np.arange(4), 4)[:, None, None, None]
    x = (rng.normal(size=(16, 4, 4, 2)) + offsets).astype("float32")
    x = keras.distribution.distribute_tensor(
        x, distribution.get_data_layout(x.shape)
    )
    bn = SplitBatchNormalization(num_splits=4, center=False, scale=False)
    normalized = bn(x, training=True)
    shards = {
        shard.device.id: (
            shard.index[0].start,
            shard.index[0].stop,
            float(np.abs(np.asarray(shard.data).mean()).max()),
        )
        for shard in normalized.addressable_shards
    }

    # Colour ops in the model: the step runs on the global batch, every
    # image draws its own (16 copies of one image give 16 views).
    class Record(keras.layers.Layer):
        def build(self, shape):
            self.seen = self.add_weight(
                shape=(16, *shape[1:]), initializer="zeros", trainable=False
            )

        def call(self, inputs, training=False):
            if training:
                self.seen.assign(inputs)
            return inputs

    inputs = keras.Input((8, 8, 3))
    recorded = keras.layers.Flatten()(Record(name="record")(inputs))
    encoder = keras.Model(inputs, keras.layers.Dense(4)(recorded))
    colour = color.ColorAugmentation(
        jitter_p=1.0, grayscale_p=0.0, blur_p=0.0, seed=5
    )
    model = MoCo(encoder, dim=4, queue_size=16, augmentation=colour, seed=1)
    model.compile(optimizer=optimizers.SGD(0.03, momentum=0.9))
    same = np.broadcast_to(rng.integers(0, 256, (8, 8, 3)), (16, 8, 8, 3))
    same = same.astype("uint8")
    model.fit(same, same, batch_size=16, shuffle=False, verbose=0)
    seen = ops.convert_to_numpy(model.encoder_q.get_layer("record").seen)

    print(
        json.dumps(
            {
                "shards": shards,
                "distinct_views": len({v.round(4).tobytes() for v in seen}),
                "devices": len(jax.devices()),
                "mesh": distribute.device_count(),
                "queue_devices": len(queue.sharding.device_set),
                "loss": [single_losses, parallel_losses],
                "ptr": [
                    int(single.queue_ptr.numpy()),
                    int(parallel.queue_ptr.numpy()),
                ],
                "queue": float(
                    np.max(
                        np.abs(
                            ops.convert_to_numpy(single.queue)
                            - ops.convert_to_numpy(queue)
                        )
                    )
                ),
                "weights": {
                    w.path: float(
                        np.max(
                            np.abs(
                                ops.convert_to_numpy(w)
                                - ops.convert_to_numpy(v)
                            )
                        )
                    )
                    for w, v in zip(
                        single.weights, parallel.weights, strict=True
                    )
                },
            }
        )
    )


if __name__ == "__main__":
    main()
