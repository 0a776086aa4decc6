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
import time

import keras
import numpy as np
import pytest

from moco_keras import distribute

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, *args, **env):
    """Runs `tests/scripts/<script>` in a fresh Python; the JSON of its last
    output line."""
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "scripts", script), *args],
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
            **env,
        },
        capture_output=True,
        text=True,
        # mirrored_step.py and mirrored_v3_step.py take 1-2 min on 2 cores
        # beside the other test process; slower CPUs get several times that.
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def mirrored():
    """[after one step, after three]: single device against 4 replicas."""
    return run_script("mirrored_step.py", KERAS_BACKEND="tensorflow")


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.backends("tensorflow")
@pytest.mark.xdist_group("mirrored")
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
@pytest.mark.xdist_group("mirrored")
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
@pytest.mark.xdist_group("mirrored")
def test_mirrored_replicas_keep_one_queue(mirrored):
    result = mirrored[1]
    assert result["replica_queues"] == 0.0
    assert result["replica_ptrs"] == [48]
    assert result["ptr"] == [48, 48]
    assert result["queue"] < 1e-4
    worst = max(result["weights"], key=result["weights"].get)
    assert result["weights"][worst] < 1e-4, worst


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.backends("tensorflow")
def test_mirrored_recipe_reads_grain_as_one_device_does(tmp_path):
    """The pretraining recipe with grain's batches handed to
    MirroredStrategy (`distribute.grain_to_tf_data`) over 2 CPU devices:
    each replica takes its half of every global batch, and both steps
    equal the same run on one device with split BN of 2 groups."""
    result = run_script(
        "mirrored_grain.py", str(tmp_path), KERAS_BACKEND="tensorflow"
    )
    assert result["devices"] == [2, 1]
    assert result["ptr1"] == [32, 32] and result["ptr2"] == [0, 0]
    for step in ("step1", "step2"):
        gaps = result[step]
        worst = max(gaps, key=gaps.get)
        assert gaps[worst] < 1e-5, (step, worst, gaps[worst])
        assert any("moving_mean" in path for path in gaps)


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.backends("jax")
def test_data_parallel_matches_split_bn_on_one_device():
    """JAX over 4 devices: the split-BN groups are the device shards, so the
    sharded program is shuffle BN, and equals the one-device computation."""
    result = run_script(
        "data_parallel_step.py",
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
        # mirrored_step.py and mirrored_v3_step.py take 1-2 min on 2 cores
        # beside the other test process; slower CPUs get several times that.
        timeout=600,
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
# the global batch of 32, a checkpoint every 2 steps, queue of 96; with
# TensorFlow's import blocked, as on a JAX host: grain reads each process's
# block of every global batch.
JAX_PRETRAIN = [
    f"{ROOT}/tests/scripts/without_tensorflow.py",
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
    then drift apart as rounding differences grow). Both jobs run with
    TensorFlow's import blocked, so grain feeds them. Then the linear
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

    # Step 2 (before the kill at step 6) equals the one-process run within
    # 1e-5 in every variable. By step 4 the weights have parted: a rounding
    # difference switches a discrete choice (likely the stem's max pool
    # taking another of equal values on Fashion-MNIST's flat background; a
    # 1e-7 nudge of the initial weights of the one-process run moves its
    # step 4 as far: conv1 2e-3, queue 8e-5). So step 4 holds what no
    # rounding moves exactly (the queue's place, the two seed generators'
    # states, the optimizer's step count), the keys steps 2 and 3 enqueued
    # within 1e-5 and step 4's own keys within 1e-3.
    for step in (2, 4):
        name = f"ckpt-{step:09d}.keras"
        parallel = keras.saving.load_model(checkpoints / name)
        single = keras.saving.load_model(
            tmp_path / "one" / "checkpoints" / name
        )
        assert int(numpy(parallel.queue_ptr.value)) == step * 32 % 96
        if step == 2:
            for mine, theirs in zip(
                parallel.weights, single.weights, strict=True
            ):
                gap = np.abs(numpy(mine) - numpy(theirs)).max()
                assert gap < 1e-5, (step, mine.path, gap)
            continue
        assert int(numpy(parallel.optimizer.iterations.value)) == step
        assert int(numpy(single.optimizer.iterations.value)) == step
        for generator in ("seed_generator", "augmentation.seed_generator"):
            mine, theirs = parallel, single
            for part in generator.split("."):
                mine, theirs = getattr(mine, part), getattr(theirs, part)
            np.testing.assert_array_equal(
                numpy(mine.state.value), numpy(theirs.state.value), generator
            )
        # Columns 32:96 hold steps 2 and 3's keys, 0:32 step 4's.
        queues = numpy(parallel.queue), numpy(single.queue)
        gap = np.abs(queues[0][:, 32:] - queues[1][:, 32:]).max()
        assert gap < 1e-5, ("steps 2-3 keys", gap)
        gap = np.abs(queues[0][:, :32] - queues[1][:, :32]).max()
        assert gap < 1e-3, ("step 4 keys", gap)

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
