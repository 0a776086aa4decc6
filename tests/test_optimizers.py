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


def test_lars_scales_matrices_and_leaves_biases_and_norms_alone():
    """MoCo v3's LARS against numpy over three steps: a kernel gets decay
    and the trust ratio, a rank-1 weight (bias, BN) plain momentum."""
    rng = np.random.default_rng(0)
    kernel0 = rng.normal(size=(3, 4)).astype("float32")
    bias0 = rng.normal(size=(4,)).astype("float32")
    grads = [(rng.normal(size=(3, 4)), rng.normal(size=(4,))) for _ in range(3)]
    lr, wd, mu, trust = 0.5, 1e-2, 0.9, 1e-3
    kernel, bias = kernel0.astype(np.float64), bias0.astype(np.float64)
    buf_k, buf_b = np.zeros_like(kernel), np.zeros_like(bias)
    for g_k, g_b in grads:
        d = g_k + wd * kernel
        d = d * trust * np.linalg.norm(kernel) / np.linalg.norm(d)
        buf_k = mu * buf_k + d
        kernel = kernel - lr * buf_k
        buf_b = mu * buf_b + g_b
        bias = bias - lr * buf_b

    variables = [keras.Variable(kernel0), keras.Variable(bias0)]
    optimizer = optimizers.LARS(
        lr, momentum=mu, weight_decay=wd, trust_coefficient=trust
    )
    for g_k, g_b in grads:
        optimizer.apply_gradients(
            [
                (keras.ops.convert_to_tensor(g_k, "float32"), variables[0]),
                (keras.ops.convert_to_tensor(g_b, "float32"), variables[1]),
            ]
        )
    np.testing.assert_allclose(variables[0].numpy(), kernel, rtol=1e-5)
    np.testing.assert_allclose(variables[1].numpy(), bias, rtol=1e-5)


def test_lars_keeps_a_zero_kernel_finite():
    variable = keras.Variable(np.zeros((2, 2), "float32"))
    optimizer = optimizers.LARS(0.1)
    optimizer.apply_gradients([(keras.ops.ones((2, 2)), variable)])
    # ||w|| = 0: the trust ratio is 1, as in the official code.
    np.testing.assert_allclose(variable.numpy(), -0.1 * np.ones((2, 2)))


def test_warmup_cosine_and_momentum_follow_main_moco():
    # main_moco.py's adjust_learning_rate and adjust_moco_momentum at the
    # fractional epoch epoch + i / iters_per_epoch.
    lr, epochs, warmup, steps = 0.6 * 4096 / 256, 100, 10, 7
    schedule = optimizers.WarmupCosine(lr, steps, epochs, warmup)
    for step in (0, 3, 69, 70, 71, 400, 699):
        epoch = step / steps
        if epoch < warmup:
            expected = lr * epoch / warmup
        else:
            expected = (
                lr
                * 0.5
                * (
                    1.0
                    + math.cos(math.pi * (epoch - warmup) / (epochs - warmup))
                )
            )
        # float32: at the cosine's tail, a millionth of the peak.
        assert float(schedule(step)) == pytest.approx(expected, abs=1e-6 * lr)
        m = 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1 - 0.99)
        assert float(
            optimizers.CosineMomentum(0.99, steps, epochs)(step)
        ) == pytest.approx(m, rel=1e-6)
    run_serialization_test(schedule)
    run_serialization_test(optimizers.LARS(0.3, weight_decay=1e-6))


def _adamw_steps(optimizer, weights, grads):
    variable = keras.Variable(weights.copy())  # torch's backend shares it
    for g in grads:
        optimizer.apply_gradients([(keras.ops.array(g, "float32"), variable)])
    return keras.ops.convert_to_numpy(variable)


def test_adamw_is_torch_adamw():
    """Three steps with weight decay and bias correction equal
    `torch.optim.AdamW`'s within float32 rounding. Gradients from 1e-7 to
    1 make epsilon matter: Keras' AdamW, which adds it before the bias
    correction, is off by up to 30 % there."""
    import torch

    rng = np.random.default_rng(0)
    weights = rng.normal(size=(4, 8)).astype("float32")
    scales = np.logspace(-7, 0, 8).astype("float32")
    grads = [
        (rng.normal(size=(4, 8)) * scales).astype("float32") for _ in range(3)
    ]
    lrs = [0.1, 0.05, 0.02]
    # Steps 0, 1, 2 (a boundary is the last step of its rate).
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([0, 1], lrs)
    settings = dict(weight_decay=0.1, beta_1=0.9, beta_2=0.999, epsilon=1e-8)
    ours = _adamw_steps(optimizers.AdamW(schedule, **settings), weights, grads)

    parameter = torch.nn.Parameter(torch.from_numpy(weights.copy()))
    reference = torch.optim.AdamW(
        [parameter], lr=lrs[0], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1
    )
    for lr, g in zip(lrs, grads, strict=True):
        reference.param_groups[0]["lr"] = lr
        parameter.grad = torch.from_numpy(g)
        reference.step()
    expected = parameter.detach().numpy()
    # float32 rounding: 4 units in the last place of the largest weight.
    ulps = 4 * np.spacing(np.abs(expected).max())
    np.testing.assert_allclose(ours, expected, rtol=0, atol=ulps)
    keras_adamw = _adamw_steps(
        keras.optimizers.AdamW(schedule, **settings), weights, grads
    )
    assert np.abs(keras_adamw - expected).max() > 1e4 * ulps
    run_serialization_test(optimizers.AdamW(1e-3, weight_decay=0.05))
    with pytest.raises(ValueError, match="beta_1"):
        optimizers.AdamW(1e-3, beta_1=1.0)
