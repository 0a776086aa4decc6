"""The benchmarks run (at a smoke size) and measure what they claim to.

Each benchmark runs each configuration in a subprocess with its own
KERAS_BACKEND, whatever the suite's backend: the smoke runs take the
TensorFlow configuration and the plain-PyTorch reference, once (the
process tier). The JAX and torch configurations run the same benchmark
code under another KERAS_BACKEND; their MoCo step is tested in-process
under each backend.
"""

import json
import subprocess
import sys

# bench/ is on pytest's path (pyproject.toml), as on a script's of its own.
import gpu
import keras
import learning
import numpy as np
import pytest
from support import ROOT

from moco_keras import knn


def _configs():
    return ["tensorflow", "torch-plain"]


def _run(args, timeout):
    out = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def test_learning_knn_equals_the_library_knn():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 16))
    bank_labels = rng.integers(0, 5, 300)
    test_labels = rng.integers(0, 5, 120)
    bank = centers[bank_labels] + rng.normal(size=(300, 16))
    test = centers[test_labels] + rng.normal(size=(120, 16))
    ours = learning.knn_top1(bank, bank_labels, test, test_labels, 20, 0.1, 5)
    library = 100 * knn.knn_accuracy(
        knn.flatten_normalize(bank),
        bank_labels,
        knn.flatten_normalize(test),
        test_labels,
        5,
        k=20,
        t=0.1,
    )
    assert ours == pytest.approx(library)
    assert ours > 50  # five well separated clusters, chance is 20 %


