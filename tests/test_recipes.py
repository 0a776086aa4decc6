"""The pretrain and lincls recipes end to end, in subprocesses.

Real Fashion-MNIST subsets (Debian's `dataset-fashion-mnist`, which
`make test` installs) through `recipes/smoke.flags` and
`recipes/lincls_smoke.flags`, and a generated ImageNet-style folder.
"""

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np
import pytest
from absl import app
from PIL import Image

from moco_keras import data
from moco_keras import training
from moco_keras.recipes import common
from moco_keras.recipes import lincls
from moco_keras.recipes import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A smaller smoke run: 4 steps an epoch, a checkpoint every 2 steps.
SMOKE = [
    "--flagfile=recipes/smoke.flags",
    "--train_limit=128",
    "--batch_size=32",
    "--moco_k=128",
    "--knn_every=0",
    "--checkpoint_steps=2",
    "--deterministic",
    "--verbose=0",
]
TIMEOUT = 600
# JAX compiles the same train step in each subprocess; a persistent cache
# shared by this session's runs compiles it once.
JAX_CACHE = tempfile.mkdtemp(prefix="moco-jax-cache-")
atexit.register(shutil.rmtree, JAX_CACHE, ignore_errors=True)
ENV = {
    **os.environ,
    "JAX_COMPILATION_CACHE_DIR": JAX_CACHE,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
}


