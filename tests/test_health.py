"""Whether a run is healthy without labels: the feature measures of
`MoCo(health=True)` against numpy, and the warnings of `LossWatch`."""

import logging
import math

import keras
import numpy as np
import pytest
from support import make_moco
from support import random_images

from moco_keras import MoCo
from moco_keras import health
from moco_keras import training


def numpy_measures(q, k, queue):
    """Wang and Isola's definitions, written out with pairwise loops."""
    n = len(q)
    alignment = np.mean([np.sum((q[i] - k[i]) ** 2) for i in range(n)])
    kernel = [
        np.exp(-2.0 * np.sum((q[i] - q[j]) ** 2))
        for i in range(n)
        for j in range(n)
        if i != j
    ]
    negatives = q @ queue
    return {
        "alignment": alignment,
        "uniformity": np.log(np.mean(kernel)),
        "q_std": np.mean(np.std(q, axis=0)),
        "l_pos": np.mean(np.sum(q * k, axis=1)),
        "l_neg": np.mean(negatives),
        "l_neg_max": np.mean(negatives.max(axis=1)),
    }


def unit(rows):
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(
        "float32"
    )


def test_each_measure_equals_numpy():
    rng = np.random.default_rng(0)
    q = unit(rng.normal(size=(12, 8)))
    k = unit(q + 0.3 * rng.normal(size=(12, 8)))
    queue = unit(rng.normal(size=(20, 8))).T
    l_pos = np.sum(q * k, axis=1, keepdims=True)
    measures = health.health_measures(q, k, l_pos, q @ queue)
    expected = numpy_measures(q, k, queue)
    assert set(measures) == set(health.HEALTH) == set(expected)
    for name, value in expected.items():
        got = float(keras.ops.convert_to_numpy(measures[name]))
        assert got == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_collapsed_and_spread_features_bound_the_measures():
    collapsed = np.tile(unit(np.ones((1, 8))), (6, 1))
    spread = np.eye(8, dtype="float32")
    for q, uniformity, std in ((collapsed, 0.0, 0.0), (spread, -4.0, None)):
        measures = health.health_measures(q, q, np.ones((len(q), 1)), q @ q.T)
        value = float(keras.ops.convert_to_numpy(measures["uniformity"]))
        assert value == pytest.approx(uniformity, abs=1e-5)
        assert float(keras.ops.convert_to_numpy(measures["alignment"])) == 0
        if std is not None:
            assert float(keras.ops.convert_to_numpy(measures["q_std"])) == 0


def test_fit_logs_the_step_means_of_the_measures():
    """The epoch's logged values are the means of the steps' measures."""
    model = make_moco(queue_size=8)
    images = random_images(8)
    history = model.fit(images, images, batch_size=4, epochs=1, verbose=0)
    for name in health.HEALTH:
        assert np.isfinite(history.history[name][0]), name
    plain = make_moco(queue_size=8, health=False)
    history = plain.fit(images, images, batch_size=4, epochs=1, verbose=0)
    assert sorted(history.history) == ["acc1", "acc5", "loss"]
    assert MoCo.from_config(model.get_config()).health
    assert not MoCo.from_config(plain.get_config()).health


def constant_encoder():
    """An encoder whose output is the same for every image."""
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Flatten()(inputs)
    outputs = keras.layers.Dense(
        8, kernel_initializer="zeros", bias_initializer="ones", name="proj"
    )(x)
    return keras.Model(inputs, outputs, name="constant")


def fit_watched(model, epochs=2, **watch):
    images = random_images(16)
    return model.fit(
        images,
        random_images(16, seed=1),
        batch_size=4,
        epochs=epochs,
        verbose=0,
        callbacks=[training.LossWatch(model.queue_size, **watch)],
    )


def test_a_constant_encoder_warns_of_collapse_once(caplog):
    model = make_moco(constant_encoder(), learning_rate=0.0)
    with caplog.at_level(logging.WARNING):
        fit_watched(model)
    assert caplog.text.count("the features collapse") == 1


