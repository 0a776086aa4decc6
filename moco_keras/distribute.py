"""Shuffle BN across `tf.distribute` replicas (TensorFlow backend).

Under a `tf.distribute` strategy each replica (one per GPU) runs the step on
its slice of the global batch, with ordinary BN on that slice. MoCo's key
side then needs what the official code does with `torch.distributed`: gather
the key images of all replicas, permute them with one permutation shared by
every replica, encode this replica's slice of the permuted batch, gather the
keys back and undo the permutation. Every replica then holds the keys of the
whole global batch in the same order: its own rows go into the loss, all of
them into the queue, so the queues of all replicas stay identical.

On one device none of this runs: split BN (`SplitBatchNormalization`) with a
permuted key batch is the same computation, and the tests hold the two to
each other.
"""

import keras
from keras import ops


def replica_context():
    """The `tf.distribute` replica context of a multi-replica step, or None.

    None under the JAX and torch backends, outside a strategy, with one
    replica, and in the cross-replica context where Keras builds the model.
    """
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def num_replicas():
    """Replicas in sync of the current `tf.distribute` strategy (1 if none)."""
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


def shuffled_keys(context, images, encode, seed_generator):
    """Keys of this replica's images and of the global batch, shuffle BN.

    Args:
        context: the replica context (`replica_context()`).
        images: this replica's key images, `n x H x W x 3`.
        encode: maps images to normalized keys (`n x C`), in training mode.
        seed_generator: draws the permutation; every replica holds the same
            state, so every replica draws the same permutation.

    Returns:
        `(local_keys, global_keys)`: this replica's keys `n x C` in its own
        order, and the keys of all replicas `R*n x C` in the global batch's
        order (replica 0's rows first).
    """
    import tensorflow as tf

    # all_gather of a dataset tensor fails under MultiWorkerMirroredStrategy
    # ("destinations can not be empty") unless it is first copied.
    gathered = context.all_gather(
        tf.identity(images), axis=0
    )  # R*n x H x W x 3
    local = tf.shape(images)[0]
    order = keras.random.shuffle(
        ops.arange(tf.shape(gathered)[0], dtype="int32"), seed=seed_generator
    )  # R*n
    start = context.replica_id_in_sync_group * local
    mine = order[start : start + local]  # n
    keys = encode(tf.gather(gathered, mine))  # n x C, ordinary BN on the slice
    keys = context.all_gather(keys, axis=0)  # R*n x C, in permuted order
    global_keys = tf.gather(keys, tf.argsort(order))  # R*n x C
    return global_keys[start : start + local], global_keys


def mean_over_replicas(context, value):
    """`value` averaged over the replicas (identical on every replica)."""
    return context.all_reduce("mean", value)
