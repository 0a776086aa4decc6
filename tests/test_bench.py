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
from support import fake_fashion_mnist

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
    import tables

    found = tables.sections((tmp_path / "learning.md").read_text())
    header, tables_text = found["learning"].split("\n\n", 1)
    assert tables.HEADER.match(header), header
    assert tables_text.startswith("fmnist-moco-v2")


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.backends("tensorflow")
def test_train_step_benchmark_smoke(tmp_path):
    """The whole step of each configuration in its own process, the table
    written; the parts run in-process below, the parts table is
    `test_train_step_report_...`'s."""
    output = tmp_path / "table.md"
    _run(
        [
            "bench/train_step.py",
            "--model=cifar18",
            f"--configs={','.join(_configs())}",
            "--runs=1",
            "--steps=1",
            "--warmup=1",
            "--batch=32",
            f"--output={output}",
        ],
        timeout=600,
    )
    table = output.read_text()
    rows = {
        row[0].strip(): row
        for row in (line.split("|")[1:-1] for line in table.splitlines())
        if len(row) == 7
    }
    for config in _configs():
        assert float(rows[config][2]) > 0, table  # the median img/s
    assert rows["torch-plain"][4].strip() == "1.00", table  # the baseline
    assert "| config | step ms |" not in table  # no parts asked for


def test_train_step_report_gives_each_part_from_the_medians():
    """The parts table: milliseconds per batch from each part's median speed,
    the rest the step less the query side and the keys."""
    import train_step

    args = train_step.argparse.Namespace(
        model="cifar18",
        batch=100,
        threads=2,
        runs=3,
        steps=5,
        parts="step,supervised,keys",
        configs="torch-plain,jax",
    )

    def runs(*speeds):
        return [
            {"images_per_s": s, "peak_mib": 900.0, "import_mib": 300.0}
            for s in speeds
        ]

    # Images/s; batch 100, so a median of 400 img/s is 250 ms.
    results = {
        ("torch-plain", "step"): runs(390, 400, 1000),
        ("torch-plain", "supervised"): runs(800, 1000, 1000),
        ("torch-plain", "keys"): runs(2000, 2000, 2000),
        ("jax", "step"): runs(200, 100, 300),
        ("jax", "supervised"): runs(500, 500, 500),
        ("jax", "keys"): runs(1000, 1000, 1000),
    }
    lines = train_step.report(args, results).splitlines()
    # min, median, max img/s; the ratio of medians; peak and import MiB.
    torch_row = "| torch-plain | 390.0 | 400.0 | 1000.0 | 1.00 | 900 | 300 |"
    assert torch_row in lines
    assert "| jax | 100.0 | 200.0 | 300.0 | 0.50 | 900 | 300 |" in lines
    # step 250, supervised 100, keys 50: rest 100 ms; jax 500, 200, 100.
    assert "| torch-plain | 250 | 100 | 50 | 100 |" in lines
    assert "| jax | 500 | 200 | 100 | 200 |" in lines


@pytest.mark.backends("torch")
@pytest.mark.parametrize("part", ["step", "supervised", "keys"])
def test_the_plain_pytorch_step_parts_run(part):
    import train_step

    spec = {**gpu.TINY, "batch": 4}
    import torch

    threads = torch.get_num_threads()  # torch_step_fn sets them
    steps = train_step.torch_step_fn("cifar18", spec, threads, part=part)
    assert steps(1) > 0


