"""The SavedModel feature extractor, loaded where moco_keras is not."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from support import run_module
from torch_checkpoints import TorchResNet
from torch_checkpoints import classifier_head
from torch_checkpoints import paddle_names
from torch_checkpoints import save_pdparams

from moco_keras import MoCo
from moco_keras import color
from moco_keras import convert
from moco_keras import datasets
from moco_keras import encoders
from moco_keras import export
from moco_keras import training
from moco_keras import views

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = np.random.default_rng(0).integers(0, 256, (3, 45, 60, 3), "uint8")


def expected_features(backbone, size, mean, std, crop_fraction):
    views = np.stack(
        [
            export._eval_view(tf.constant(i), size, mean, std, crop_fraction)
            for i in IMAGES
        ]
    )
    return keras.ops.convert_to_numpy(backbone(views, training=False))


@pytest.mark.backends("tensorflow")
def test_the_served_view_is_the_pipelines_evaluation_view():
    """The SavedModel's preprocessing (TensorFlow, in its graph) against
    the pipeline's evaluation view (`views.center_view`, PIL): resize 256 +
    center crop 224 of a 375 x 500 image, and a Fashion-MNIST-size image at
    crop fraction 1, within a level of 255."""
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    rng = np.random.default_rng(4)
    for shape, size, fraction in (((375, 500), 224, 0.875), ((32, 32), 28, 1)):
        small = rng.integers(0, 256, (shape[0] // 8, shape[1] // 8, 3), "uint8")
        # A smooth image, as photos are between their edges.
        image = np.asarray(
            views.decode(small).resize(shape[::-1], resample=3), np.uint8
        )
        ours = views.center_view(views.decode(image), size, fraction)
        served = export._eval_view(
            tf.constant(image), size, mean, std, fraction
        ).numpy()
        served = (served * std + mean) * 255.0
        assert served.shape == ours.shape == (size, size, 3)
        assert np.abs(ours - served).mean() < 1.0


def export_and_load(tmp_path, pretrained, *flags):
    output = tmp_path / "exported"
    result = run_module(
        "moco_keras.recipes.export",
        f"--pretrained={pretrained}",
        f"--output={output}",
        *flags,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    np.save(tmp_path / "images.npy", IMAGES)
    loaded = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tests", "scripts", "load_export.py"),
            str(output),
            str(tmp_path / "images.npy"),
            str(tmp_path / "features.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    # The loading process never imported this package.
    assert json.loads(loaded.stdout.strip().splitlines()[-1]) == []
    return np.load(tmp_path / "features.npy")


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.backends("tensorflow", "jax")
def test_exported_moco_encoder_matches_keras(tmp_path):
    """A pretraining workdir: its run's normalization and crop are used."""
    encoder = encoders.resnet18(width=4, input_shape=(32, 32, 3))
    model = MoCo(encoder, dim=8, queue_size=16, seed=0)
    run = tmp_path / "run"
    os.makedirs(run / "checkpoints")
    model.save(training.checkpoint_path(str(run / "checkpoints"), 7))
    with open(run / "config.json", "w") as f:
        json.dump(
            {"data": {"dataset": "fashion_mnist", "crop_fraction": 1.0}}, f
        )
    features = export_and_load(tmp_path, run)
    assert features.shape == (3, 32)
    expected = expected_features(
        model.encoder_q,
        32,
        datasets.FASHION_MNIST_MEAN,
        datasets.FASHION_MNIST_STD,
        1.0,
    )
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.backends("tensorflow")
def test_exported_converted_checkpoint_keeps_its_normalization(tmp_path):
    """A PaddleFleetX classifier: the SavedModel normalizes with 0.5 / 0.5."""
    net = TorchResNet(18, 8, classifier_head, seed=3)
    state = paddle_names(net)
    state["fc.weight"] = net.fc.weight.detach().numpy().T
    state["fc.bias"] = net.fc.bias.detach().numpy()
    source = str(tmp_path / "lincls.pdparams")
    save_pdparams(source, state)
    converted = convert.convert(source)
    converted.save(str(tmp_path / "converted"))
    features = export_and_load(
        tmp_path, tmp_path / "converted", "--image_size=40", "--crop_fraction=1"
    )
    expected = expected_features(
        converted.backbone, 40, (0.5,) * 3, (0.5,) * 3, 1.0
    )
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.backends("torch")
def test_torch_backend_cannot_export_and_says_what_to_do(tmp_path):
    encoder = encoders.resnet18(width=4, input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="KERAS_BACKEND=tensorflow"):
        export.export_feature_extractor(encoder, str(tmp_path / "x"), size=32)


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.backends("torch")
def test_keras_hub_preset_gives_the_same_features(tmp_path):
    """The recipe writes a keras-hub preset of a MoCo checkpoint's encoder:
    `ResNetBackbone.from_preset` pooled equals our encoder; the preset's
    image converter normalizes as the encoder was trained."""
    import keras_hub

    encoder = encoders.resnet18(input_shape=(None, None, 3))
    rng = np.random.default_rng(1)
    for variable in encoder.weights:  # BN statistics that matter
        if "moving" in variable.path or "beta" in variable.path:
            low = 0.5 if "variance" in variable.path else -0.1
            variable.assign(rng.uniform(low, low + 1.0, variable.shape))
    model = MoCo(encoder, dim=8, queue_size=16, seed=0)
    path = str(tmp_path / "ckpt.keras")
    model.save(path)
    output = tmp_path / "preset"
    result = run_module(
        "moco_keras.recipes.export",
        f"--pretrained={path}",
        f"--output={output}",
        "--format=keras_hub",
        "--image_size=64",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    hub = keras_hub.models.ResNetBackbone.from_preset(str(output))
    images = rng.normal(size=(2, 64, 64, 3)).astype("float32")
    pooled = keras.ops.mean(hub(images, training=False), axis=(1, 2))
    expected = model.encoder_q(images, training=False)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(pooled),
        keras.ops.convert_to_numpy(expected),
        rtol=1e-4,
        atol=1e-4,
    )
    converter = keras_hub.layers.ResNetImageConverter.from_preset(str(output))
    pixels = np.full((1, 64, 64, 3), 255.0, "float32")
    mean, std = np.array(color.IMAGENET_MEAN), np.array(color.IMAGENET_STD)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(converter(pixels))[0, 0, 0],
        (1.0 - mean) / std,
        rtol=1e-5,
    )