def test_learning_eval_epochs():
    assert learning.eval_epochs({"epochs": 8, "eval_every": 2}) == [
        0,
        2,
        4,
        6,
        8,
    ]
    assert learning.eval_epochs({"epochs": 3, "eval_every": 2}) == [0, 2, 3]


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.backends("tensorflow")
def test_learning_benchmark_smoke(tmp_path):
    configs = _configs()
    stdout = _run(
        [
            "bench/learning.py",
            f"--configs={','.join(configs)}",
            f"--output={tmp_path}",
            "--train_images=512",
            "--epochs=1",
            "--eval_every=1",
            "--bank=2000",
            "--test=400",
        ],
        timeout=600,
    )
    assert "shrunk" in stdout
    result = json.loads((tmp_path / "learning.json").read_text())
    assert [r["config"] for r in result["records"]] == configs
    assert 10 < result["raw_pixels"] <= 100  # ten classes
    for record in result["records"]:
        epochs = record["epochs"]
        assert [e["epoch"] for e in epochs] == [0, 1]
        for entry in epochs:
            assert 0 <= entry["knn_backbone"] <= 100
            assert 0 <= entry["knn_head"] <= 100
        # InfoNCE with K 4096 negatives: positive, at most about ln(K + 1)
        # (8.3) while the encoder has not learnt.
        for entry in epochs[1:]:
            assert 0 < entry["loss"] < 9.0
        # The speed is the images of the epoch's whole batches over the
        # training time, which excludes the evaluations.
        batch = result["protocol"]["batch_size"]
        images = record["images_per_s"] * record["train_seconds"]
        assert images == pytest.approx(512 // batch * batch)
        assert 0 < record["train_seconds"] < record["wall_seconds"]
        assert record["peak_mib"] > 100
        # The kNN of a random CIFAR ResNet on Fashion-MNIST is far above
        # chance: a broken evaluation (labels misaligned) would not be.
        assert epochs[0]["knn_backbone"] > 40
    assert (tmp_path / "learning.png").stat().st_size > 10_000
    assert (tmp_path / "learning.md").read_text().startswith("fmnist-moco-v2")


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.backends("tensorflow")
def test_train_step_benchmark_smoke(tmp_path):
    output = tmp_path / "table.md"
    _run(
        [
            "bench/train_step.py",
            "--model=cifar18",
            f"--configs={','.join(_configs())}",
            "--parts=step,supervised,keys",
            "--runs=1",
            "--steps=1",
            "--warmup=1",
            "--batch=32",
            f"--output={output}",
        ],
        timeout=600,
    )
    table = output.read_text()
    for config in _configs():
        assert f"| {config} |" in table
    # The parts table: step, supervised, keys and the rest for each config.
    parts = [line for line in table.splitlines() if line.count("|") == 6]
    assert len(parts) == len(_configs()) + 2


_GPU_CONFIGS = {
    # bf16 (emulated on CPUs without it) and XLA took 135 and 270 s here.
    "tensorflow": "tensorflow-fp32",
    "jax": "jax-fp32,jax-bf16",
    "torch": "torch-plain-fp32,torch-plain-bf16,torch-fp32,torch-bf16",
}


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.parametrize(
    "backend",
    [pytest.param(b, marks=pytest.mark.backends(b)) for b in _GPU_CONFIGS],
)
def test_gpu_benchmark_tiny(tmp_path, backend):
    """`make bench-gpu`'s script at a toy size on the CPU, each backend's
    configurations under its own suite run; the input-pipeline part only
    where TensorFlow is (its tf.data pipelines need it)."""
    output = tmp_path / "gpu.md"
    configs = _GPU_CONFIGS[backend].split(",")
    pipeline = backend == "tensorflow"
    _run(
        [
            "bench/gpu.py",
            "--tiny",
            f"--configs={','.join(configs)}",
            "--steps=2",
            "--warmup=1",
            f"--pipeline_seconds={1 if pipeline else 0}",
            # One whole batch of 32 (the pipeline drops a partial one).
            "--pipeline_files=32",
            f"--output={output}",
        ],
        timeout=600,
    )
    table = output.read_text()
    rows = [line.split("|")[1:-1] for line in table.splitlines()]
    steps = {}
    for row in rows:
        if len(row) == 6 and row[0].strip() in configs:
            steps.setdefault(row[0].strip(), []).append(row)
    assert sorted(steps) == sorted(configs), table
    for found in steps.values():
        # The papers' batch and the largest, each with a positive speed.
        assert [int(r[1]) for r in found] == [4, 8], table
        for row in found:
            # pairs/s is the batch over the step time, as printed (to 0.1).
            batch, rate, step_ms = (float(row[i]) for i in (1, 2, 3))
            expected = 1000 * batch / step_ms
            assert rate == pytest.approx(expected, rel=0.01, abs=0.06), table
            assert float(row[5].split()[0]) > 0, table
    if backend == "torch":
        # Keras' torch backend against plain PyTorch, same precision: the
        # ratio of the two rows' pairs/s.
        for ours, plain in zip(
            steps["torch-fp32"], steps["torch-plain-fp32"], strict=True
        ):
            # The table's ratio is from the unrounded speeds, rounded to 0.01;
            # the printed pairs/s are each rounded to 0.1. So the printed
            # ratio lies within the bounds those roundings allow.
            rate, plain_rate = float(ours[2]), float(plain[2])
            low = (rate - 0.05) / (plain_rate + 0.05) - 0.005
            high = (rate + 0.05) / (plain_rate - 0.05) + 0.005
            assert low <= float(ours[4]) <= high, table
    if pipeline:
        assert "| split path, CPU half |" in table, table
        assert "| split path, CPU half, --noantialias |" in table, table
    else:
        assert "Input pipeline: skipped" in table, table


@pytest.mark.parametrize("part", ["step", "supervised", "keys"])
def test_the_benchmarked_keras_step_compiles_as_the_recipes_do(part):
    """Keras' JAX trainer runs an uncompiled step op by op: the benchmark
    times the compiled one, as `runs.jit_compile` gives the recipes."""
    import train_step

    spec = {**gpu.TINY, "batch": 4}
    steps = train_step.keras_step_fn("cifar18", spec, 0, jit=False, part=part)
    jax = keras.backend.backend() == "jax"
    assert steps.model.jit_compile == jax
    steps(1)  # and it runs


def test_gpu_benchmark_skips_what_is_not_installed(monkeypatch):
    monkeypatch.setattr(
        gpu.importlib.util,
        "find_spec",
        lambda name: None if name == "tensorflow" else object(),
    )
    assert not gpu.installed("tensorflow-xla-bf16")
    assert gpu.installed("jax-bf16")
    assert gpu.installed("torch-plain-fp32")
    assert gpu.backend_of("tensorflow-xla-fp32") == "tensorflow"
    assert gpu.backend_of("torch-plain-bf16") == "torch"