_GPU_CONFIGS = {
    # Not bf16 or XLA under TensorFlow: on a CPU without bf16 they take
    # minutes at this size.
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
    configurations under its own suite run; the input-pipeline part in the
    TensorFlow suite's run (it is the same on every backend)."""
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
        assert "| CPU half |" in table, table
    else:
        assert "Input pipeline: skipped" in table, table


@pytest.mark.parametrize("part", ["step", "supervised", "keys"])
def test_the_benchmarked_keras_step_compiles_as_the_recipes_do(part):
    """Keras' JAX trainer runs an uncompiled step op by op: the benchmark
    times the compiled one, as `configs.jit_compile` gives the recipes."""
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


def test_tables_write_a_section_in_place_and_a_file_of_its_own(tmp_path):
    import tables

    document = tmp_path / "BENCHMARKS.md"
    document.write_text(
        "# Benchmarks\n\nintro\n\n<!-- begin a -->\nold a\n<!-- end a -->\n\n"
        "between\n\n<!-- begin b -->\nold b\n<!-- end b -->\n\nend\n"
    )
    tables.write(str(document), "a", "| x |\n|---|\n| 1 |")
    text = document.read_text()
    assert "old a" not in text and "old b" in text
    assert text.startswith("# Benchmarks\n\nintro\n\n<!-- begin a -->\n")
    assert text.endswith("<!-- end b -->\n\nend\n") and "\nbetween\n" in text
    found = tables.sections(text)
    assert sorted(found) == ["a", "b"]
    header, blank, *table = found["a"].splitlines()
    match = tables.HEADER.match(header)
    assert match, header
    assert "python " in match["command"]
    assert "cores" in match["machine"] and "keras " in match["machine"]
    assert blank == "" and table == ["| x |", "|---|", "| 1 |"]
    # A new section joins the document's end; the others stay as they were.
    tables.write(str(document), "new", "| z |")
    grown = document.read_text()
    assert grown.startswith(text.rstrip()) and sorted(
        tables.sections(grown)
    ) == ["a", "b", "new"]
    alone = tmp_path / "alone.md"
    tables.write(str(alone), "c", "| y |")
    assert list(tables.sections(alone.read_text())) == ["c"]
    tables.write(None, "c", "nothing")  # no --output: nothing written


def test_every_benchmarks_section_opens_with_command_machine_and_date():
    import tables

    text = open(f"{ROOT}/BENCHMARKS.md").read()
    found = tables.sections(text)
    assert text.count("<!-- begin ") == len(found) >= 8
    for name, body in found.items():
        assert tables.HEADER.match(body.splitlines()[0]), name
        assert "|---" in body, f"{name} holds no table"


def test_suite_benchmark_reads_a_make_test_log():
    import suite

    log = "\n".join(
        [
            "pip noise",
            "=== KERAS_BACKEND=tensorflow",
            "============ slowest 10 durations ============",
            "105.20s call     tests/test_distribute.py::test_multi_worker",
            "21.00s setup    tests/test_recipes.py::test_smoke_run",
            "== 191 passed in 526.10s (0:08:46) ==",
            "=== KERAS_BACKEND=jax",
            "== 1 failed, 155 passed in 343.00s (0:05:43) ==",
        ]
    )
    found = suite.parse(log)
    assert list(found) == ["tensorflow", "jax"]
    assert found["tensorflow"]["seconds"] == 526.1
    assert found["tensorflow"]["summary"] == "191 passed"
    assert found["tensorflow"]["slowest"][0] == (
        105.2,
        "tests/test_distribute.py::test_multi_worker",
    )
    assert found["jax"]["summary"] == "1 failed, 155 passed"
    table = suite.report(found, 1000.0, 0)
    assert "| tensorflow | 8 min 46 s | 191 passed |" in table
    assert "| venv, pip installs, lint, Fashion-MNIST | 2 min 11 s | |" in table
    assert "| total, exit code 0 | 16 min 40 s | |" in table


@pytest.mark.process
@pytest.mark.backends("jax")
def test_health_cost_benchmark_smoke(tmp_path):
    """Both steps run, and the table gives the one with the measures
    against the one without (whose cost is +0.0 % by definition)."""
    output = tmp_path / "table.md"
    _run(
        [
            "bench/health_cost.py",
            "--batch_size=16",
            "--steps=1",
            "--rounds=2",
            f"--output={output}",
        ],
        timeout=600,
    )
    table = output.read_text()
    rows = {
        row[0].strip(): row
        for row in (line.split("|")[1:-1] for line in table.splitlines())
        if len(row) == 4
    }
    assert float(rows["with the measures"][1]) > 0, table
    assert rows["without"][2].strip() == "+0.0 %", table
    assert rows["without"][3].strip() == "+0.0 % to +0.0 %", table
    assert "The measures alone: " in table


@pytest.mark.process
@pytest.mark.backends("torch")
def test_quickstart_v3_benchmark_smoke(tmp_path):
    """The quick start's v3 preset through the benchmark, tiny: its row
    reads the run's results.json (the method from its config)."""
    fake_fashion_mnist(str(tmp_path / "fmnist"))
    output = tmp_path / "table.md"
    _run(
        [
            "bench/quickstart_v3.py",
            "--presets=quickstart_mocov3",
            f"--output={output}",
            "--",
            f"--data_dir={tmp_path / 'fmnist'}",
            "--epochs=1",
            "--warmup_epochs=0",
            "--train_limit=64",
            "--batch_size=32",
            "--width=2",
            "--moco_mlp_dim=32",
            "--knn_k=5",
            "--knn_bank=48",
            "--knn_test=16",
            "--linear_epochs=1",
        ],
        timeout=600,
    )
    table = output.read_text()
    row = next(line for line in table.splitlines() if "| quickstart_" in line)
    cells = [cell.strip() for cell in row.split("|")[1:-1]]
    assert cells[:3] == ["quickstart_mocov3", "MoCo v3", "1"], row
    for cell in cells[3:6]:
        assert 0.0 <= float(cell.rstrip(" %")) <= 100.0, row
    assert float(cells[7]) > 0, row


@pytest.mark.process
@pytest.mark.backends("torch")
def test_float32_step_benchmark_smoke(tmp_path):
    """One seed: the official float32 step and ours (eager, which torch
    runs without compiling), each a gap from the official float64 step well
    under the change itself."""
    output = tmp_path / "table.md"
    _run(
        ["bench/float32_step.py", "--seeds=0", "--modes=eager"]
        + [f"--output={output}"],
        600,
    )
    rows = [
        line.split("|")[1:-1]
        for line in output.read_text().splitlines()
        if line.startswith("| 0 |")
    ]
    assert len(rows) == 1, output.read_text()
    gaps = [float(cell.split()[0]) for cell in rows[0][1:]]
    assert len(gaps) == 2 and all(0 < gap < 1e-2 for gap in gaps), rows
