"""The weights out to PyTorch: torchvision, official MoCo, detectron2.

Each export is loaded where it goes: a torchvision-layout ResNet in plain
PyTorch (`torch_checkpoints.TorchResNet`, torchvision's module names; the
torchvision wheel on PyPI is a CUDA build that does not load beside the CPU
torch wheel of the test machines), the loading code of the official
`main_lincls.py`, the renaming of the official
`detection/convert-pretrain-to-detectron2.py`, and this package's own
`convert`.
"""

import pickle

import keras
import numpy as np
import pytest
import torch
from support import run_module
from torch_checkpoints import TorchResNet

from moco_keras import MoCo
from moco_keras import convert
from moco_keras import encoders
from moco_keras import export_pytorch

IMAGES = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype("float32")


def random_statistics(model, seed=1):
    """BN statistics and affine parameters away from their initial values,
    so that each one's mapping shows in the features."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        if "moving_variance" in variable.path or "gamma" in variable.path:
            variable.assign(rng.uniform(0.5, 1.5, variable.shape))
        elif "moving_mean" in variable.path or "beta" in variable.path:
            variable.assign(rng.normal(0, 0.1, variable.shape))


def keras_features(backbone):
    return keras.ops.convert_to_numpy(backbone(IMAGES, training=False))


@torch.no_grad()
def torch_features(net):
    return net.features(torch.from_numpy(IMAGES).permute(0, 3, 1, 2)).numpy()


def relative_gap(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


def torch_tensors(state):
    return {name: torch.from_numpy(np.asarray(v)) for name, v in state.items()}


def official_lincls_state(state_dict):
    """`main_lincls.py`'s loading of a pretrained checkpoint: the query
    encoder's keys without its `fc`, renamed to torchvision's."""
    state_dict = dict(state_dict)
    for k in list(state_dict.keys()):
        if k.startswith("module.encoder_q") and not k.startswith(
            "module.encoder_q.fc"
        ):
            state_dict[k[len("module.encoder_q.") :]] = state_dict[k]
        del state_dict[k]
    return state_dict


def official_detectron2(state_dict):
    """`detection/convert-pretrain-to-detectron2.py`'s renaming."""
    newmodel = {}
    for k, v in state_dict.items():
        if not k.startswith("module.encoder_q."):
            continue
        k = k.replace("module.encoder_q.", "")
        if "layer" not in k:
            k = "stem." + k
        for t in [1, 2, 3, 4]:
            k = k.replace("layer{}".format(t), "res{}".format(t + 1))
        for t in [1, 2, 3]:
            k = k.replace("bn{}".format(t), "conv{}.norm".format(t))
        k = k.replace("downsample.0", "shortcut")
        k = k.replace("downsample.1", "shortcut.norm")
        newmodel[k] = np.asarray(v)
    return {
        "model": newmodel,
        "__author__": "MOCO",
        "matching_heuristics": True,
    }


@pytest.mark.slow
@pytest.mark.backends("tensorflow", "torch")
@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_export_gives_the_keras_features(depth):
    """Under TensorFlow (channels-last) and torch (channels-first): the
    state loads into torchvision's ResNet with only `fc` missing and gives
    the Keras encoder's features, BN in inference mode."""
    encoder = encoders.get_encoder(
        f"resnet{depth}", input_shape=(None,) * 2 + (3,)
    )
    random_statistics(encoder)
    state = export_pytorch.torchvision_state(encoder)
    net = TorchResNet(depth)
    loaded = net.load_state_dict(torch_tensors(state), strict=False)
    assert loaded.missing_keys == ["fc.weight", "fc.bias"]
    assert loaded.unexpected_keys == []
    net.eval()
    gap = relative_gap(torch_features(net), keras_features(encoder))
    assert gap <= 1e-4, gap
    fc = keras.layers.Dense(1000, name="fc")  # torchvision's ImageNet head
    fc.build((None, 512 if depth == 18 else 2048))
    state = export_pytorch.torchvision_state(encoder, fc)
    net.load_state_dict(torch_tensors(state), strict=True)
    np.testing.assert_array_equal(
        net.fc.weight.detach().numpy(), keras.ops.convert_to_numpy(fc.kernel).T
    )


