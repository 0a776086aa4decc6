import inspect
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from support import ROOT
from support import conv_bn_encoder
from support import dense_encoder
from support import make_moco
from support import random_images
from support import run_model_saving_test
from support import run_serialization_test
from support import snapshot
from support import to_numpy

from moco_keras import MOCOV1
from moco_keras import MOCOV2
from moco_keras import MoCo
from moco_keras import encoders
from moco_keras import health


def normalize(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def key_side(model):
    return model.encoder_k.weights + model.head_k.weights


def query_side(model):
    return model.encoder_q.weights + model.head_q.weights


def keys_of(model, images):
    """Normalized keys from the key encoder, one image at a time in spirit:
    the dense encoder has no BN, so batching cannot change a key."""
    k = model.head_k(model.encoder_k(images, training=False))
    return normalize(keras.ops.convert_to_numpy(k))


def test_presets_follow_the_papers():
    assert MOCOV1 == {
        "dim": 128,
        "mlp": False,
        "queue_size": 65536,
        "momentum": 0.999,
        "temperature": 0.07,
    }
    assert MOCOV2 == {**MOCOV1, "mlp": True, "temperature": 0.2}
    # `MoCo(encoder)` is MoCo v1.
    defaults = inspect.signature(MoCo).parameters
    assert {name: defaults[name].default for name in MOCOV1} == MOCOV1
    model = MoCo.from_preset("mocov2", dense_encoder(), queue_size=16)
    assert (model.dim, model.mlp, model.queue_size) == (128, True, 16)
    assert (model.momentum, model.temperature) == (0.999, 0.2)
    assert [layer.name for layer in model.head_q.layers] == ["fc_0", "fc_2"]
    assert model.head_q.layers[0].units == 8  # hidden = feature width
    with pytest.raises(ValueError, match="Unknown preset"):
        MoCo.from_preset("mocov3", dense_encoder())


def test_heads_have_torchs_linear_initialisation():
    """torch.nn.Linear: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    as the official heads are left."""
    model = MoCo(dense_encoder(features=256), dim=128, mlp=True, queue_size=8)
    for layer in model.head_q.layers:
        bound = 1.0 / math.sqrt(256)  # the fan-in of both layers
        kernel = keras.ops.convert_to_numpy(layer.kernel)
        bias = keras.ops.convert_to_numpy(layer.bias)
        assert np.abs(kernel).max() <= bound
        assert np.abs(kernel).max() > 0.99 * bound
        assert kernel.std() == pytest.approx(bound / math.sqrt(3), rel=0.03)
        assert np.abs(bias).max() <= bound
        assert bias.std() > 0.4 * bound  # drawn, not zeros
    for q_var, k_var in zip(query_side(model), key_side(model), strict=True):
        np.testing.assert_array_equal(to_numpy(q_var), to_numpy(k_var))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -0.07}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"momentum": 1.5}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"queue_size": 0}, "queue_size"),
        ({"queue_size": 8.5}, "queue_size"),
        ({"dim": 0}, "dim"),
        ({"mlp": "yes"}, "mlp"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoCo(dense_encoder(), **kwargs)


def test_encoder_must_return_rank_2_features():
    inputs = keras.Input((4, 4, 3))
    outputs = keras.layers.Conv2D(8, 3)(inputs)
    with pytest.raises(ValueError, match="rank-2 features"):
        MoCo(keras.Model(inputs, outputs))
    with pytest.raises(TypeError, match="keras.Model"):
        MoCo("resnet50")


def test_initial_state():
    model = make_moco(dim=4, queue_size=8)
    queue = to_numpy(model.queue)
    assert queue.shape == (4, 8)
    np.testing.assert_allclose(np.linalg.norm(queue, axis=0), 1.0, rtol=1e-5)
    assert int(to_numpy(model.queue_ptr)) == 0
    for q_var, k_var in zip(query_side(model), key_side(model), strict=True):
        np.testing.assert_array_equal(to_numpy(q_var), to_numpy(k_var))
        assert not k_var.trainable
    key_ids = {id(v) for v in key_side(model)}
    assert model.trainable_weights
    assert not key_ids & {id(v) for v in model.trainable_weights}


def test_call_returns_normalized_queries():
    model = make_moco(compile=False)
    q = keras.ops.convert_to_numpy(model(random_images(5)))
    assert q.shape == (5, 4)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, rtol=1e-5)


