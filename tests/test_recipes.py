"""The pretrain and lincls recipes end to end, in subprocesses.

Real Fashion-MNIST subsets (Debian's `dataset-fashion-mnist`, which
`make test` installs) through `recipes/smoke.flags` and
`recipes/lincls_smoke.flags`, and a generated ImageNet-style folder.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from PIL import Image
from support import fake_fashion_mnist
from support import parsed_flags
from support import recipe_defaults as defaults
from support import tensorboard_events

from moco_keras import configs
from moco_keras import datasets
from moco_keras import health
from moco_keras import pretraining
from moco_keras import sources
from moco_keras import training
from moco_keras import views
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
    "--log_every_steps=3",
    "--deterministic",
    "--verbose=0",
]
TIMEOUT = 600
# The recipes compile alike train steps: the suite's JAX compilation cache
# (conftest.py) is in os.environ, so they compile each once.
ENV = {
    **os.environ,
    # The killed-run test compares weights bit for bit: TensorFlow's oneDNN
    # kernels (the package's default) broke that under --deterministic on
    # an AVX2 AMD EPYC (2 runs in 3 off by up to 5e-5; with oneDNN off it
    # passed).
    "TF_ENABLE_ONEDNN_OPTS": "0",
}


def recipe_command(recipe, without_tensorflow=False):
    """The command line of a recipe; `without_tensorflow`: with `import
    tensorflow` blocked, as on a host without it."""
    module = f"moco_keras.recipes.{recipe}"
    if without_tensorflow:
        script = os.path.join(ROOT, "tests", "scripts", "without_tensorflow.py")
        return [sys.executable, script, module]
    return [sys.executable, "-m", module]


def run_recipe(recipe, *args, check=True, without_tensorflow=False):
    result = subprocess.run(
        [*recipe_command(recipe, without_tensorflow), *args],
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


@pytest.mark.process
@pytest.mark.backends("tensorflow")
@pytest.mark.xdist_group("smoke_run")
def test_smoke_run_writes_the_whole_workdir(smoke_run):
    names = set(os.listdir(smoke_run))
    assert {
        "config.json",
        "epochs.csv",
        "curves.png",
        "tensorboard",
        "checkpoints",
        "results.json",
    } <= names
    config = json.load(open(os.path.join(smoke_run, "config.json")))
    flags = common.flag_values(config)
    # Given on the command line, in smoke.flags, and only in the preset
    # (quickstart's, which smoke.flags names: its crops of half the image).
    assert flags["moco_k"] == 128 and flags["width"] == 4
    assert flags["crop_min"] == 0.5 and flags["moco_t"] == 0.2
    assert flags["aug_plus"] and flags["mlp"] and not flags["blur"]
    # The preset's sections, nothing of absl's own flags (--logtostderr).
    assert sorted(config) == sorted(pretrain.PRESETS["quickstart"])
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
    # TensorBoard: the epoch means, the steps' numbers and lr every 3 steps,
    # and one grid of 8 view pairs of 28 x 28 crops.
    events = tensorboard_events(os.path.join(smoke_run, "tensorboard", "train"))
    assert [step for step, _ in events["epoch_loss"]] == [0, 1]
    for tag in ("step/loss", "step/acc1", "step/lr"):
        assert [step for step, _ in events[tag]] == [3, 6], tag
    # The features' health, every 3 steps and per epoch (health.HEALTH).
    for name in ("alignment", "uniformity", "q_std", "l_pos", "l_neg"):
        assert [step for step, _ in events[f"step/{name}"]] == [3, 6], name
        assert [step for step, _ in events[f"epoch_{name}"]] == [0, 1], name
        assert np.all(np.isfinite(columns[name])), name
    assert -4.0 <= events["epoch_uniformity"][-1][1] <= 0.0
    assert 0 < events["step/lr"][0][1] <= flags["lr"]
    assert events["views/pairs"] == [(0, (8 * 28, 2 * 28))]


@pytest.mark.process
@pytest.mark.backends("tensorflow")
@pytest.mark.xdist_group("smoke_run")
def test_killed_run_resumes_to_the_same_weights(smoke_run, tmp_path):
    check_killed_run_resumes(smoke_run, str(tmp_path / "run"), SMOKE)


def check_killed_run_resumes(uninterrupted, workdir, args, **kwargs):
    """Kills `pretrain args` with SIGKILL after its step-2 checkpoint, reruns
    it, and checks its step-8 checkpoint against `uninterrupted`'s."""
    first = os.path.join(workdir, "checkpoints", "ckpt-000000002.keras")
    process = subprocess.Popen(
        [*recipe_command("pretrain", **kwargs), *args, f"--workdir={workdir}"],
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
    resumed = run_recipe("pretrain", *args, f"--workdir={workdir}", **kwargs)
    assert f"global step {latest[1]}" in resumed.stdout
    expected = weights_of(f"{uninterrupted}/checkpoints/ckpt-000000008.keras")
    actual = weights_of(f"{workdir}/checkpoints/ckpt-000000008.keras")
    assert sorted(expected) == sorted(actual)
    # Model, key encoder, queue, pointer, optimizer slots and iterations:
    # bitwise equal on CPU with deterministic kernels.
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], name)
    rows = training.read_csv_log(os.path.join(workdir, "epochs.csv"))
    assert rows["epoch"] == [0.0, 1.0]  # one row per epoch after resuming