def test_torchvision_export_refuses_what_torchvision_cannot_hold():
    narrow = encoders.resnet18(width=8, input_shape=(None, None, 3))
    with pytest.raises(ValueError, match="width=64"):
        export_pytorch.torchvision_state(narrow)
    cifar = encoders.cifar_resnet18(width=64, input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="cifar_resnet18"):
        export_pytorch.torchvision_state(cifar)


def narrow_moco(mlp=True, pointer=5):
    """A MoCo of a narrow ResNet-18 with random BN statistics, a queue and
    a pointer that are not their initial values."""
    encoder = encoders.resnet18(width=8, input_shape=(None, None, 3))
    model = MoCo(encoder, dim=16, mlp=mlp, queue_size=32, seed=0)
    random_statistics(model)
    rng = np.random.default_rng(2)
    model.queue.assign(rng.normal(size=(16, 32)).astype("float32"))
    model.queue_ptr.assign(pointer)
    return model


@pytest.mark.parametrize("mlp", [True, False])
def test_moco_pytorch_checkpoint_reads_back_and_loads_in_main_lincls(
    tmp_path, mlp
):
    model = narrow_moco(mlp)
    checkpoint = export_pytorch.moco_pytorch_checkpoint(model, epoch=7)
    path = str(tmp_path / "checkpoint_0007.pth.tar")
    export_pytorch.save_torch(checkpoint, path)

    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["epoch"] == 7 and raw["arch"] == "resnet18"
    state = raw["state_dict"]
    assert state["module.queue"].shape == (16, 32)
    assert state["module.queue_ptr"].dtype == torch.int64
    assert state["module.queue_ptr"].tolist() == [5]
    heads = {n for n in state if n.startswith("module.encoder_k.fc")}
    expected = {"fc.0", "fc.2"} if mlp else {"fc"}
    assert {n[len("module.encoder_k.") :].rsplit(".", 1)[0] for n in heads} == (
        expected
    )
    # main_lincls.py: only fc missing.
    net = TorchResNet(18, width=8)
    loaded = net.load_state_dict(official_lincls_state(state), strict=False)
    assert set(loaded.missing_keys) == {"fc.weight", "fc.bias"}
    assert loaded.unexpected_keys == []
    net.eval()
    gap = relative_gap(torch_features(net), keras_features(model.encoder_q))
    assert gap <= 1e-4, gap

    # This package's converter reads it back as the same model.
    converted = convert.convert(path)
    assert converted.kind == "moco" and converted.info["mlp"] == mlp
    back = converted.model
    assert int(keras.ops.convert_to_numpy(back.queue_ptr)) == 5
    for mine, theirs in zip(model.weights, back.weights, strict=True):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(mine),
            keras.ops.convert_to_numpy(theirs),
            err_msg=mine.path,
        )


def test_detectron2_weights_are_the_official_converters():
    """From the same weights: the official converter's renaming of the
    `moco_pytorch` checkpoint gives our pickle's keys and values."""
    encoder = encoders.resnet50(input_shape=(None, None, 3))
    model = MoCo(encoder, dim=16, mlp=True, queue_size=32, seed=0)
    random_statistics(model)
    state = export_pytorch.backbone_state(model.encoder_q)
    state.update(export_pytorch.dense_state(model.head_q.layers))
    ours = export_pytorch.detectron2_model(state)
    checkpoint = export_pytorch.moco_pytorch_checkpoint(model)
    official = official_detectron2(checkpoint["state_dict"])
    assert ours.keys() == official.keys()
    assert ours["model"].keys() == official["model"].keys()
    for name, value in official["model"].items():
        np.testing.assert_array_equal(ours["model"][name], value, err_msg=name)
    assert ours["__author__"] == "MOCO" and ours["matching_heuristics"]
    # detectron2's names, as its ResNet builds them.
    for name in (
        "stem.conv1.weight",
        "stem.conv1.norm.running_var",
        "res2.0.conv1.norm.weight",
        "res2.0.shortcut.weight",
        "res2.0.shortcut.norm.bias",
        "res5.2.conv3.norm.running_mean",
    ):
        assert name in ours["model"], name