def test_queue_pointer_advances_wraps_and_holds_the_keys():
    # K = 10 is not a multiple of the batch (4): the third step wraps.
    model = make_moco(queue_size=10, momentum=0.5)
    columns = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1], [2, 3, 4, 5]]
    for step, expected_columns in enumerate(columns):
        x_q, x_k = random_images(4, seed=2 * step), random_images(4, seed=99)
        model.train_on_batch(x_q, x_k)
        assert int(to_numpy(model.queue_ptr)) == (4 * (step + 1)) % 10
        # The key encoder is not changed after the key forward of a step, so
        # the keys of the step can be recomputed from it, in batch order.
        queue = to_numpy(model.queue)
        np.testing.assert_allclose(
            queue[:, expected_columns].T, keys_of(model, x_k), atol=1e-5
        )


def test_batch_larger_than_queue_is_an_error():
    model = make_moco(queue_size=4)
    with pytest.raises(ValueError, match="larger than the queue"):
        model.train_on_batch(random_images(8), random_images(8, seed=1))


def test_momentum_update_uses_query_weights_before_the_step():
    m = 0.75
    model = make_moco(conv_bn_encoder(bn_splits=2), momentum=m, mlp=True)
    x_q = random_images(8, (8, 8, 3), seed=1)
    x_k = random_images(8, (8, 8, 3), seed=2) + 1.0
    rng = np.random.default_rng(3)
    for k_var in key_side(model):
        k_var.assign(to_numpy(k_var) + rng.normal(size=k_var.shape))
    q0, k0 = snapshot(query_side(model)), snapshot(key_side(model))

    model.train_on_batch(x_q, x_k)

    trainable = [v.trainable for v in query_side(model)]
    assert any(trainable) and not all(trainable)
    for is_trainable, q_before, k_before, q_var, k_var in zip(
        trainable, q0, k0, query_side(model), key_side(model), strict=True
    ):
        k_after = to_numpy(k_var)
        if is_trainable:
            np.testing.assert_allclose(
                k_after, m * k_before + (1 - m) * q_before, atol=1e-6
            )
            assert not np.allclose(to_numpy(q_var), q_before)  # SGD moved it
        else:
            # BN moving statistics: the key encoder's own, from its batch.
            assert not np.allclose(k_after, k_before)
            assert not np.allclose(k_after, m * k_before + (1 - m) * q_before)
            assert not np.allclose(k_after, to_numpy(q_var))
    # The first BN's moving mean is computable: the average of the group
    # means is the batch mean of conv1's output, whatever the shuffle.
    conv1_k = keras.Model(
        model.encoder_k.input, model.encoder_k.get_layer("conv1").output
    )
    batch_mean = keras.ops.convert_to_numpy(conv1_k(x_k)).mean(axis=(0, 1, 2))
    bn1 = model.encoder_k.get_layer("bn1")
    k0_mean = k0[[v.path for v in key_side(model)].index(bn1.moving_mean.path)]
    np.testing.assert_allclose(
        to_numpy(bn1.moving_mean), 0.9 * k0_mean + 0.1 * batch_mean, atol=1e-5
    )


def test_key_encoder_gets_no_gradient():
    # m = 1 keeps the key encoder exactly as it was unless a gradient or
    # the optimizer reaches it; the query encoder must move.
    model = make_moco(momentum=1.0, mlp=True, learning_rate=0.5)
    k0, q0 = snapshot(key_side(model)), snapshot(query_side(model))
    for seed in range(3):
        model.train_on_batch(random_images(4, seed=seed), random_images(4))
    for before, var in zip(k0, key_side(model), strict=True):
        np.testing.assert_array_equal(to_numpy(var), before)
    moved = [
        not np.allclose(before, to_numpy(var))
        for before, var in zip(q0, query_side(model), strict=True)
    ]
    assert all(moved)


