"""Checkpoints of the official PyTorch code and of PaddleFleetX, in Keras.

Each test builds a torchvision-layout ResNet in plain PyTorch (random
weights, random BN statistics and affine parameters, so that every tensor's
mapping matters), writes it in the source's own checkpoint format, converts
it and compares the Keras outputs with PyTorch's on the same images.
"""

import contextlib
import json
import os
import pickle
import subprocess
import sys

import keras
import numpy as np
import pytest
import torch
from absl import app
from absl import flags
from torch import nn

from moco_keras import convert
from moco_keras.recipes import convert as convert_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from torch_moco import Basic  # noqa: E402
from torch_moco import Bottleneck  # noqa: E402


class TorchResNet(nn.Module):
    """torchvision's ResNet (names and layout), `fc` given by `head`."""

    def __init__(self, depth=50, width=64, head=None, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        block, counts = {
            18: (Basic, (2, 2, 2, 2)),
            50: (Bottleneck, (3, 4, 6, 3)),
        }[depth]
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = width
        for stage, count in enumerate(counts):
            planes = width * 2**stage
            blocks = []
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(block(inplanes, planes, stride, nn.BatchNorm2d))
                inplanes = planes * block.expansion
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.feature_dim = inplanes
        self.fc = head(inplanes) if head else nn.Linear(inplanes, 1000)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    c = module.num_features
                    module.running_mean.normal_(0, 0.1, generator=generator)
                    module.running_var.uniform_(0.5, 1.5, generator=generator)
                    module.weight.uniform_(0.5, 1.5, generator=generator)
                    module.bias.normal_(0, 0.1, generator=generator)
                    assert module.weight.shape == (c,)
        self.eval()

    def features(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        for stage in range(1, 5):
            x = getattr(self, f"layer{stage}")(x)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x):
        return self.fc(self.features(x))


def v1_head(features):
    return nn.Linear(features, 128)


def v2_head(features):
    return nn.Sequential(
        nn.Linear(features, features), nn.ReLU(), nn.Linear(features, 128)
    )


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


def official_state(q, k, queue, ptr, prefix="module."):
    state = {}
    for side, net in (("q", q), ("k", k)):
        for name, value in net.state_dict().items():
            state[f"{prefix}encoder_{side}.{name}"] = value
    state[f"{prefix}queue"] = torch.from_numpy(queue)
    state[f"{prefix}queue_ptr"] = torch.tensor([ptr])
    return state


def save_official(path, state, arch="resnet50"):
    torch.save(
        {"epoch": 200, "arch": arch, "state_dict": state, "optimizer": {}},
        path,
    )


def paddle_names(net):
    """The backbone of `net` under PaddleFleetX's names (no fc)."""
    renamed = {"running_mean": "_mean", "running_var": "_variance"}
    state = {}
    for name, value in net.state_dict().items():
        if name.startswith("fc.") or name.endswith("num_batches_tracked"):
            continue
        prefix, _, last = name.rpartition(".")
        state[f"{prefix}.{renamed.get(last, last)}"] = value.numpy()
    return state


def save_pdparams(path, state):
    state = {**state, "StructuredToParameterName@@": {"x": "y"}}
    with open(path, "wb") as f:
        pickle.dump(state, f, protocol=4)


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
@pytest.mark.parametrize("prefix", ["module.", ""])
def test_official_mocov2_checkpoint(tmp_path, prefix):
    """Full-width ResNet-50, the v2 head, with and without `module.`."""
    q = TorchResNet(50, 64, v2_head, seed=1)
    k = TorchResNet(50, 64, v2_head, seed=2)
    queue = np.random.default_rng(3).normal(size=(128, 64)).astype("float32")
    path = str(tmp_path / "moco_v2_200ep_pretrain.pth.tar")
    save_official(path, official_state(q, k, queue, 32, prefix))
    converted = convert.convert(path)
    assert converted.kind == "moco" and converted.source == "pytorch"
    assert converted.info["arch"] == "resnet50" and converted.info["mlp"]
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


def classifier_head(features):
    return nn.Linear(features, 10)


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


@contextlib.contextmanager
def parsed_flags(*args):
    """The recipes' absl flags parsed from `args`, reset afterwards."""
    flags.FLAGS(["recipe", *args])
    try:
        yield
    finally:
        flags.FLAGS.unparse_flags()


def run_module(module, *args):
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": ROOT},
    )


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
        "--epochs=1",
        "--cos",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((workdir / "results.json").read_text())
    assert scores["backbone_unchanged"]
    mean, std = convert.NORMALIZATION["pytorch"]
    assert scores["normalization"] == {"mean": list(mean), "std": list(std)}
