"""Shuffle BN across tf.distribute replicas equals split BN on one device.

TensorFlow splits the CPU into logical devices only before its runtime
starts, so the checks run in a fresh TensorFlow process (whatever backend
runs the suite: the code under test is the TensorFlow backend's).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MIRRORED = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf

    (cpu,) = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 4
    )
    import keras
    from keras import ops
    from moco_keras import MoCo, encoders, optimizers

    def build(bn_splits):
        keras.utils.set_random_seed(0)
        encoder = encoders.cifar_resnet18(
            width=4, bn_splits=bn_splits, input_shape=(16, 16, 3)
        )
        model = MoCo(encoder, dim=8, queue_size=64, mlp=True, seed=1)
        model.compile(optimizer=optimizers.SGD(0.03, momentum=0.9,
                                               weight_decay=1e-4))
        return model

    def diff(a, b):
        return float(np.max(np.abs(
            ops.convert_to_numpy(a) - ops.convert_to_numpy(b))))

    rng = np.random.default_rng(0)
    views = rng.normal(size=(2, 3 * 16, 16, 16, 3)).astype("float32")
    single = build(bn_splits=4)
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(4)])
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
        results.append({
            "replicas": strategy.num_replicas_in_sync,
            "loss": [single_loss, mirrored_loss],
            "queue": diff(single.queue, mirrored.queue),
            "ptr": [int(single.queue_ptr.numpy()),
                    int(mirrored.queue_ptr.numpy())],
            "weights": {
                w.path: diff(w, v)
                for w, v in zip(single.weights, mirrored.weights, strict=True)
            },
            "replica_queues": max(diff(q, replicas[0]) for q in replicas),
            "replica_ptrs": sorted({
                int(p.numpy()) for p in mirrored.queue_ptr.value.values
            }),
        })
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def mirrored():
    """[after one step, after three]: single device against 4 replicas."""
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "PYTHONPATH": ROOT}
    out = subprocess.run(
        [sys.executable, "-c", MIRRORED],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_mirrored_step_equals_split_bn_on_one_device(mirrored):
    result = mirrored[0]
    assert result["replicas"] == 4
    single, distributed = result["loss"]
    assert distributed == pytest.approx(single, abs=1e-5)
    # The queue holds the step's keys: the same keys, in the same order.
    assert result["queue"] < 1e-5
    assert result["ptr"] == [16, 16]
    # Query weights (one SGD step, gradients summed over replicas and the
    # loss divided by them), key weights (momentum update) and every BN's
    # moving statistics (averaged over replicas as over split-BN groups).
    worst = max(result["weights"], key=result["weights"].get)
    assert result["weights"][worst] < 1e-5, worst
    assert any("moving_mean" in path for path in result["weights"])


@pytest.mark.slow
def test_mirrored_replicas_keep_one_queue(mirrored):
    result = mirrored[1]
    assert result["replica_queues"] == 0.0
    assert result["replica_ptrs"] == [48]
    assert result["ptr"] == [48, 48]
    assert result["queue"] < 1e-4
    worst = max(result["weights"], key=result["weights"].get)
    assert result["weights"][worst] < 1e-4, worst