def test_loss_equals_numpy_infonce():
    m, t = 0.9, 0.07
    model = make_moco(mlp=True, momentum=m, temperature=t, queue_size=8)
    rng = np.random.default_rng(4)
    for k_var in key_side(model):
        k_var.assign(rng.normal(size=k_var.shape).astype("float32"))
    x_q, x_k = random_images(4, seed=5), random_images(4, seed=6)
    queue = to_numpy(model.queue)
    q_w = snapshot(query_side(model))
    k_w = [
        m * k + (1 - m) * q
        for k, q in zip(snapshot(key_side(model)), q_w, strict=True)
    ]

    def embed(x, w):
        kernel, bias, w1, b1, w2, b2 = w
        h = x.reshape(len(x), -1) @ kernel + bias
        return normalize(np.maximum(h @ w1 + b1, 0) @ w2 + b2)

    q, k = embed(x_q, q_w), embed(x_k, k_w)
    l_pos = np.sum(q * k, axis=1, keepdims=True)
    l_neg = q @ queue
    logits = np.concatenate([l_pos, l_neg], axis=1) / t
    log_z = np.log(np.exp(logits).sum(axis=1))
    expected = np.mean(log_z - logits[:, 0])
    top1 = np.mean(np.argmax(logits, axis=1) == 0)

    logs = model.train_on_batch(x_q, x_k, return_dict=True)
    np.testing.assert_allclose(logs["loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(logs["acc1"], top1)
    np.testing.assert_allclose(to_numpy(model.queue)[:, :4].T, k, atol=1e-5)


@keras.saving.register_keras_serializable(package="moco_keras_tests")
class RecordInput(keras.layers.Layer):
    """Keeps the last batch it saw in training, to see what an encoder got."""

    def __init__(self, batch_size, **kwargs):
        super().__init__(**kwargs)
        self.batch_size = batch_size

    def build(self, input_shape):
        self.seen = self.add_weight(
            shape=(self.batch_size, *input_shape[1:]),
            initializer="zeros",
            trainable=False,
        )

    def call(self, inputs, training=False):
        if training:
            self.seen.assign(inputs)
        return inputs

    def get_config(self):
        return {**super().get_config(), "batch_size": self.batch_size}


def test_key_batch_is_shuffled_and_keys_are_put_back_in_order():
    inputs = keras.Input((4, 4, 3))
    x = RecordInput(16, name="record")(inputs)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(8)(x)
    model = make_moco(keras.Model(inputs, outputs), queue_size=16)
    x_q, x_k = random_images(16, seed=1), random_images(16, seed=2)
    model.train_on_batch(x_q, x_k)

    seen_q = to_numpy(model.encoder_q.get_layer("record").seen)
    seen_k = to_numpy(model.encoder_k.get_layer("record").seen)
    np.testing.assert_array_equal(seen_q, x_q)  # queries are not shuffled
    flat_k, flat_seen = x_k.reshape(16, -1), seen_k.reshape(16, -1)
    order = [int(np.argmin(np.abs(flat_k - row).sum(1))) for row in flat_seen]
    np.testing.assert_allclose(flat_seen, flat_k[order])
    assert sorted(order) == list(range(16))  # a permutation ...
    assert order != list(range(16))  # ... that moved the images
    np.testing.assert_allclose(
        to_numpy(model.queue).T, keys_of(model, x_k), atol=1e-5
    )


def test_shuffle_bn_groups_differ_between_queries_and_keys():
    # The same images in both views and momentum 0, so that the key
    # encoder is the query encoder of this step: unshuffled, every key would
    # be its query from the same train-mode forward. Shuffled, split BN
    # normalizes each key among other images than its query, and the two
    # differ; with one BN group the shuffle changes nothing (BN does not
    # depend on the order), so the difference is the groups' doing.
    x = random_images(16, (8, 8, 3), seed=7)
    for bn_splits in (1, 4):
        model = make_moco(
            conv_bn_encoder(bn_splits=bn_splits), queue_size=16, momentum=0.0
        )
        q = keras.ops.convert_to_numpy(model(x, training=True))  # 16 x 4
        model.train_on_batch(x, x)
        keys = to_numpy(model.queue).T  # 16 x 4, the step's keys in order
        if bn_splits == 1:
            np.testing.assert_allclose(keys, q, atol=1e-4)
        else:
            assert np.abs(keys - q).max() > 1e-2


def test_evaluate_leaves_the_state_alone():
    model = make_moco(conv_bn_encoder(bn_splits=2), mlp=True)
    model.train_on_batch(
        random_images(4, (8, 8, 3)), random_images(4, (8, 8, 3))
    )
    before = snapshot(model.weights)
    logs = model.evaluate(
        random_images(8, (8, 8, 3), seed=3),
        random_images(8, (8, 8, 3), seed=4),
        batch_size=4,
        verbose=0,
        return_dict=True,
    )
    assert set(logs) == {"loss", "acc1", "acc5", *health.HEALTH}
    for value, var in zip(before, model.weights, strict=True):
        if "seed_generator" not in var.path:
            np.testing.assert_array_equal(to_numpy(var), value, var.path)


def test_fit_needs_the_key_view():
    model = make_moco()
    with pytest.raises(ValueError, match="pairs of views"):
        model.fit(random_images(4), batch_size=4, verbose=0)


def synthetic_images(n, size=16, seed=0):
    """Images told apart by colour and stripe frequency."""
    rng = np.random.default_rng(seed)
    colors = rng.uniform(size=(n, 1, 1, 3))
    freq = rng.uniform(1, 4, size=(n, 1, 1, 1))
    grid = np.linspace(0, 1, size)
    ramp = (grid[:, None] + grid[None, :])[None, :, :, None]
    images = colors * (0.6 + 0.4 * np.sin(2 * math.pi * freq * ramp))
    return images.astype("float32")


def test_loss_falls_and_accuracy_rises():
    images = synthetic_images(64)
    rng = np.random.default_rng(1)
    model = make_moco(
        # A ResNet: with the two-block encoder, accuracy rose by 0.27 to
        # 0.30 on the three backends, at this test's threshold.
        encoders.cifar_resnet18(width=2, bn_splits=2, input_shape=(16, 16, 3)),
        dim=16,
        queue_size=16,
        momentum=0.9,
        temperature=0.1,
        learning_rate=0.1,
    )
    losses, accuracies = [], []
    for step in range(24):
        batch = images[(step % 4) * 16 : (step % 4 + 1) * 16]
        views = [
            batch + 0.1 * rng.normal(size=batch.shape).astype("float32")
            for _ in range(2)
        ]
        logs = model.train_on_batch(*views, return_dict=True)
        losses.append(logs["loss"])
        accuracies.append(logs["acc1"])
    # Step 0 is measured against the random initial queue; from step 1 on
    # the queue holds real keys (K = batch size).
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[1:5]) - np.mean(losses[-8:]) > 0.2, losses
    assert np.mean(accuracies[-8:]) - np.mean(accuracies[1:5]) > 0.3, accuracies


def test_config_round_trip():
    model = make_moco(conv_bn_encoder(bn_splits=2), mlp=True, momentum=0.99)
    clone = run_serialization_test(model)
    assert [v.shape for v in clone.weights] == [v.shape for v in model.weights]
    norms = [
        layer
        for layer in clone.encoder_k.layers
        if hasattr(layer, "num_splits")
    ]
    assert norms and all(n.num_splits == 2 for n in norms)


def test_keras_file_keeps_queue_pointer_and_key_encoder(tmp_path):
    model = make_moco(conv_bn_encoder(bn_splits=2), queue_size=10, mlp=True)
    for seed in range(3):
        model.train_on_batch(
            random_images(4, (8, 8, 3), seed=seed),
            random_images(4, (8, 8, 3), seed=seed + 10),
        )
    assert int(to_numpy(model.queue_ptr)) == 2
    loaded = run_model_saving_test(model, tmp_path / "moco.keras")
    assert isinstance(loaded, MoCo)
    assert int(to_numpy(loaded.queue_ptr)) == 2
    # The reloaded model trains on from where it stopped.
    loaded.train_on_batch(
        random_images(4, (8, 8, 3)), random_images(4, (8, 8, 3))
    )
    assert int(to_numpy(loaded.queue_ptr)) == 6


def test_fit_on_a_tf_data_dataset_of_pairs():
    import tensorflow as tf

    # tf.data leaves the batch dimension unknown inside the traced step.
    x_q = random_images(12, (8, 8, 3), seed=1)
    x_k = random_images(12, (8, 8, 3), seed=2)
    pairs = tf.data.Dataset.from_tensor_slices((x_q, x_k)).batch(4)
    model = make_moco(conv_bn_encoder(bn_splits=2), queue_size=10, mlp=True)
    history = model.fit(pairs, epochs=2, verbose=0, shuffle=False)
    assert sorted(history.history) == sorted(
        ["acc1", "acc5", "loss", *health.HEALTH]
    )
    assert np.all(np.isfinite(history.history["loss"]))
    assert int(to_numpy(model.queue_ptr)) == 24 % 10


def test_load_weights_resumes_the_exact_run(tmp_path):
    """Weights, optimizer slots, queue, pointer and the shuffle's seed."""

    def build():
        keras.utils.set_random_seed(0)
        model = make_moco(conv_bn_encoder(bn_splits=2), queue_size=10, mlp=True)
        model.optimizer.build(model.trainable_variables)
        return model

    def step(model, seed):
        model.train_on_batch(
            random_images(4, (8, 8, 3), seed=seed),
            random_images(4, (8, 8, 3), seed=seed + 10),
        )

    model = build()
    for seed in range(3):
        step(model, seed)
    path = tmp_path / "ckpt.keras"
    model.save(path)
    resumed = build()
    resumed.load_weights(path)
    for a, b in zip(
        model.optimizer.variables, resumed.optimizer.variables, strict=True
    ):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b), a.path)
    np.testing.assert_array_equal(
        to_numpy(model.seed_generator.state),
        to_numpy(resumed.seed_generator.state),
    )
    step(model, 3)
    step(resumed, 3)
    for a, b in zip(model.weights, resumed.weights, strict=True):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), atol=1e-6)