def test_a_learning_run_warns_of_nothing(caplog):
    model = make_moco(queue_size=8)
    with caplog.at_level(logging.WARNING):
        history = fit_watched(model, epochs=3)
    assert "collapse" not in caplog.text
    assert "stuck" not in caplog.text
    # Well above the collapse threshold of a tenth of 1/sqrt(dim).
    assert min(history.history["q_std"]) > 0.2 / math.sqrt(model.dim)


class _Optimizer:
    def __init__(self, lr):
        self.learning_rate = lr


class _Model:
    dim = 128

    def __init__(self, lr):
        self.optimizer = _Optimizer(lr)


def test_a_plateau_at_a_high_lr_warns_once_and_not_when_it_decays(caplog):
    def run(lrs, improving=False):
        watch = training.LossWatch(queue_size=None, patience=3)
        model = _Model(lrs[0])
        watch.set_model(model)
        for epoch, lr in enumerate(lrs):
            model.optimizer.learning_rate = lr
            drop = 0.05 * epoch if improving else 0.0
            logs = {"alignment": 0.6 - drop, "uniformity": -2.0 - drop}
            watch.on_epoch_end(epoch, logs)

    with caplog.at_level(logging.WARNING):
        run([0.03] * 8)
        assert caplog.text.count("the run may be stuck") == 1
        caplog.clear()
        run([0.03] * 8, improving=True)
        run([0.03, 0.03, 0.01, 0.005, 0.002, 0.001, 0.001, 0.001])
        assert "stuck" not in caplog.text


def test_a_nan_loss_stops_fit_and_the_newest_checkpoint_is_finite(tmp_path):
    model = make_moco(queue_size=8)
    images = random_images(16)
    images[9, 0, 0, 0] = np.nan  # a broken image in the third batch
    directory = str(tmp_path / "checkpoints")
    with pytest.raises(FloatingPointError, match="nan at global step 3 "):
        model.fit(
            images,
            images,
            batch_size=4,
            epochs=2,
            shuffle=False,
            verbose=0,
            callbacks=[
                training.LossWatch(8),
                training.Checkpointer(directory, 4, every_steps=1, keep=5),
            ],
        )
    path, step = training.latest_checkpoint(directory)
    assert step == 2
    restored = keras.saving.load_model(path)
    for variable in restored.weights:
        value = keras.ops.convert_to_numpy(variable.value)
        assert np.all(np.isfinite(value)), variable.path
    # The model in memory did take the NaN step.
    assert not all(
        np.all(np.isfinite(keras.ops.convert_to_numpy(v.value)))
        for v in model.trainable_weights
    )


@pytest.mark.parametrize(
    "images, size, batch, queue, momentum, blur, crop_min",
    [
        (1_281_167, 224, 256, 65536, 0.999, True, 0.2),  # ImageNet
        (50_000, 32, 512, 12288, 0.99, False, 0.5),  # CIFAR-10
        (20_000, 96, 256, 4864, 0.99, True, 0.2),
        (300, 224, 256, 256, 0.99, True, 0.2),  # one batch at least
    ],
)
def test_own_images_rules(images, size, batch, queue, momentum, blur, crop_min):
    from moco_keras import presets

    sections, reasons = presets.own_images_rules(images, size, batch)
    assert sections == {
        "model": {"queue_size": queue, "momentum": momentum},
        "augmentation": {"blur": blur, "crop_min": crop_min},
    }
    assert queue % batch == 0 and len(reasons) == 3
    assert f"moco_k {queue}" in reasons[0]


def test_the_health_metric_holds_the_running_mean_of_each_measure():
    metric = health.HealthMetric()
    for step in range(3):
        metric.update_state(
            {name: float(i + 10 * step) for i, name in enumerate(health.HEALTH)}
        )
    result = {
        n: float(keras.ops.convert_to_numpy(v))
        for n, v in metric.result().items()
    }
    assert result == {name: i + 10.0 for i, name in enumerate(health.HEALTH)}
    metric.reset_state()
    assert all(
        float(keras.ops.convert_to_numpy(v)) == 0.0
        for v in metric.result().values()
    )