def test_keras_hub_preset_refuses_what_keras_hub_cannot_hold(tmp_path):
    narrow = encoders.resnet18(width=8, input_shape=(None, None, 3))
    with pytest.raises(ValueError, match="width 64"):
        export.export_keras_hub_preset(narrow, str(tmp_path / "a"))
    cifar = encoders.cifar_resnet18(width=64, input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="not cifar_resnet18"):
        export.export_keras_hub_preset(cifar, str(tmp_path / "b"))


@pytest.mark.slow
@pytest.mark.backends("tensorflow", "torch")
def test_onnx_export_gives_the_keras_features(tmp_path):
    """onnxruntime runs the ONNX file at two image sizes and batches and
    gives the encoder's features; the preprocessing is written beside it."""
    import onnxruntime

    encoder = encoders.resnet18(width=8, input_shape=(None, None, 3))
    rng = np.random.default_rng(3)
    for variable in encoder.weights:
        if "moving" in variable.path or "beta" in variable.path:
            low = 0.5 if "variance" in variable.path else -0.1
            variable.assign(rng.uniform(low, low + 1.0, variable.shape))
    path = str(tmp_path / "encoder.onnx")
    export.export_onnx(encoder, path, size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    session = onnxruntime.InferenceSession(path)
    assert [i.name for i in session.get_inputs()] == ["images"]
    for shape in ((2, 32, 32, 3), (3, 48, 40, 3)):
        images = rng.normal(size=shape).astype("float32")
        (features,) = session.run(None, {"images": images})
        expected = keras.ops.convert_to_numpy(encoder(images, training=False))
        gap = np.abs(features - expected).max() / np.abs(expected).max()
        assert gap <= 1e-4, (shape, gap)
    with open(path + ".json") as f:
        preprocessing = json.load(f)
    assert preprocessing["mean"] == [0.5] * 3
    assert preprocessing["std"] == [0.25] * 3
    assert preprocessing["size"] == 32


@pytest.mark.backends("jax")
def test_onnx_export_from_jax_says_what_to_do(tmp_path):
    encoder = encoders.resnet18(width=4, input_shape=(None, None, 3))
    with pytest.raises(ValueError, match="KERAS_BACKEND=torch"):
        export.export_onnx(encoder, str(tmp_path / "x.onnx"), size=32)