@pytest.fixture
def dtype_policy():
    """Sets the global dtype policy for one test, then restores it."""
    before = keras.config.dtype_policy()
    yield keras.config.set_dtype_policy
    keras.config.set_dtype_policy(before)


def mixed_run(policy, steps):
    """`steps` steps of one model under `policy`: (model, initial weights,
    losses)."""
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(0)
    model = make_moco(
        conv_bn_encoder(bn_splits=2),
        queue_size=16,
        mlp=True,
        momentum=0.99,
        learning_rate=0.01,
    )
    initial = snapshot(model.weights)
    losses = []
    for seed in range(steps):
        logs = model.train_on_batch(
            random_images(8, (8, 8, 3), seed=seed),
            random_images(8, (8, 8, 3), seed=seed + 10),
            return_dict=True,
        )
        losses.append(logs["loss"])
    return model, initial, losses


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_keeps_moco_state_and_loss_in_float32(
    dtype_policy, policy
):
    dtype_policy(policy)
    model = make_moco(conv_bn_encoder(bn_splits=2), queue_size=16, mlp=True)
    half = policy.split("_")[1]
    images = random_images(8, (8, 8, 3))
    # The encoders compute in half precision (else this test tests nothing)
    # and keep float32 variables: weights, BN moving statistics.
    assert (
        keras.backend.standardize_dtype(
            model.encoder_q(images, training=True).dtype
        )
        == half
    )
    assert {v.dtype for v in model.weights} == {"float32", "int32"}
    assert model.queue.dtype == "float32"
    # Queries, keys, the logits and their softmax in float32.
    q = model(images, training=True)
    assert keras.backend.standardize_dtype(q.dtype) == "float32"
    loss = model.compute_loss(y=images, y_pred=q, training=False)
    assert keras.backend.standardize_dtype(loss.dtype) == "float32"
    # float16 needs loss scaling; bfloat16 has float32's exponent range.
    scaled = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert scaled == (policy == "mixed_float16")


