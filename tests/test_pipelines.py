"""The tf.data pipelines (`moco_keras.pipelines`): the same batches for the
same seed and epoch, new views for a new epoch, worker shards, `fit`."""

import keras
import numpy as np
import pytest
from support import conv_bn_encoder
from support import fake_fashion_mnist
from support import make_moco
from support import tf_data_only

from moco_keras import augment
from moco_keras import datasets
from moco_keras import pipelines

SMALL = augment.get_augmentation("cifar", size=16)


@tf_data_only
def test_same_seed_same_batches_new_epoch_new_views(tmp_path):
    fake_fashion_mnist(str(tmp_path), n_train=32, n_test=4)
    source = datasets.fashion_mnist("train", str(tmp_path))

    def first_batch(seed):
        pairs = pipelines.two_view_dataset(
            source, SMALL, batch_size=8, seed=seed
        )
        return next(iter(pairs))[0].numpy()

    np.testing.assert_array_equal(first_batch(3), first_batch(3))
    assert not np.allclose(first_batch(3), first_batch(4))
    pairs = pipelines.two_view_dataset(source, SMALL, batch_size=8, seed=3)
    epoch1, epoch2 = (next(iter(pairs))[0].numpy() for _ in range(2))
    assert not np.allclose(epoch1, epoch2)


@tf_data_only
def test_worker_shards_split_every_global_batch(tmp_path):
    """Under several workers each reads its share of every global batch:
    the same images and views as the one-worker batch, none twice, in
    contiguous blocks (the shares in worker order are the global batch, so
    its BN groups are the one-worker run's)."""
    fake_fashion_mnist(str(tmp_path), n_train=48, n_test=4)
    source = datasets.fashion_mnist("train", str(tmp_path))

    def batches(shard, batch_size):
        pairs = pipelines.two_view_dataset(
            source,
            SMALL,
            batch_size,
            seed=5,
            epoch=1,
            skip_batches=1,
            shard=shard,
        )
        return [np.stack([q.numpy(), k.numpy()]) for q, k in pairs]

    whole = batches(None, 8)
    shards = [batches((index, 2), 8) for index in (0, 1)]
    assert len(whole) == len(shards[0]) == len(shards[1]) == 5
    for i, batch in enumerate(whole):  # 2 x 8 x 16 x 16 x 3
        np.testing.assert_array_equal(shards[0][i], batch[:, :4])
        np.testing.assert_array_equal(shards[1][i], batch[:, 4:])
    with pytest.raises(ValueError, match="does not split over 3 workers"):
        batches((0, 3), 8)


def test_fit_on_two_view_pipeline(tmp_path):
    fake_fashion_mnist(str(tmp_path), n_train=32, n_test=4)
    source = datasets.fashion_mnist("train", str(tmp_path))
    pairs = pipelines.two_view_dataset(source, SMALL, batch_size=8, seed=0)
    model = make_moco(conv_bn_encoder(bn_splits=2, size=16), queue_size=24)
    history = model.fit(pairs, epochs=2, verbose=0, shuffle=False)
    assert np.all(np.isfinite(history.history["loss"]))
    # 2 epochs of 4 batches of 8 keys: 64 keys through a queue of 24.
    assert int(keras.ops.convert_to_numpy(model.queue_ptr.value)) == 16