def pretraining_workdir(tmp_path):
    """A pretraining workdir of a full-width ResNet-18 MoCo: its checkpoint
    and an epochs.csv of 3 epochs, as recipes/pretrain writes them."""
    workdir = tmp_path / "pretrain"
    (workdir / "checkpoints").mkdir(parents=True)
    encoder = encoders.resnet18(input_shape=(None, None, 3))
    model = MoCo(encoder, dim=16, mlp=True, queue_size=32, seed=0)
    random_statistics(model)
    model.save(str(workdir / "checkpoints" / "ckpt-000000006.keras"))
    (workdir / "epochs.csv").write_text("epoch,loss\n0,9.0\n1,8.0\n2,7.0\n")
    return workdir, model


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.backends("torch")
def test_export_recipe_writes_each_format_from_runs(tmp_path):
    """`recipes/export --format=...` from a pretraining workdir, and from a
    lincls workdir on it (its classifier goes out as torchvision's fc)."""
    workdir, model = pretraining_workdir(tmp_path)
    outputs = {}
    for fmt, name in (
        ("torchvision", "resnet18.pth"),
        ("moco_pytorch", "checkpoint.pth.tar"),
        ("detectron2", "model.pkl"),
    ):
        outputs[fmt] = str(tmp_path / "out" / name)
        result = run_module(
            "moco_keras.recipes.export",
            f"--pretrained={workdir}",
            f"--format={fmt}",
            f"--output={outputs[fmt]}",
        )
        assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(outputs["torchvision"], weights_only=True)
    net = TorchResNet(18)
    loaded = net.load_state_dict(state, strict=False)
    assert loaded.missing_keys == ["fc.weight", "fc.bias"]
    net.eval()
    gap = relative_gap(torch_features(net), keras_features(model.encoder_q))
    assert gap <= 1e-4, gap
    checkpoint = torch.load(outputs["moco_pytorch"], weights_only=True)
    assert checkpoint["epoch"] == 3
    with open(outputs["detectron2"], "rb") as f:
        detectron2 = pickle.load(f)
    official = official_detectron2(checkpoint["state_dict"])
    assert detectron2["model"].keys() == official["model"].keys()
    for name, value in official["model"].items():
        np.testing.assert_array_equal(detectron2["model"][name], value)

    lincls = tmp_path / "lincls"
    result = run_module(
        "moco_keras.recipes.lincls",
        "--flagfile=recipes/lincls_smoke.flags",
        f"--pretrained={workdir}",
        "--train_limit=256",
        "--val_limit=128",
        "--epochs=1",
        "--cos",
        "--batch_size=64",
        f"--workdir={lincls}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = str(tmp_path / "out" / "classifier.pth")
    result = run_module(
        "moco_keras.recipes.export",
        f"--pretrained={lincls}",
        "--format=torchvision",
        f"--output={output}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    net = TorchResNet(18, head=lambda features: torch.nn.Linear(features, 10))
    net.load_state_dict(torch.load(output, weights_only=True), strict=True)
    net.eval()
    path = sorted((lincls / "checkpoints").glob("ckpt-*.keras"))[-1]
    classifier = keras.saving.load_model(str(path), compile=False)
    fc = classifier.get_layer("fc")
    features = keras_features(model.encoder_q)
    logits = keras.ops.convert_to_numpy(fc(features))
    with torch.no_grad():
        theirs = net(torch.from_numpy(IMAGES).permute(0, 3, 1, 2)).numpy()
    assert relative_gap(theirs, logits) <= 1e-4
    # A lincls run has no key encoder or queue for main_moco.py's file.
    result = run_module(
        "moco_keras.recipes.export",
        f"--pretrained={lincls}",
        "--format=moco_pytorch",
        f"--output={tmp_path / 'x.pth.tar'}",
    )
    assert result.returncode != 0
    assert "--format=torchvision" in result.stderr