def test_mixed_precision_momentum_update_moves_the_key_encoder(dtype_policy):
    # k <- 0.999 k + 0.001 q with q - k ~ 0.01 changes k by ~1e-5: below
    # bfloat16's resolution (2^-8 relative), so an update computed in
    # bfloat16 would leave the key encoder where it was, forever.
    dtype_policy("mixed_bfloat16")
    m = 0.999
    model = make_moco(conv_bn_encoder(bn_splits=2), momentum=m, mlp=True)
    rng = np.random.default_rng(3)
    for k_var in key_side(model):  # all frozen; BN statistics left alone
        if "moving" not in k_var.path:
            k_var.assign(to_numpy(k_var) + 0.01 * rng.normal(size=k_var.shape))
    q0, k0 = snapshot(query_side(model)), snapshot(key_side(model))
    model.train_on_batch(
        random_images(8, (8, 8, 3)), random_images(8, (8, 8, 3))
    )
    for q_var, q_before, k_before, k_var in zip(
        query_side(model), q0, k0, key_side(model), strict=True
    ):
        if q_var.trainable:
            expected = m * k_before + (1 - m) * q_before
            np.testing.assert_allclose(
                to_numpy(k_var), expected, rtol=0, atol=1e-7, err_msg=k_var.path
            )
            assert np.any(to_numpy(k_var) != k_before), k_var.path


