import math

import keras
import numpy as np
import pytest
from support import run_serialization_test

from moco_keras import optimizers


def test_sgd_is_torch_sgd_with_coupled_weight_decay():
    lrs = [0.1, 0.1, 0.05, 0.01]
    grads = [
        np.array([0.5, -1.0]),
        np.array([0.2, 0.3]),
        np.array([-0.4, 0.1]),
        np.array([1.0, 1.0]),
    ]
    # torch.optim.SGD: d = g + wd * w; buf = mu * buf + d; w -= lr * buf.
    w, buf = np.array([1.0, 2.0]), np.zeros(2)
    for lr, g in zip(lrs, grads, strict=True):
        buf = 0.9 * buf + g + 1e-2 * w
        w = w - lr * buf

    variable = keras.Variable([1.0, 2.0])
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        [1, 2], [0.1, 0.05, 0.01]
    )
    optimizer = optimizers.SGD(schedule, momentum=0.9, weight_decay=1e-2)
    for g in grads:
        optimizer.apply_gradients([(keras.ops.array(g, "float32"), variable)])
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(variable), w, rtol=1e-5
    )
    config = optimizer.get_config()
    assert config["weight_decay"] == 1e-2 and config["momentum"] == 0.9
    with pytest.raises(ValueError, match="weight_decay"):
        optimizers.SGD(0.1, weight_decay=-1.0)


def test_epoch_schedules():
    cosine = optimizers.EpochSchedule(
        0.06, steps_per_epoch=10, epochs=4, cosine=True
    )
    expected = [0.06 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    got = [float(cosine(step)) for step in (0, 9, 10, 25, 39)]
    np.testing.assert_allclose(
        got,
        [expected[0], expected[0], expected[1], expected[2], expected[3]],
        rtol=1e-6,
    )
    steps = optimizers.EpochSchedule(0.03, 5, 200, milestones=(120, 160))
    got = [float(steps(s)) for s in (0, 599, 600, 799, 800, 999)]
    np.testing.assert_allclose(
        got, [0.03, 0.03, 0.003, 0.003, 3e-4, 3e-4], rtol=1e-6
    )
    clone = run_serialization_test(steps)
    assert float(clone(800)) == pytest.approx(3e-4)
