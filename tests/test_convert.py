"""Checkpoints of the official PyTorch code and of PaddleFleetX, in Keras.

Each test builds a torchvision-layout ResNet in plain PyTorch (random
weights, random BN statistics and affine parameters, so that every tensor's
mapping matters), writes it in the source's own checkpoint format, converts
it and compares the Keras outputs with PyTorch's on the same images.
"""

import json
import os

import keras
import numpy as np
import pytest
import torch
from absl import app
from support import parsed_flags
from support import run_module
from torch_checkpoints import TorchResNet
from torch_checkpoints import classifier_head
from torch_checkpoints import official_state
from torch_checkpoints import paddle_names
from torch_checkpoints import save_official
from torch_checkpoints import save_pdparams
from torch_checkpoints import v1_head
from torch_checkpoints import v2_head

from moco_keras import convert
from moco_keras.recipes import convert as convert_recipe

IMAGES = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype("float32")


@torch.no_grad()
def torch_outputs(net, images=IMAGES):
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    features = net.features(x)
    return features.numpy(), net.fc(features).numpy()


def keras_numpy(x):
    return keras.ops.convert_to_numpy(x)


def assert_close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


def check_moco(converted, q, k, queue, ptr):
    model = converted.model
    for side, net in (("q", q), ("k", k)):
        features, head = torch_outputs(net)
        encoder = getattr(model, f"encoder_{side}")
        ours = keras_numpy(encoder(IMAGES, training=False))
        assert_close(ours, features)
        assert_close(keras_numpy(getattr(model, f"head_{side}")(ours)), head)
    np.testing.assert_array_equal(keras_numpy(model.queue.value), queue)
    assert int(keras_numpy(model.queue_ptr.value)) == ptr


@pytest.mark.slow
@pytest.mark.parametrize("prefix, width", [("module.", 64), ("", 8)])
def test_official_mocov2_checkpoint(tmp_path, prefix, width):
    """ResNet-50 and the v2 head: at full width with `module.` (as the
    official DDP code saves it), and narrow without the prefix."""
    q = TorchResNet(50, width, v2_head, seed=1)
    k = TorchResNet(50, width, v2_head, seed=2)
    queue = np.random.default_rng(3).normal(size=(128, 64)).astype("float32")
    path = str(tmp_path / "moco_v2_200ep_pretrain.pth.tar")
    save_official(path, official_state(q, k, queue, 32, prefix))
    converted = convert.convert(path)
    assert converted.kind == "moco" and converted.source == "pytorch"
    assert converted.info["arch"] == "resnet50" and converted.info["mlp"]
    assert converted.info["width"] == width
    assert converted.model.temperature == 0.2
    assert (converted.mean, converted.std) == convert.NORMALIZATION["pytorch"]
    check_moco(converted, q, k, queue, 32)


def test_official_mocov1_checkpoint_narrow(tmp_path):
    q = TorchResNet(50, 8, v1_head, seed=4)
    k = TorchResNet(50, 8, v1_head, seed=5)
    queue = np.random.default_rng(6).normal(size=(128, 32)).astype("float32")
    path = str(tmp_path / "moco_v1_200ep_pretrain.pth.tar")
    save_official(path, official_state(q, k, queue, 0))
    converted = convert.convert(path)
    assert converted.info == {
        "arch": "resnet50",
        "width": 8,
        "mlp": False,
        "dim": 128,
        "queue_size": 32,
        "checkpoint": os.path.abspath(path),
    }
    assert converted.model.temperature == 0.07
    check_moco(converted, q, k, queue, 0)


@pytest.mark.parametrize("mlp", [True, False])
def test_paddlefleetx_pretraining_checkpoint(tmp_path, mlp):
    head = v2_head if mlp else v1_head
    q = TorchResNet(18, 8, head, seed=7)
    k = TorchResNet(18, 8, head, seed=8)
    state = {}
    for prefix, net in (("base_encoder.", q), ("momentum_encoder.", k)):
        for name, value in paddle_names(net).items():
            state[f"{prefix}0.{name}"] = value
        fc = net.fc
        last = fc[2] if mlp else fc
        if mlp:
            state[f"{prefix}1.mlp.0.weight"] = fc[0].weight.detach().numpy().T
            state[f"{prefix}1.mlp.0.bias"] = fc[0].bias.detach().numpy()
        state[f"{prefix}2.fc.weight"] = last.weight.detach().numpy().T
        state[f"{prefix}2.fc.bias"] = last.bias.detach().numpy()
    queue = np.random.default_rng(9).normal(size=(128, 16)).astype("float32")
    state["queue"] = queue
    state["queue_ptr"] = np.array([8], dtype="int64")
    path = str(tmp_path / "mocov2_pt_imagenet2012_resnet50.pdparams")
    save_pdparams(path, state)
    converted = convert.convert(path)
    assert converted.kind == "moco" and converted.source == "paddle"
    assert converted.info["arch"] == "resnet18"
    assert converted.info["mlp"] is mlp
    assert converted.mean == converted.std == (0.5, 0.5, 0.5)
    check_moco(converted, q, k, queue, 8)


def check_classifier(converted, net):
    features, logits = torch_outputs(net)
    assert converted.kind == "classifier"
    assert_close(keras_numpy(converted.backbone(IMAGES)), features)
    assert_close(keras_numpy(converted.model(IMAGES)), logits)


