import logging
import math
import os

import keras
import numpy as np
import pytest
from support import make_moco
from support import random_images
from support import tensorboard_events

from moco_keras import training


def fitted_model():
    model = make_moco(queue_size=8)
    model.train_on_batch(random_images(4), random_images(4, seed=1))
    return model


def test_a_nan_loss_stops_the_run_naming_the_step():
    model = fitted_model()
    watch = training.LossWatch(queue_size=8)
    watch.set_model(model)
    watch.on_epoch_begin(2)
    watch.on_train_batch_end(0, {"loss": 1.5})
    with pytest.raises(FloatingPointError, match="global step 1 .epoch 3"):
        watch.on_train_batch_end(0, {"loss": float("nan")})
    with pytest.raises(FloatingPointError, match="became inf"):
        watch.on_train_batch_end(0, {"loss": float("inf")})


def test_a_nan_loss_inside_fit_raises():
    model = make_moco(queue_size=8)
    images = random_images(16)
    images[9, 0, 0, 0] = np.nan  # a broken image in the third batch
    with pytest.raises(FloatingPointError, match="nan at global step 3 "):
        model.fit(
            images,
            images,
            batch_size=4,
            epochs=3,
            shuffle=False,
            verbose=0,
            callbacks=[training.LossWatch(8)],
        )


def test_a_loss_at_chance_warns(caplog):
    watch = training.LossWatch(queue_size=4095)
    with caplog.at_level(logging.WARNING):
        watch.on_epoch_end(0, {"loss": math.log(4096) + 0.01})
        assert "nothing is being learned" in caplog.text
        caplog.clear()
        watch.on_epoch_end(1, {"loss": math.log(4096) - 1.0})
        assert "nothing is being learned" not in caplog.text


def test_checkpointer_keeps_the_newest_and_every_nth_epoch(tmp_path):
    model = fitted_model()
    directory = str(tmp_path / "ckpt")
    os.makedirs(directory)
    stale = os.path.join(directory, ".tmp-123-ckpt-000000005.keras")
    open(stale, "w").close()
    saver = training.Checkpointer(
        directory, steps_per_epoch=2, keep=2, keep_every_epochs=2
    )
    assert not os.path.exists(stale)  # left by a killed save: removed
    saver.set_model(model)
    for step in range(1, 10):
        saver.save(step)
    steps = [s for s, _ in training.list_checkpoints(directory)]
    # The newest two, and the ends of epochs 2 and 4 (steps 4 and 8).
    assert steps == [4, 8, 9]
    assert training.latest_checkpoint(directory)[1] == 9
    assert training.latest_checkpoint(str(tmp_path / "none")) == (None, 0)


def test_a_failed_save_leaves_no_file(tmp_path, monkeypatch):
    model = fitted_model()
    path = str(tmp_path / "ckpt-000000001.keras")

    def full_disk(filepath, *args, **kwargs):
        with open(filepath, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        training.save_atomically(model, path)
    assert os.listdir(tmp_path) == []


def test_csv_log_is_cut_back_to_the_resumed_epoch(tmp_path):
    path = str(tmp_path / "epochs.csv")
    with open(path, "w") as f:
        f.write("epoch,loss\n0,3.0\n1,2.5\n2,2.0\n")
    training.truncate_csv_log(path, 2)
    assert training.read_csv_log(path) == {
        "epoch": [0.0, 1.0],
        "loss": [3.0, 2.5],
    }
    training.plot_csv(path, str(tmp_path / "curves.png"))
    assert os.path.getsize(tmp_path / "curves.png") > 1000


def test_fit_resumable_starts_mid_epoch_from_the_newest_checkpoint(tmp_path):
    import tensorflow as tf

    calls = []

    def epoch_dataset(epoch, skip):
        calls.append((epoch, skip))
        x = random_images(12, seed=epoch)
        pairs = tf.data.Dataset.from_tensor_slices((x, x)).batch(4)
        return pairs.skip(skip)

    directory = str(tmp_path / "ckpt")
    model = make_moco(queue_size=8)
    saver = training.Checkpointer(directory, steps_per_epoch=3, every_steps=1)
    training.fit_resumable(
        model, epoch_dataset, 1, 3, directory, callbacks=[saver], verbose=0
    )
    os.remove(training.checkpoint_path(directory, 3))
    os.remove(training.checkpoint_path(directory, 2))  # "killed" at step 1
    keras.utils.set_random_seed(0)
    resumed = make_moco(queue_size=8)
    calls.clear()
    start = training.fit_resumable(
        resumed, epoch_dataset, 2, 3, directory, callbacks=[], verbose=0
    )
    assert start == 1
    assert calls == [(0, 1), (1, 0)]
    assert int(np.asarray(resumed.optimizer.iterations)) == 6


def test_step_log_writes_scalars_every_n_steps_and_one_view_grid(tmp_path):
    model = make_moco(queue_size=8)
    schedule = keras.optimizers.schedules.PolynomialDecay(0.1, 6, 0.01)
    model.compile(optimizer=keras.optimizers.SGD(schedule))
    views = (random_images(4), random_images(4, seed=1))
    log = training.StepLog(str(tmp_path), every_steps=2, views=views, pairs=3)
    model.fit(*views, batch_size=2, epochs=3, callbacks=[log], verbose=0)
    events = tensorboard_events(str(tmp_path / "train"))
    assert [step for step, _ in events["step/loss"]] == [2, 4, 6]
    assert [step for step, _ in events["step/acc1"]] == [2, 4, 6]
    # The learning rate after each logged step, as the schedule gives it.
    lrs = [lr for _, lr in events["step/lr"]]
    np.testing.assert_allclose(lrs, [0.07, 0.04, 0.01], rtol=1e-5)
    # One grid: 3 rows of 4 x 4 images, query view beside key view.
    assert events["views/pairs"] == [(0, (12, 8))]


def test_view_pair_grid_puts_each_key_beside_its_query():
    q = np.zeros((2, 2, 3, 1), "float32")
    k = np.ones((2, 2, 3, 1), "float32")
    q[:, 0, 0] = 1.0  # each image rescaled to [0, 1] alone
    grid = training.view_pair_grid(q, k, pairs=2)
    assert grid.shape == (4, 6, 1)
    np.testing.assert_array_equal(grid[:2, :3], q[0])
    np.testing.assert_array_equal(grid[2:, 3:], np.zeros((2, 3, 1)))  # flat