@pytest.mark.process
@pytest.mark.backends("tensorflow")
@pytest.mark.xdist_group("smoke_run")
def test_rerun_with_other_values_stops_and_more_epochs_resume(
    smoke_run, tmp_path
):
    workdir = str(tmp_path / "run")
    shutil.copytree(smoke_run, workdir)
    refused = run_recipe(
        "pretrain",
        *SMOKE,
        "--moco_k=256",
        "--width=8",
        f"--workdir={workdir}",
        check=False,
    )
    assert refused.returncode != 0
    assert "--moco_k: 128 in its config.json, 256 now" in refused.stderr
    assert "--width: 4 in its config.json, 8 now" in refused.stderr
    assert "Traceback" not in refused.stderr + refused.stdout
    config = json.load(open(f"{workdir}/config.json"))
    assert config["model"]["queue_size"] == 128
    # One more epoch (4 steps) from the finished run's step 8.
    resumed = run_recipe(
        "pretrain", *SMOKE, "--epochs=3", f"--workdir={workdir}"
    )
    assert "global step 8" in resumed.stdout
    steps = [s for s, _ in training.list_checkpoints(f"{workdir}/checkpoints")]
    assert steps[-1] == 12
    config = json.load(open(f"{workdir}/config.json"))
    assert config["schedule"]["epochs"] == 3


