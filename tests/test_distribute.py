"""Many devices on one CPU: each strategy against split BN on one device.

TensorFlow splits the CPU into logical devices, and JAX into host devices,
only before its runtime starts, so each check runs in a fresh process of
its backend. Multi-worker runs two local worker processes on 127.0.0.1.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest

from moco_keras import distribute

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MIRRORED = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf

    import keras
    from conftest import conv_bn_encoder
    from keras import ops
    from moco_keras import MoCo, distribute, moco, optimizers

    strategy = distribute.make_strategy("mirrored", cpu_devices=4)

    def build(bn_splits):
        keras.utils.set_random_seed(0)
        encoder = conv_bn_encoder(bn_splits, size=16)
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
            np.concatenate([t.numpy() for t in
                            strategy.experimental_local_results(part)])
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
    results.append({
        "distinct_views": len({v.round(4).tobytes() for v in views}),
        "views_vs_one_device": float(np.max(np.abs(views - alone))),
        "local_keys": local_keys[:, 0].tolist(),
        "global_keys": global_keys[:, 0].tolist(),
    })
    print(json.dumps(results))
    """
)


def run_script(script, **env):
    """Runs `script` in a fresh Python; the JSON of its last output line."""
    out = subprocess.run(
        [sys.executable, "-c", script],
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def mirrored():
    """[after one step, after three]: single device against 4 replicas."""
    return run_script(MIRRORED, KERAS_BACKEND="tensorflow")


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.backends("tensorflow")
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
@pytest.mark.process
@pytest.mark.backends("tensorflow")
def test_mirrored_replicas_draw_their_own_colours_and_one_permutation(
    mirrored,
):
    result = mirrored[2]
    # 16 copies of one image over 4 replicas: 16 different views (with a
    # mirrored seed state, replica r's i-th view would repeat replica 0's).
    assert result["distinct_views"] == 16
    assert result["views_vs_one_device"] < 1e-5
    assert result["local_keys"] == list(range(16))
    # 4 replicas x 16 global keys, each replica's in the global order.
    assert result["global_keys"] == list(range(16)) * 4


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.backends("tensorflow")
def test_mirrored_replicas_keep_one_queue(mirrored):
    result = mirrored[1]
    assert result["replica_queues"] == 0.0
    assert result["replica_ptrs"] == [48]
    assert result["ptr"] == [48, 48]
    assert result["queue"] < 1e-4
    worst = max(result["weights"], key=result["weights"].get)
    assert result["weights"][worst] < 1e-4, worst


DATA_PARALLEL = textwrap.dedent(
    """
    import json
    import jax
    import numpy as np
    import keras
    from conftest import conv_bn_encoder
    from keras import ops
    from moco_keras import MoCo, distribute, optimizers

    def build():
        keras.utils.set_random_seed(0)
        encoder = conv_bn_encoder(bn_splits=4, size=16)
        model = MoCo(encoder, dim=8, queue_size=64, mlp=True, seed=1)
        model.compile(optimizer=optimizers.SGD(0.03, momentum=0.9,
                                               weight_decay=1e-4))
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
    from moco_keras import SplitBatchNormalization, color
    distribution = keras.distribution.distribution()
    offsets = np.repeat(10.0 * np.arange(4), 4)[:, None, None, None]
    x = (rng.normal(size=(16, 4, 4, 2)) + offsets).astype("float32")
    x = keras.distribution.distribute_tensor(
        x, distribution.get_data_layout(x.shape)
    )
    bn = SplitBatchNormalization(num_splits=4, center=False, scale=False)
    normalized = bn(x, training=True)
    shards = {
        shard.device.id: (shard.index[0].start, shard.index[0].stop,
                          float(np.abs(np.asarray(shard.data).mean()).max()))
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
    colour = color.ColorAugmentation(jitter_p=1.0, grayscale_p=0.0,
                                      blur_p=0.0, seed=5)
    model = MoCo(encoder, dim=4, queue_size=16, augmentation=colour, seed=1)
    model.compile(optimizer=optimizers.SGD(0.03, momentum=0.9))
    same = np.broadcast_to(rng.integers(0, 256, (8, 8, 3)), (16, 8, 8, 3))
    same = same.astype("uint8")
    model.fit(same, same, batch_size=16, shuffle=False, verbose=0)
    seen = ops.convert_to_numpy(model.encoder_q.get_layer("record").seen)

    print(json.dumps({
        "shards": shards,
        "distinct_views": len({v.round(4).tobytes() for v in seen}),
        "devices": len(jax.devices()),
        "mesh": distribute.device_count(),
        "queue_devices": len(queue.sharding.device_set),
        "loss": [single_losses, parallel_losses],
        "ptr": [int(single.queue_ptr.numpy()), int(parallel.queue_ptr.numpy())],
        "queue": float(np.max(np.abs(
            ops.convert_to_numpy(single.queue) - ops.convert_to_numpy(queue)))),
        "weights": {
            w.path: float(np.max(np.abs(
                ops.convert_to_numpy(w) - ops.convert_to_numpy(v))))
            for w, v in zip(single.weights, parallel.weights, strict=True)
        },
    }))
    """
)


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.backends("jax")
def test_data_parallel_matches_split_bn_on_one_device():
    """JAX over 4 devices: the split-BN groups are the device shards, so the
    sharded program is shuffle BN, and equals the one-device computation."""
    result = run_script(
        DATA_PARALLEL,
        KERAS_BACKEND="jax",
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
        "--xla_force_host_platform_device_count=4",
    )
    assert result["devices"] == result["mesh"] == 4
    # Each device holds 4 rows of the global batch of 16, normalized among
    # themselves: device shards and BN groups coincide.
    shards = sorted(result["shards"].values())
    assert [(start, stop) for start, stop, _ in shards] == [
        (0, 4),
        (4, 8),
        (8, 12),
        (12, 16),
    ]
    assert max(mean for _, _, mean in shards) < 1e-4
    assert result["distinct_views"] == 16
    assert result["queue_devices"] == 4  # replicated on every device
    single, parallel = result["loss"]  # the mean over the three steps
    assert parallel == pytest.approx(single, abs=1e-5)
    assert result["ptr"] == [48, 48]
    assert result["queue"] < 1e-4
    worst = max(result["weights"], key=result["weights"].get)
    assert result["weights"][worst] < 1e-4, worst


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_worker(index, ports, workdir, log):
    config = {
        "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
        "task": {"type": "worker", "index": index},
    }
    env = {
        **os.environ,
        "KERAS_BACKEND": "tensorflow",
        "PYTHONPATH": ROOT,
        "TF_CONFIG": json.dumps(config),
    }
    command = [
        sys.executable,
        "-m",
        "moco_keras.recipes.pretrain",
        f"--flagfile={ROOT}/recipes/smoke.flags",
        f"--workdir={workdir}",
        "--strategy=multi_worker",
        "--train_limit=256",
        "--batch_size=32",
        "--moco_k=96",
        "--knn_every=0",
        "--checkpoint_steps=2",
        "--epochs=2",
    ]
    return subprocess.Popen(
        command,
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait(process, timeout):
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def _kill(process):
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _lincls_on(workdir, tmp_path, backend, *flags):
    """The linear classification smoke recipe on a pretraining workdir
    under `backend`; its results.json."""
    lincls = subprocess.run(
        [
            sys.executable,
            "-m",
            "moco_keras.recipes.lincls",
            f"--flagfile={ROOT}/recipes/lincls_smoke.flags",
            f"--pretrained={workdir}",
            f"--workdir={tmp_path / 'lincls'}",
            "--train_limit=512",
            "--epochs=1",
            "--cos",
            *flags,
        ],
        env={**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": ROOT},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert lincls.returncode == 0, lincls.stderr[-4000:]
    scores = json.loads((tmp_path / "lincls" / "results.json").read_text())
    assert scores["backbone_unchanged"] and 0 <= scores["top1"] <= 100
    return scores


def _check_resumed(workdir, texts, strategy, devices):
    """The restarted job of `_kill_mid_epoch_and_restart` resumed from an
    even step from 6 on, in every process, and finished both epochs, its
    files written by the first process alone; its results.json."""
    checkpoints = workdir / "checkpoints"
    results = json.loads((workdir / "results.json").read_text())
    resumed = results["resumed_from_step"]
    assert resumed >= 6 and resumed % 2 == 0
    assert results["strategy"] == strategy
    assert results["devices"] == devices
    assert results["checkpoint"].endswith("ckpt-000000016.keras")
    for text in texts:
        assert f"Resuming from {checkpoints}/ckpt-{resumed:09d}.keras" in text
        assert f"over {devices} device(s)" in text
    assert "this worker writes nothing" in texts[1]
    rows = (workdir / "epochs.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # header and the two epochs
    return results


def _kill_mid_epoch_and_restart(tmp_path, checkpoints, start, timeout):
    """Starts a job of two processes (`start(logs)` gives them), kills
    process 1 with SIGKILL once step 6 of its 16 (2 epochs of 8, a
    checkpoint every 2) is saved, mid-epoch, stops process 0, and starts the
    job again, as a cluster manager would; the restarted processes' logs."""
    logs = [open(tmp_path / f"process{i}.log", "w") for i in range(4)]
    processes = []
    try:
        processes = start(logs[:2])
        deadline = time.time() + timeout
        while not (checkpoints / "ckpt-000000006.keras").exists():
            assert time.time() < deadline, f"no step 6 saved in {timeout} s"
            assert all(p.poll() is None for p in processes), (
                tmp_path / "process0.log"
            ).read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(processes[1].pid, signal.SIGKILL)
        processes[1].wait()
        # The survivor would wait on its peer's collectives (TensorFlow's
        # coordination service stops it after about 20 s of missed
        # heartbeats); a cluster manager restarting the job stops it at once.
        _kill(processes[0])
        first = sorted(p.name for p in checkpoints.glob("ckpt-*.keras"))
        assert "ckpt-000000016.keras" not in first
        processes = start(logs[2:])
        codes = [_wait(p, timeout) for p in processes]
        texts = [(tmp_path / f"process{i}.log").read_text() for i in (2, 3)]
        assert codes == [0, 0], texts[0][-3000:] + texts[1][-3000:]
    finally:
        for process in processes:
            _kill(process)
        for log in logs:
            log.close()
    return texts


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.backends("tensorflow")
def test_multi_worker_resumes_after_a_worker_dies(tmp_path):
    """Two workers train; one is killed mid-epoch; the restarted job resumes
    from the last checkpoint the chief wrote and finishes the run. Then the
    linear classification recipe runs on it under MirroredStrategy."""
    workdir = tmp_path / "run"
    checkpoints = workdir / "checkpoints"

    def start(logs):
        ports = _free_ports(2)
        return [_start_worker(i, ports, workdir, logs[i]) for i in (0, 1)]

    texts = _kill_mid_epoch_and_restart(tmp_path, checkpoints, start, 240)
    results = _check_resumed(workdir, texts, "multi_worker", 2)
    # Every step enqueued the keys of the whole global batch of 32 (the two
    # workers' shares of 16): 16 steps x 32 keys, modulo K = 96.
    model = keras.saving.load_model(results["checkpoint"])
    assert int(keras.ops.convert_to_numpy(model.queue_ptr.value)) == 512 % 96

    # The linear classification recipe on that run, under MirroredStrategy
    # over 2 CPU devices (the full image path: frozen backbone inside).
    scores = _lincls_on(
        workdir,
        tmp_path,
        "tensorflow",
        "--strategy=mirrored",
        "--cpu_devices=2",
        "--nocache_features",
        "--val_limit=1000",
    )
    assert scores["val_images"] == 1000


# The JAX job of `test_data_parallel_processes_...`: 2 epochs of 8 steps of
# the global batch of 32, a checkpoint every 2 steps, queue of 96.
JAX_PRETRAIN = [
    "-m",
    "moco_keras.recipes.pretrain",
    f"--flagfile={ROOT}/recipes/smoke.flags",
    "--train_limit=256",
    "--batch_size=32",
    "--moco_k=96",
    "--bn_splits=4",
    "--knn_every=0",
    "--checkpoint_steps=2",
    "--keep_checkpoints=100",
    "--epochs=2",
]


def _start_jax_process(index, port, workdir, log):
    """Process `index` of a 2-process `--strategy=data_parallel` job, two
    CPU devices each, its coordinator (process 0) on 127.0.0.1:`port`."""
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "PYTHONPATH": ROOT,
        "KERAS_DISTRIBUTION_JOB_ADDRESSES": f"127.0.0.1:{port}",
        "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
        "KERAS_DISTRIBUTION_PROCESS_ID": str(index),
    }
    return subprocess.Popen(
        [
            sys.executable,
            *JAX_PRETRAIN,
            f"--workdir={workdir}",
            "--strategy=data_parallel",
            "--cpu_devices=2",
        ],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.backends("jax")
def test_data_parallel_processes_resume_and_equal_one_process(tmp_path):
    """Two JAX processes of two CPU devices each (`keras.distribution` over
    4 global devices) run the pretraining recipe; one is killed with
    SIGKILL mid-epoch, the restarted job resumes and finishes. Its first
    steps equal one process's run with split BN of 4 groups (the weights
    then drift apart as rounding differences grow: 5e-7 after 4 steps,
    4e-3 after 8, in a BN variance of this tiny network). Then the linear
    recipe on its checkpoint."""
    workdir = tmp_path / "run"
    checkpoints = workdir / "checkpoints"
    one = subprocess.run(
        [sys.executable, *JAX_PRETRAIN, f"--workdir={tmp_path / 'one'}"],
        env={**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": ROOT},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert one.returncode == 0, one.stderr[-4000:]

    def start(logs):
        port = _free_ports(1)[0]
        return [_start_jax_process(i, port, workdir, logs[i]) for i in (0, 1)]

    texts = _kill_mid_epoch_and_restart(tmp_path, checkpoints, start, 300)
    results = _check_resumed(workdir, texts, "data_parallel", 4)
    # Only process 0 wrote files: nothing but its checkpoints and logs.
    assert not list(workdir.glob("**/.tmp-*"))

    import moco_keras  # noqa: F401 (registers MoCo for load_model)

    numpy = keras.ops.convert_to_numpy
    final = keras.saving.load_model(results["checkpoint"])
    # Every step enqueued the whole global batch: 16 steps x 32 keys, mod 96.
    assert int(numpy(final.queue_ptr.value)) == 512 % 96
    for step in (2, 4):
        name = f"ckpt-{step:09d}.keras"
        parallel = keras.saving.load_model(checkpoints / name)
        single = keras.saving.load_model(
            tmp_path / "one" / "checkpoints" / name
        )
        assert int(numpy(parallel.queue_ptr.value)) == step * 32 % 96
        gap = np.abs(numpy(parallel.queue) - numpy(single.queue)).max()
        assert gap < 1e-5, (step, gap)
        for mine, theirs in zip(parallel.weights, single.weights, strict=True):
            gap = np.abs(numpy(mine) - numpy(theirs)).max()
            assert gap < 1e-5, (step, mine.path, gap)

    _lincls_on(workdir, tmp_path, "jax", "--val_limit=500")


def test_several_jax_processes_are_read_from_the_environment(monkeypatch):
    for name in ("JOB_ADDRESSES", "NUM_PROCESSES", "PROCESS_ID"):
        monkeypatch.delenv(f"KERAS_DISTRIBUTION_{name}", raising=False)
    assert not distribute.is_multi_process()
    assert distribute.process_shard() is None  # this test's one process
    monkeypatch.setenv("KERAS_DISTRIBUTION_JOB_ADDRESSES", "h1:1234,h2:1234")
    assert distribute.is_multi_process()
    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", "1")
    assert not distribute.is_multi_process()
    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", "2")
    monkeypatch.delenv("KERAS_DISTRIBUTION_JOB_ADDRESSES")
    with pytest.raises(ValueError, match="KERAS_DISTRIBUTION_JOB_ADDRESSES"):
        distribute._start_jax_processes(0)