def test_mixed_bfloat16_steps_stay_close_to_float32(dtype_policy):
    # Losses of 2 to 5; bf16's rounding moves them by a few hundredths.
    _, _, reference = mixed_run("float32", steps=3)
    _, _, losses = mixed_run("mixed_bfloat16", steps=3)
    np.testing.assert_allclose(losses, reference, atol=0.1)


def test_mixed_float16_scales_the_loss_and_trains(dtype_policy):
    # Dynamic loss scaling starts at 2^15 and, as torch's GradScaler does,
    # skips the steps whose float16 gradients overflow while it halves the
    # scale: the first steps may not move the model; later ones do.
    model, initial, losses = mixed_run("mixed_float16", steps=8)
    assert np.all(np.isfinite(losses))
    assert to_numpy(model.optimizer.dynamic_scale) < 2**15
    moved = [
        np.any(to_numpy(v) != before)
        for v, before in zip(model.weights, initial, strict=True)
        if v.trainable
    ]
    assert all(moved)


@pytest.mark.process
@pytest.mark.backends("jax", "torch")
def test_fit_runs_without_tensorflow():
    """What needs no TensorFlow on JAX and torch: the package, MoCo.fit on
    arrays, a keras.utils.PyDataset, a torch DataLoader and the grain
    two-view batches of a JPEG folder and of Fashion-MNIST."""
    result = subprocess.run(
        [sys.executable, "tests/scripts/fit_without_tensorflow.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # 3 fits of 2 steps; 6 batches of 8 keys through a queue of 40 (a
    # pointer that never moved would be 0).
    lines = result.stdout.strip().splitlines()
    assert lines[-2].split() == ["steps", "6", "ptr", "8"]
    # The grain path (`moco_keras.views`): 2 epochs of 2 batches from a JPEG
    # folder, then 2 of Fashion-MNIST, through `fit` without TensorFlow.
    assert lines[-1].split() == ["grain", "steps", "6"]
