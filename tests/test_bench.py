"""The benchmarks run (at a smoke size) and measure what they claim to.

Each benchmark runs each configuration in a subprocess with its own
KERAS_BACKEND, whatever the suite's backend: the smoke runs take the
TensorFlow configuration and the plain-PyTorch reference, once (the
process tier). The JAX and torch configurations run the same benchmark
code under another KERAS_BACKEND; their MoCo step is tested in-process
under each backend.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from moco_keras import knn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import learning  # noqa: E402


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
        assert record["images_per_s"] > 0
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