@pytest.mark.process
@pytest.mark.backends("tensorflow")
@pytest.mark.xdist_group("smoke_run")
def test_lincls_fast_path_agrees_with_the_full_path(smoke_run, tmp_path):
    common_args = [
        "--flagfile=recipes/lincls_smoke.flags",
        f"--pretrained={smoke_run}",
        "--train_limit=512",
        "--val_limit=2000",
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
    assert results[0]["val_images"] == results[1]["val_images"] == 2000
    assert abs(results[0]["top1"] - results[1]["top1"]) <= 0.2
    # Every epoch evaluated, as main_lincls.py does, and the best kept.
    for fast_epoch, full_epoch in zip(
        results[0]["epochs"], results[1]["epochs"], strict=True
    ):
        assert abs(fast_epoch["top1"] - full_epoch["top1"]) <= 0.2
    assert [score["epoch"] for score in results[0]["epochs"]] == [1, 2]
    assert results[0]["epochs"][-1]["top1"] == results[0]["top1"]
    best = max(results[0]["epochs"], key=lambda score: score["top1"])
    assert results[0]["best"] == best
    heads = []
    for workdir in (fast, full):
        path, _ = training.latest_checkpoint(f"{workdir}/checkpoints")
        model = keras.saving.load_model(path, compile=False)
        heads.append(model.get_layer("fc").get_weights())
    for a, b in zip(*heads, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-3)


@pytest.mark.process
@pytest.mark.backends("jax", "torch")
def test_recipes_run_without_tensorflow_and_resume_a_killed_run(tmp_path):
    # The whole package and both recipes with `import tensorflow` blocked.
    args = [*SMOKE, "--knn_every=1", "--knn_bank=128", "--knn_test=64"]
    uninterrupted = str(tmp_path / "uninterrupted")
    out = run_recipe(
        "pretrain", *args, f"--workdir={uninterrupted}", without_tensorflow=True
    )
    assert "No TensorBoard logs" in out.stdout
    assert not os.path.exists(os.path.join(uninterrupted, "tensorboard"))
    assert os.path.exists(os.path.join(uninterrupted, "curves.png"))
    results = json.load(open(os.path.join(uninterrupted, "results.json")))
    assert 0.0 <= results["knn_top1"] <= 1.0
    assert np.isfinite(results["final_loss"])
    check_killed_run_resumes(
        uninterrupted, str(tmp_path / "killed"), args, without_tensorflow=True
    )
    lincls = str(tmp_path / "lincls")
    out = run_recipe(
        "lincls",
        "--flagfile=recipes/lincls_smoke.flags",
        "--train_limit=512",
        "--val_limit=512",
        "--epochs=1",
        "--schedule=",
        f"--pretrained={uninterrupted}",
        f"--workdir={lincls}",
        without_tensorflow=True,
    )
    assert "ran out of data" not in out.stderr
    results = json.load(open(os.path.join(lincls, "results.json")))
    assert results["val_images"] == 512
    assert 0.0 <= results["top1"] <= results["top5"] <= 100.0


def image_folder(root, rng):
    """ILSVRC-style train/val folders of real Fashion-MNIST JPEGs."""
    images, labels = datasets.load_fashion_mnist("test")
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


@pytest.mark.process
@pytest.mark.backends("torch")
def test_pretrain_then_lincls_on_an_image_folder(tmp_path):
    # Without TensorFlow, as a PyTorch host runs it.
    root = image_folder(str(tmp_path / "ILSVRC2012"), np.random.default_rng(0))
    run = str(tmp_path / "pretrain")
    out = run_recipe(
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
        without_tensorflow=True,
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
        without_tensorflow=True,
    )
    assert "The backbone is unchanged (checked against the checkpoint" in (
        out.stdout
    )
    assert " * Epoch 1: Acc@1 " in out.stdout  # main_lincls.py's line
    results = json.load(open(os.path.join(evaluation, "results.json")))
    assert results["val_images"] == 24
    assert 0.0 <= results["top1"] <= results["top5"] <= 100.0
    assert results["epochs"] == [
        {
            "epoch": 1,
            **{k: results[k] for k in ("top1", "top5")},
            "loss": (results["val_loss"]),
        }
    ]
    assert results["best"] == results["epochs"][0]
    assert results["pretrained"].endswith("ckpt-000000003.keras")


# MoCo v3's smoke run: the quick start's v3 preset at smoke.flags' size.
SMOKE_MOCOV3 = [
    "--preset=quickstart_mocov3",
    "--width=4",
    "--moco_mlp_dim=64",
    "--train_limit=128",
    "--batch_size=32",
    "--epochs=2",
    "--knn_every=0",
    "--checkpoint_steps=2",
    "--log_every_steps=3",
    "--deterministic",
    "--verbose=0",
]


@pytest.mark.process
@pytest.mark.backends("torch")
def test_killed_mocov3_run_resumes_to_the_same_weights(tmp_path):
    uninterrupted = str(tmp_path / "uninterrupted")
    out = run_recipe("pretrain", *SMOKE_MOCOV3, f"--workdir={uninterrupted}")
    assert "MoCo v3 pretraining: 128 images" in out.stdout
    # The momentum's cosine and the lr's warm-up follow the global step, so
    # that a resumed run takes them up where the killed one left them.
    check_killed_run_resumes(
        uninterrupted, str(tmp_path / "killed"), SMOKE_MOCOV3
    )


@pytest.mark.process
@pytest.mark.parametrize(
    "flagfile, lincls_flagfile, without_tensorflow",
    [
        # "": the linear recipe without --preset, which takes the run's.
        pytest.param(
            "mocov3_r50.flags",
            "",
            False,
            marks=pytest.mark.backends("torch"),
        ),
        pytest.param(
            "mocov3_vit_small.flags",
            "lincls_mocov3_vit.flags",
            True,
            marks=pytest.mark.backends("jax"),
        ),
        pytest.param(
            "mocov3_vit_base.flags",
            None,
            False,
            marks=pytest.mark.backends("tensorflow"),
        ),
    ],
)
def test_mocov3_recipes_run_a_step_then_the_linear_protocol(
    flagfile, lincls_flagfile, without_tensorflow, tmp_path
):
    """Each ImageNet v3 recipe on an ImageNet-style folder at 32 px, one
    step (the encoders at full size, the heads' hidden layers small), then
    its linear protocol on the checkpoint (from its flagfile, or chosen by
    the run's method); one backend each."""
    root = image_folder(str(tmp_path / "ILSVRC2012"), np.random.default_rng(0))
    run = str(tmp_path / "pretrain")
    tiny = ["--width=8"] if "r50" in flagfile else []
    out = run_recipe(
        "pretrain",
        f"--flagfile=recipes/{flagfile}",
        f"--data_dir={root}",
        *tiny,
        "--image_size=32",
        "--batch_size=8",
        "--train_limit=8",
        "--epochs=1",
        "--warmup_epochs=0",
        "--moco_mlp_dim=32",
        "--knn_every=0",
        "--verbose=0",
        f"--workdir={run}",
        without_tensorflow=without_tensorflow,
    )
    assert "MoCo v3 pretraining: 8 images, 1 epochs of 1 steps" in out.stdout
    results = json.load(open(os.path.join(run, "results.json")))
    assert np.isfinite(results["final_loss"])
    config = json.load(open(os.path.join(run, "config.json")))
    _, expected = flagfile_config(pretrain, flagfile)
    assert config["optimizer"]["name"] == expected["optimizer"]["name"]
    assert config["encoder"]["arch"] == expected["encoder"]["arch"]
    if lincls_flagfile is None:
        return
    evaluation = str(tmp_path / "lincls")
    preset = (
        [f"--flagfile=recipes/{lincls_flagfile}"] if lincls_flagfile else []
    )
    out = run_recipe(
        "lincls",
        *preset,
        f"--data_dir={root}",
        "--image_size=32",
        "--batch_size=24",
        "--epochs=1",
        f"--pretrained={run}",
        f"--workdir={evaluation}",
        without_tensorflow=without_tensorflow,
    )
    assert "The backbone is unchanged" in out.stdout
    if not lincls_flagfile:
        assert (
            "Linear protocol: --preset=mocov3, from the pretraining run's "
            "method (MoCo v3, resnet50)." in out.stdout
        )
        lincls = json.load(open(os.path.join(evaluation, "config.json")))
        assert (
            lincls["schedule"]["epochs"] == 1 and lincls["schedule"]["cosine"]
        )
        assert lincls["optimizer"]["lr_batch_size"] == 256
    results = json.load(open(os.path.join(evaluation, "results.json")))
    assert results["val_images"] == 24
    assert 0.0 <= results["top1"] <= results["top5"] <= 100.0


# --- Flags: contradictions are refused before any data is read. -----------


@pytest.mark.process
@pytest.mark.backends("torch")
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


@pytest.mark.process
@pytest.mark.backends("tensorflow")
def test_importing_the_package_turns_tensorflows_onednn_on():
    # TensorFlow reads TF_ENABLE_ONEDNN_OPTS when it is imported; the
    # recipes import moco_keras first. A value the user set is kept.
    code = (
        "import os, moco_keras, tensorflow; "
        "print(os.environ['TF_ENABLE_ONEDNN_OPTS'])"
    )
    env = {k: v for k, v in ENV.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**env, "KERAS_BACKEND": "torch"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    assert result.stdout.split() == ["1"]
    assert "oneDNN custom operations are on" in result.stderr


@pytest.mark.process
@pytest.mark.backends("torch")
def test_a_missing_or_empty_data_dir_ends_with_its_message(tmp_path):
    result = run_recipe(
        "pretrain",
        "--dataset=folder",
        f"--data_dir={tmp_path / 'nowhere'}",
        f"--workdir={tmp_path / 'run'}",
        check=False,
    )
    assert result.returncode != 0
    assert "No data directory at" in result.stderr
    assert "ROOT/train/n01440764/" in result.stderr  # the expected layout
    assert "Traceback" not in result.stderr + result.stdout
    os.makedirs(tmp_path / "empty" / "train")
    os.makedirs(tmp_path / "no_images" / "train" / "n01440764")
    for path, message in (
        (tmp_path / "empty", "has no class sub-folders"),
        (tmp_path / "no_images", "class folder.s. of .*train.*hold no image"),
        (tmp_path / "nowhere", "No data directory at"),
    ):
        with pytest.raises(configs.ConfigError, match=message):
            sources.load_source("folder", str(path), "train")


def flagfile_config(recipe, flagfile):
    """What `--flagfile=recipes/<flagfile>` resolves to in `recipe`: the
    file's preset (else the recipe's) and its config with the file's other
    flags (includes expanded by absl) in place, without touching the
    process's parsed flags."""
    args = common.FLAGS.read_flags_from_files(
        [f"--flagfile={ROOT}/recipes/{flagfile}"], force_gnu=True
    )
    given = {}
    for arg in args:
        name, _, text = arg[2:].partition("=")
        if not text and name not in common.FLAGS:
            name, text = name[2:], "false"  # --noNAME
        parser = common.FLAGS[name]
        given[name] = parser.parser.parse(text or "true")
    preset = given.pop("preset", recipe.DEFAULT_PRESET)
    given = {"workdir": None, "data_dir": None, **given}
    return preset, defaults(recipe.PRESETS, preset, **given)


# The ImageNet recipes against the papers (arXiv 1911.05722, 2003.04297) and
# the official code (facebookresearch/moco `main_moco.py`, `main_lincls.py`).
MOCOV1 = {
    "arch": "resnet50",
    "dataset": "folder",
    "image_size": 224,
    "epochs": 200,
    "batch_size": 256,
    "lr": 0.03,
    "lr_batch_size": 0,
    "schedule": [120, 160],
    "cos": False,
    "momentum": 0.9,
    "wd": 1e-4,
    "moco_dim": 128,
    "moco_k": 65536,
    "moco_m": 0.999,
    "moco_t": 0.07,
    "mlp": False,
    "aug_plus": False,
    "blur": True,
    "crop_min": 0.2,
    "bn_splits": 8,
    "width": 64,
    "train_limit": 0,
    "crop_fraction": 0.875,
}
MOCOV2 = {**MOCOV1, "mlp": True, "aug_plus": True, "cos": True, "moco_t": 0.2}
LINCLS = {
    "dataset": "folder",
    "image_size": 224,
    "epochs": 100,
    "batch_size": 256,
    "lr": 30.0,
    "lr_batch_size": 0,
    "schedule": [60, 80],
    "cos": False,
    "momentum": 0.9,
    "wd": 0.0,
    "train_augment": True,
    "cache_features": False,
    "train_limit": 0,
    "crop_fraction": 0.875,
}


@pytest.mark.parametrize(
    "recipe, flagfile, expected",
    [
        (pretrain, "mocov1.flags", MOCOV1),
        (pretrain, "mocov2.flags", MOCOV2),
        (lincls, "lincls.flags", LINCLS),
    ],
)
def test_imagenet_flagfiles_hold_the_papers_values(recipe, flagfile, expected):
    _, config = flagfile_config(recipe, flagfile)
    values = common.flag_values(config)
    assert {name: values[name] for name in expected} == expected
    text = open(os.path.join(ROOT, "recipes", flagfile)).read()
    # Each opens with the command, the hardware, the time and the target.
    assert text.startswith("# ") and "python -m moco_keras.recipes." in text
    for word in ("Hardware", "Time", "Expected"):
        assert word in text.split("\n--")[0], (flagfile, word)
    if recipe is lincls:
        augmentation = views.linear_augmentation(224, (0,) * 3, (1,) * 3)
        assert augmentation["scale"] == (0.08, 1.0)
        return
    augmentation = pretraining.augmentation_config(config)
    assert augmentation["size"] == 224
    assert augmentation["scale"] == (0.2, 1.0)
    assert augmentation["mean"] == (0.485, 0.456, 0.406)
    assert augmentation["std"] == (0.229, 0.224, 0.225)
    assert augmentation["grayscale_p"] == 0.2 and augmentation["flip"]
    if values["aug_plus"]:
        assert augmentation["jitter"] == (0.4, 0.4, 0.4, 0.1)
        assert augmentation["jitter_p"] == 0.8
        assert not augmentation["grayscale_first"]
        assert augmentation["blur_p"] == 0.5
        assert augmentation["blur_sigma"] == (0.1, 2.0)
    else:
        assert augmentation["jitter"] == (0.4, 0.4, 0.4, 0.4)
        assert augmentation["jitter_p"] == 1.0
        assert augmentation["grayscale_first"]
        assert augmentation["blur_p"] == 0.0


# The MoCo v3 recipes against facebookresearch/moco-v3 (`main_moco.py`'s
# defaults, CONFIG.md's commands, `main_lincls.py`).
MOCOV3_R50 = {
    "arch": "resnet50",
    "width": 64,
    "dataset": "folder",
    "image_size": 224,
    "epochs": 100,
    "warmup_epochs": 10,
    "batch_size": 4096,
    "optimizer": "lars",
    "lr": 0.6,
    "lr_batch_size": 256,
    "momentum": 0.9,
    "wd": 1e-6,
    "moco_dim": 256,
    "moco_mlp_dim": 4096,
    "moco_m": 0.99,
    "moco_m_cos": True,
    "moco_t": 1.0,
    "crop_min": 0.2,
    "blur": True,
}
MOCOV3_VIT = {
    **{k: v for k, v in MOCOV3_R50.items() if k not in ("width", "momentum")},
    "arch": "vit_small",
    "stop_grad_conv1": True,
    "epochs": 300,
    "warmup_epochs": 40,
    "optimizer": "adamw",
    "lr": 1.5e-4,
    "wd": 0.1,
    "moco_t": 0.2,
    "crop_min": 0.08,
}
LINCLS_MOCOV3 = {
    **LINCLS,
    "batch_size": 1024,
    "lr": 0.1,
    "lr_batch_size": 256,
    "epochs": 90,
    "schedule": [],
    "cos": True,
}


@pytest.mark.parametrize(
    "recipe, flagfile, expected",
    [
        (pretrain, "mocov3_r50.flags", MOCOV3_R50),
        (pretrain, "mocov3_vit_small.flags", MOCOV3_VIT),
        (pretrain, "mocov3_vit_base.flags", {**MOCOV3_VIT, "arch": "vit_base"}),
        (lincls, "lincls_mocov3.flags", LINCLS_MOCOV3),
        (lincls, "lincls_mocov3_vit.flags", {**LINCLS_MOCOV3, "lr": 3.0}),
    ],
)
def test_mocov3_flagfiles_hold_the_official_values(recipe, flagfile, expected):
    preset, config = flagfile_config(recipe, flagfile)
    assert config == recipe.PRESETS[preset]
    values = common.flag_values(config)
    assert values == {**values, **expected}
    assert {name for name in expected} <= set(values)
    text = open(os.path.join(ROOT, "recipes", flagfile)).read()
    assert text.startswith("# ") and "python -m moco_keras.recipes." in text
    for word in ("Hardware", "Time", "Expected"):
        assert word in text.split("\n--")[0], (flagfile, word)
    if recipe is lincls:
        return
    vit = values["arch"].startswith("vit")
    assert config["model"]["projector_layers"] == (3 if vit else 2)
    assert config["model"]["predictor_last_bn"] is vit
    # BYOL's asymmetric pair (`main_moco.py`'s augmentation1, augmentation2).
    first, second = pretraining.augmentation_config(config)
    for view in (first, second):
        assert view["size"] == 224 and view["flip"]
        assert view["scale"] == (expected["crop_min"], 1.0)
        assert view["jitter"] == (0.4, 0.4, 0.2, 0.1)
        assert view["jitter_p"] == 0.8 and view["grayscale_p"] == 0.2
        assert view["blur_sigma"] == (0.1, 2.0)
        assert not view["grayscale_first"]
    assert (first["blur_p"], second["blur_p"]) == (1.0, 0.1)
    assert (first["solarize_p"], second["solarize_p"]) == (0.0, 0.2)


def test_presets_are_the_one_source_of_the_recipes_values():
    from moco_keras import MoCo
    from moco_keras import encoders
    from moco_keras import presets

    # Each flagfile of a preset resolves to the preset, value for value.
    for recipe, flagfile, name in (
        (pretrain, "mocov1.flags", "mocov1"),
        (pretrain, "mocov2.flags", "mocov2"),
        (pretrain, "quickstart.flags", "quickstart"),
        (pretrain, "mocov3_r50.flags", "mocov3_r50"),
        (pretrain, "mocov3_vit_small.flags", "mocov3_vit_small"),
        (pretrain, "mocov3_vit_base.flags", "mocov3_vit_base"),
        (lincls, "lincls.flags", "imagenet"),
        (lincls, "lincls_mocov3.flags", "mocov3"),
        (lincls, "lincls_mocov3_vit.flags", "mocov3_vit"),
    ):
        preset, config = flagfile_config(recipe, flagfile)
        assert preset == name
        assert config == recipe.PRESETS[name], flagfile
    # The recipes' MoCo arguments are MoCo.from_preset's.
    model = pretraining.build_moco(
        recipe_defaults_of(
            "mocov2", arch="cifar_resnet18", image_size=8, width=2, moco_k=256
        ),
        [],
        1,
    )
    reference = MoCo.from_preset(
        "mocov2",
        encoders.cifar_resnet18(width=2, input_shape=(8, 8, 3)),
        queue_size=256,
    )
    for argument in ("dim", "mlp", "momentum", "temperature"):
        assert getattr(model, argument) == getattr(reference, argument)
    model_keys = {
        key
        for section, key in common.FLAGS_TO_CONFIG.values()
        if section == "model"
    }
    # MoCo v3's projector depth and predictor BN follow the preset (ResNet
    # or ViT), as `main_moco.py` ties them to --arch.
    assert model_keys == set(presets.MOCOV1) | set(presets.MOCOV3_RESNET) - {
        "projector_layers",
        "predictor_last_bn",
    }
    with pytest.raises(ValueError, match="expected one of"):
        presets.get(presets.PRETRAINING, "mocov3")


def test_flags_given_replace_the_presets_values_and_only_those():
    # Given: --width and --workdir; the rest is the quickstart preset's.
    quickstart = pretrain.PRESETS["quickstart"]
    with parsed_flags("--preset=quickstart", "--width=4", "--workdir=w"):
        config = common.recipe_config(pretrain.PRESETS)
    assert config["encoder"]["width"] == 4 and config["run"]["workdir"] == "w"
    assert config == configs.config(
        quickstart, encoder={"width": 4}, run={"workdir": "w"}
    )
    assert config["run"]["seed"] == 0 and quickstart["encoder"]["width"] == 16
    # A flag given with the preset's own value is still the given one.
    with parsed_flags("--preset=mocov2", "--nocos", "--schedule=3,1"):
        config = common.recipe_config(pretrain.PRESETS)
    assert config["schedule"]["cosine"] is False and config["model"]["mlp"]
    assert config["schedule"]["milestones"] == [3, 1]  # ints, as given
    with (
        parsed_flags("--preset=mocov3"),
        pytest.raises(configs.ConfigError, match="--preset=mocov3"),
    ):
        common.recipe_config(pretrain.PRESETS)
    # A flag that the recipe's config has no place for is refused, not lost.
    with (
        parsed_flags("--preset=imagenet", "--moco_k=16"),
        pytest.raises(configs.ConfigError, match="--moco_k has no effect"),
    ):
        common.recipe_config(lincls.PRESETS)
    with (
        parsed_flags("--preset=imagenet", "--schedule=60,eighty"),
        pytest.raises(configs.ConfigError, match="--schedule must list epochs"),
    ):
        common.recipe_config(lincls.PRESETS)


def test_nohealth_builds_moco_without_the_measures():
    from moco_keras import pretraining

    with parsed_flags("--preset=quickstart", "--nohealth"):
        config = common.recipe_config(pretrain.PRESETS)
    assert config["run"]["health"] is False
    assert pretrain.PRESETS["quickstart"]["run"]["health"] is True
    config = configs.config(
        config,
        encoder={"width": 2},
        data={"image_size": 8},
        model={"queue_size": 64},
    )
    assert not pretraining.build_moco(config, [], 1).health
    config = configs.config(config, run={"health": True})
    assert pretraining.build_moco(config, [], 1).health


def recipe_defaults_of(preset, **overrides):
    return defaults(pretrain.PRESETS, preset, **overrides)


@pytest.mark.process
@pytest.mark.backends("jax")
def test_quickstart_runs_end_to_end(tmp_path):
    fake_fashion_mnist(str(tmp_path / "fmnist"))
    workdir = tmp_path / "run"
    # As `make demo` runs on a JAX host without TensorFlow.
    result = subprocess.run(
        [
            *recipe_command("quickstart", without_tensorflow=True),
            f"--data_dir={tmp_path / 'fmnist'}",
            f"--workdir={workdir}",
            "--epochs=2",
            "--train_limit=64",
            "--batch_size=32",
            "--moco_k=64",
            "--bn_splits=2",
            "--width=2",
            "--knn_k=5",
            "--knn_bank=48",
            "--knn_test=16",
            "--linear_epochs=2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "KERAS_BACKEND": keras.backend.backend()},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MoCo v2 encoder, 2 epochs" in result.stdout
    # Progress from the first second, each phase announced before it runs.
    lines = result.stdout.splitlines()
    assert lines[0].startswith("[    0 s] Quick start: MoCo v2"), lines[0]
    phases = [
        "kNN of raw pixels (bank 96, test 32 images)",
        "raw pixels: kNN top-1",
        "MoCo v2 pretraining: 64 images",
        "kNN of the trained and of the random encoder",
        "total time",
    ]
    found = [
        next(i for i, line in enumerate(lines) if phase in line)
        for phase in phases
    ]
    assert found == sorted(found), lines
    for name in ("config.json", "epochs.csv", "curves.png", "results.json"):
        assert (workdir / name).stat().st_size > 0
    assert (workdir / "knn.csv").stat().st_size > 0
    results = json.loads((workdir / "results.json").read_text())
    assert results["linear_epochs"] == 2
    for name in ("trained", "random"):
        assert 0 <= results[f"linear_top1_{name}"] <= 100
        assert f"{results[f'linear_top1_{name}']:6.2f} %" in result.stdout


@pytest.mark.process
@pytest.mark.backends("jax")
def test_own_images_preset_sizes_the_run_to_the_folder(tmp_path):
    """72 JPEGs of 40 px: a queue of a quarter of them in whole batches,
    m 0.99, no blur and crops of half the image; a flag given wins."""
    root = image_folder(str(tmp_path / "mine"), np.random.default_rng(1))
    run = str(tmp_path / "run")
    out = run_recipe(
        "pretrain",
        "--preset=own_images",
        f"--data_dir={root}",
        "--arch=resnet18",
        "--width=4",
        "--image_size=32",
        "--batch_size=8",
        "--bn_splits=2",
        "--crop_min=0.6",
        "--epochs=1",
        "--verbose=0",
        f"--workdir={run}",
    )
    assert "--preset=own_images for this dataset:" in out.stdout
    assert "--crop_min as given: 0.6" in out.stdout
    config = json.load(open(os.path.join(run, "config.json")))
    assert config["model"]["queue_size"] == 16  # 72 // 4 = 18 -> 2 batches
    assert config["model"]["momentum"] == 0.99
    assert config["augmentation"]["blur"] is False
    assert config["augmentation"]["crop_min"] == 0.6
    assert config["model"]["temperature"] == 0.2 and config["model"]["mlp"]
    results = json.load(open(os.path.join(run, "results.json")))
    assert np.isfinite(results["final_loss"])
    assert sorted(results["final_health"]) == sorted(health.HEALTH)