def run_recipe(recipe, *args, check=True):
    result = subprocess.run(
        [sys.executable, "-m", f"moco_keras.recipes.{recipe}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
        env=ENV,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{recipe} {args} failed ({result.returncode}):\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def weights_of(path):
    """{variable path: array} of a checkpoint, optimizer slots included."""
    import io
    import zipfile

    import h5py

    arrays = {}
    with zipfile.ZipFile(path) as archive:
        with h5py.File(io.BytesIO(archive.read("model.weights.h5"))) as f:
            f.visititems(
                lambda name, item: (
                    arrays.__setitem__(name, item[()])
                    if isinstance(item, h5py.Dataset)
                    else None
                )
            )
    return arrays


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One uninterrupted `recipes/smoke.flags` run (2 epochs, 8 steps)."""
    workdir = str(tmp_path_factory.mktemp("smoke") / "run")
    run_recipe("pretrain", *SMOKE, f"--workdir={workdir}")
    return workdir


def test_smoke_run_writes_the_whole_workdir(smoke_run):
    names = set(os.listdir(smoke_run))
    assert {
        "flags.json",
        "epochs.csv",
        "curves.png",
        "tensorboard",
        "checkpoints",
        "results.json",
    } <= names
    flags = json.load(open(os.path.join(smoke_run, "flags.json")))
    assert flags["moco_k"] == 128 and flags["aug_plus"] and flags["mlp"]
    assert "logtostderr" not in flags  # only the recipe's own flags
    steps = [
        s for s, _ in training.list_checkpoints(f"{smoke_run}/checkpoints")
    ]
    # Newest 3 kept (every 2 steps and at the ends of the 4-step epochs).
    assert steps == [4, 6, 8]
    columns = training.read_csv_log(os.path.join(smoke_run, "epochs.csv"))
    assert columns["epoch"] == [0.0, 1.0]
    assert np.all(np.isfinite(columns["loss"]))
    results = json.load(open(os.path.join(smoke_run, "results.json")))
    assert results["checkpoint"].endswith("ckpt-000000008.keras")


def test_killed_run_resumes_to_the_same_weights(smoke_run, tmp_path):
    workdir = str(tmp_path / "run")
    first = os.path.join(workdir, "checkpoints", "ckpt-000000002.keras")
    process = subprocess.Popen(
        [sys.executable, "-m", "moco_keras.recipes.pretrain", *SMOKE]
        + [f"--workdir={workdir}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=ENV,
    )
    try:
        deadline = time.time() + TIMEOUT
        while not os.path.exists(first) and process.poll() is None:
            assert time.time() < deadline, "no checkpoint within the timeout"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)  # mid-epoch 1 of 2
    finally:
        process.kill()
        process.wait()
    latest = training.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    assert 2 <= latest[1] < 8, latest
    resumed = run_recipe("pretrain", *SMOKE, f"--workdir={workdir}")
    assert f"global step {latest[1]}" in resumed.stdout
    expected = weights_of(f"{smoke_run}/checkpoints/ckpt-000000008.keras")
    actual = weights_of(f"{workdir}/checkpoints/ckpt-000000008.keras")
    assert sorted(expected) == sorted(actual)
    # Model, key encoder, queue, pointer, optimizer slots and iterations:
    # bitwise equal on CPU with deterministic kernels, on every backend.
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], name)
    rows = training.read_csv_log(os.path.join(workdir, "epochs.csv"))
    assert rows["epoch"] == [0.0, 1.0]  # one row per epoch after resuming


def test_lincls_fast_path_agrees_with_the_full_path(smoke_run, tmp_path):
    common_args = [
        "--flagfile=recipes/lincls_smoke.flags",
        f"--pretrained={smoke_run}",
        "--train_limit=512",
        "--epochs=2",
        "--schedule=1",
        "--lr=0.5",
        "--deterministic",
        "--verbose=0",
    ]
    fast, full = str(tmp_path / "fast"), str(tmp_path / "full")
    run_recipe("lincls", *common_args, f"--workdir={fast}")
    run_recipe(
        "lincls", *common_args, "--nocache_features", f"--workdir={full}"
    )
    results = [
        json.load(open(os.path.join(d, "results.json"))) for d in (fast, full)
    ]
    assert results[0]["backbone_unchanged"] and results[1]["backbone_unchanged"]
    assert np.isfinite(results[0]["val_loss"])
    assert abs(results[0]["top1"] - results[1]["top1"]) <= 0.2
    heads = []
    for workdir in (fast, full):
        path, _ = training.latest_checkpoint(f"{workdir}/checkpoints")
        model = keras.saving.load_model(path, compile=False)
        heads.append(model.get_layer("fc").get_weights())
    for a, b in zip(*heads, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-3)


def image_folder(root, rng):
    """ILSVRC-style train/val folders of real Fashion-MNIST JPEGs."""
    images, labels = data.load_fashion_mnist("test")
    for split, count in (("train", 24), ("val", 8)):
        for label in (0, 1, 7):
            directory = os.path.join(root, split, f"n0000000{label}")
            os.makedirs(directory)
            picks = rng.choice(np.flatnonzero(labels == label), count)
            for index in picks:
                image = Image.fromarray(images[index]).resize((40, 40))
                image.convert("RGB").save(
                    os.path.join(directory, f"{index}.JPEG")
                )
    return root


def test_pretrain_then_lincls_on_an_image_folder(tmp_path):
    root = image_folder(str(tmp_path / "ILSVRC2012"), np.random.default_rng(0))
    run = str(tmp_path / "pretrain")
    run_recipe(
        "pretrain",
        "--flagfile=recipes/smoke.flags",
        "--dataset=folder",
        f"--data_dir={root}",
        "--train_limit=0",
        "--batch_size=24",
        "--moco_k=72",
        "--bn_splits=4",
        "--epochs=1",
        "--knn_every=1",
        "--knn_bank=72",
        "--knn_test=24",
        "--verbose=0",
        f"--workdir={run}",
    )
    results = json.load(open(os.path.join(run, "results.json")))
    assert 0.0 <= results["knn_top1"] <= 1.0
    evaluation = str(tmp_path / "lincls")
    out = run_recipe(
        "lincls",
        "--flagfile=recipes/lincls_smoke.flags",
        "--dataset=folder",
        f"--data_dir={root}",
        "--train_limit=0",
        "--batch_size=24",
        "--epochs=1",
        "--schedule=",
        "--lr=0.5",
        "--train_augment",
        "--nocache_features",
        f"--pretrained={run}",
        f"--workdir={evaluation}",
    )
    assert "the backbone is unchanged" in out.stdout
    results = json.load(open(os.path.join(evaluation, "results.json")))
    assert results["val_images"] == 24
    assert 0.0 <= results["top1"] <= results["top5"] <= 100.0
    assert results["pretrained"].endswith("ckpt-000000003.keras")


# --- Flags: contradictions are refused before any data is read. -----------


def defaults(**overrides):
    modules = (common.__name__, pretrain.__name__, lincls.__name__)
    values = {
        flag.name: flag.default
        for module in modules
        for flag in common.FLAGS.get_flags_for_module(module)
    }
    values.update(workdir="/tmp/unused", data_dir="/data")
    values.update(overrides)
    return values


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"moco_k": 1000}, "not divisible by the global --batch_size=256"),
        ({"bn_splits": 3}, "does not divide the global batch"),
        ({"cpu_devices": -1}, "--cpu_devices must be >= 0"),
        ({"schedule": ["120", "250"]}, r"milestones \[250\]"),
        ({"dataset": "cifar10"}, "Unknown --dataset='cifar10'"),
        ({"data_dir": None}, "--dataset=folder needs --data_dir"),
        ({"workdir": None}, "--workdir is required"),
        ({"lr": float("nan")}, "--lr must be a finite number"),
        ({"arch": "cifar_resnet18"}, "with small images"),
    ],
)
def test_pretrain_flag_contradictions(overrides, message):
    with pytest.raises(app.UsageError, match=message):
        pretrain.check_flags(defaults(**overrides))


def test_strategy_of_another_backend_is_refused():
    backend = keras.backend.backend()
    other = "data_parallel" if backend == "tensorflow" else "mirrored"
    with pytest.raises(app.UsageError, match=f"this process runs {backend}"):
        pretrain.check_flags(defaults(strategy=other))
    with pytest.raises(app.UsageError, match="Unknown strategy 'horovod'"):
        pretrain.check_flags(defaults(strategy="horovod"))


def test_batch_and_bn_groups_must_split_over_the_devices():
    common.check_devices(defaults(batch_size=256, bn_splits=8), 8)
    common.check_devices(defaults(batch_size=256, bn_splits=8), 4)
    with pytest.raises(app.UsageError, match="does not split over 3 devices"):
        common.check_devices(defaults(batch_size=256, bn_splits=8), 3)
    with pytest.raises(app.UsageError, match="must be a multiple of 16"):
        common.check_devices(defaults(batch_size=256, bn_splits=8), 16)


def test_valid_flags_pass_and_cos_ignores_the_schedule():
    assert pretrain.check_flags(defaults()) == [120, 160]
    pretrain.check_flags(defaults(cos=True, schedule=["500"]))
    assert lincls.check_flags(
        defaults(schedule=["60", "80"], epochs=100, train_augment=False)
    ) == [60, 80]
    with pytest.raises(app.UsageError, match="--notrain_augment"):
        lincls.check_flags(defaults(cache_features=True, train_augment=True))


def test_bad_flags_exit_before_reading_data(tmp_path):
    workdir = tmp_path / "never"
    result = run_recipe(
        "pretrain",
        "--moco_k=1000",
        "--data_dir=/nonexistent",
        f"--workdir={workdir}",
        check=False,
    )
    assert result.returncode != 0
    assert "--moco_k=1000 is not divisible" in result.stderr
    assert not workdir.exists()
    result = run_recipe("pretrain", "--arch=vgg16", check=False)
    assert result.returncode != 0 and "arch" in result.stderr


def test_pretrained_must_be_a_moco_checkpoint(tmp_path):
    with pytest.raises(app.UsageError, match="does not exist"):
        lincls.resolve_pretrained(str(tmp_path / "missing.keras"))
    with pytest.raises(app.UsageError, match="without MoCo checkpoints"):
        lincls.resolve_pretrained(str(tmp_path))
    text = tmp_path / "notes.keras"
    text.write_text("not a zip")
    with pytest.raises(app.UsageError, match="is not a MoCo checkpoint"):
        lincls.load_backbone(str(text))
    inputs = keras.Input((4,))
    plain = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    plain.save(tmp_path / "plain.keras")
    with pytest.raises(app.UsageError, match="holds a Functional, not a MoCo"):
        lincls.load_backbone(str(tmp_path / "plain.keras"))