def test_official_linear_classifier_and_torchvision_state_dict(tmp_path):
    net = TorchResNet(50, 8, classifier_head, seed=10)
    state = {f"module.{n}": v for n, v in net.state_dict().items()}
    path = str(tmp_path / "checkpoint.pth.tar")
    save_official(path, state)
    converted = convert.convert(path)
    assert converted.info["classes"] == 10
    check_classifier(converted, net)
    # A bare torchvision state dict (what torchvision.models.resnet50 saves).
    bare = str(tmp_path / "resnet.pth")
    torch.save(net.state_dict(), bare)
    check_classifier(convert.convert(bare), net)


def test_paddlefleetx_linear_classifier(tmp_path):
    net = TorchResNet(18, 8, classifier_head, seed=11)
    state = paddle_names(net)
    state["fc.weight"] = net.fc.weight.detach().numpy().T  # [in, out]
    state["fc.bias"] = net.fc.bias.detach().numpy()
    path = str(tmp_path / "mocov2_lincls_imagenet2012_resnet50.pdparams")
    save_pdparams(path, state)
    converted = convert.convert(path)
    assert converted.source == "paddle"
    check_classifier(converted, net)


def test_save_and_reload_keeps_outputs_and_normalization(tmp_path):
    net = TorchResNet(18, 8, classifier_head, seed=12)
    path = str(tmp_path / "lincls.pth.tar")
    save_official(path, {f"module.{n}": v for n, v in net.state_dict().items()})
    converted = convert.convert(path)
    converted.save(str(tmp_path / "out"))
    model, metadata = convert.load_converted(str(tmp_path / "out"))
    assert metadata["kind"] == "classifier" and metadata["source"] == "pytorch"
    assert tuple(metadata["mean"]) == convert.NORMALIZATION["pytorch"][0]
    assert_close(keras_numpy(model(IMAGES)), torch_outputs(net)[1])


def test_partial_or_mismatched_checkpoints_name_the_keys(tmp_path):
    q = TorchResNet(18, 8, v1_head, seed=13)
    k = TorchResNet(18, 8, v1_head, seed=14)
    queue = np.zeros((128, 16), "float32")
    state = official_state(q, k, queue, 0)
    path = str(tmp_path / "partial.pth.tar")
    del state["module.encoder_k.layer2.1.bn2.running_var"]
    state["module.encoder_q.layer9.weight"] = torch.zeros(3)
    save_official(path, state)
    with pytest.raises(ValueError) as error:
        convert.convert(path)
    message = str(error.value)
    assert "nothing was loaded" in message
    assert "1 missing: module.encoder_k.layer2.1.bn2.running_var" in message
    assert "module.encoder_q.layer9.weight" in message
    state = official_state(q, k, queue, 0)
    state["module.encoder_k.layer1.0.conv1.weight"] = torch.zeros(9, 8, 3, 3)
    save_official(path, state)
    with pytest.raises(
        ValueError,
        match=r"1 with mismatched shapes: module\."
        r"encoder_k\.layer1\.0\.conv1\.weight: \(9, 8, 3, 3\)",
    ):
        convert.convert(path)
    with open(tmp_path / "junk.pth", "wb") as f:
        torch.save({"state_dict": {"linear.weight": torch.zeros(2)}}, f)
    with pytest.raises(ValueError, match="neither a MoCo"):
        convert.convert(str(tmp_path / "junk.pth"))
    with pytest.raises(FileNotFoundError):
        convert.convert(str(tmp_path / "missing.pth.tar"))


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.backends("torch")
def test_convert_command_then_linear_classification(tmp_path):
    """The convert recipe's output is a `--pretrained` for recipes/lincls,
    which then normalizes with the source's statistics."""
    q = TorchResNet(18, 8, v2_head, seed=15)
    k = TorchResNet(18, 8, v2_head, seed=16)
    queue = np.random.default_rng(17).normal(size=(128, 16)).astype("float32")
    source = str(tmp_path / "moco_v2_800ep_pretrain.pth.tar")
    save_official(source, official_state(q, k, queue, 0), arch="resnet18")
    output = str(tmp_path / "converted")
    result = run_module(
        "moco_keras.recipes.convert", f"--source={source}", f"--output={output}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MoCo v2 pretraining (K 16" in result.stdout
    # The refusals, in this process (a usage error is absl's clean exit, as
    # test_recipes checks in a subprocess).
    for args, message in (
        ((f"--source={source}", f"--output={output}"), "--overwrite"),
        (
            (
                f"--source={tmp_path / 'none.pth.tar'}",
                f"--output={tmp_path / 'none'}",
            ),
            "No checkpoint at",
        ),
    ):
        with parsed_flags(*args), pytest.raises(app.UsageError, match=message):
            convert_recipe.main([])
    workdir = tmp_path / "lincls"
    result = run_module(
        "moco_keras.recipes.lincls",
        "--flagfile=recipes/lincls_smoke.flags",
        f"--pretrained={output}",
        f"--workdir={workdir}",
        "--train_limit=512",
        "--val_limit=1000",
        "--epochs=1",
        "--cos",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((workdir / "results.json").read_text())
    assert scores["backbone_unchanged"]
    mean, std = convert.NORMALIZATION["pytorch"]
    assert scores["normalization"] == {"mean": list(mean), "std": list(std)}
