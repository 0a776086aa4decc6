"""What the tests share: tiny encoders, models and data, so that every
test runs in seconds; keras-hub's `TestCase` checks (serialization, `.keras`
round trip); the recipes' flags and processes; fake datasets.

Tests import it as `support` (`tests/` is on the path of pytest, and of
the programs in `tests/scripts`, which the process tests start with
`PYTHONPATH` naming it). The PyTorch reference checkpoints are in
`torch_checkpoints.py` beside it, which imports torch.
"""

import contextlib
import glob
import gzip
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from moco_keras import MoCo
from moco_keras import SplitBatchNormalization

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A test of the data code alone (sources, the views' pipeline: numpy, PIL,
# grain), where no Keras backend enters: it runs once, in the torch suite
# (the shortest), as any test marked with the backends it checks
# (conftest.py).
data_only = pytest.mark.backends("torch")


@contextlib.contextmanager
def parsed_flags(*args):
    """The recipes' absl flags parsed from `args`, reset afterwards."""
    from absl import flags

    flags.FLAGS(["recipe", *args])
    try:
        yield
    finally:
        flags.FLAGS.unparse_flags()


def run_module(module, *args):
    """`python -m module args` in a fresh Python at the repository root."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": ROOT},
    )


def dense_encoder(input_shape=(4, 4, 3), features=8, name="dense_encoder"):
    """A BN-free encoder, so features are a plain function of one image."""
    inputs = keras.Input(input_shape)
    x = keras.layers.Flatten()(inputs)
    outputs = keras.layers.Dense(features, name="proj")(x)
    return keras.Model(inputs, outputs, name=name)


def conv_bn_encoder(bn_splits=1, size=8, synchronized=False):
    """Two conv-BN-ReLU blocks and a global pool: split BN (or SyncBN,
    `synchronized`) where a ResNet has it (groups, moving statistics, the
    key shuffle's effect) without a ResNet's build and trace time. Real
    ResNets are tested in test_encoders.py, test_convert.py and the recipes'
    tests."""
    inputs = keras.Input((size, size, 3), name="images")
    x = inputs
    for block, filters in enumerate((4, 8), start=1):
        x = keras.layers.Conv2D(
            filters, 3, strides=2, use_bias=False, name=f"conv{block}"
        )(x)
        x = SplitBatchNormalization(
            num_splits=bn_splits, synchronized=synchronized, name=f"bn{block}"
        )(x)
        x = keras.layers.ReLU(name=f"relu{block}")(x)
    outputs = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
    return keras.Model(inputs, outputs, name="conv_bn_encoder")


def sgd(learning_rate=0.1):
    return keras.optimizers.SGD(learning_rate, momentum=0.9)


def make_moco(encoder=None, compile=True, learning_rate=0.1, **kwargs):
    kwargs.setdefault("dim", 4)
    kwargs.setdefault("queue_size", 8)
    kwargs.setdefault("seed", 0)
    model = MoCo(encoder or dense_encoder(), **kwargs)
    if compile:
        model.compile(optimizer=sgd(learning_rate))
    return model


def random_images(n, shape=(4, 4, 3), seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *shape)).astype("float32")


def to_numpy(variable):
    return keras.ops.convert_to_numpy(variable.value)


def snapshot(variables):
    return [to_numpy(v).copy() for v in variables]


def run_serialization_test(instance):
    """keras-hub's `TestCase.run_serialization_test`: `get_config`, then
    `from_config`, gives the same config, also through Keras' registry
    (`serialize_keras_object` / `deserialize_keras_object`, what `.keras`
    files use). Returns the clone."""
    config = instance.get_config()
    clone = type(instance).from_config(config)
    assert clone.get_config() == config
    revived = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(instance)
    )
    assert type(revived) is type(instance)
    assert revived.get_config() == config
    return clone


def run_model_saving_test(model, path):
    """keras-hub's `run_model_saving_test`: `model.save` to a `.keras` file
    and `keras.saving.load_model` give the same class and every variable
    equal. Returns the loaded model."""
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is type(model)
    assert len(loaded.weights) == len(model.weights)
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b), a.path)
    return loaded


def write_idx(directory, prefix, images, labels):
    os.makedirs(directory, exist_ok=True)
    for part, array in (("images-idx3", images), ("labels-idx1", labels)):
        header = bytes([0, 0, 8, array.ndim]) + b"".join(
            int(d).to_bytes(4, "big") for d in array.shape
        )
        path = os.path.join(directory, f"{prefix}-{part}-ubyte.gz")
        with gzip.open(path, "wb") as f:
            f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(directory, n_train=96, n_test=32):
    """Fashion-MNIST's IDX files with random images in `directory`."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        # Class-dependent brightness, so that features can tell classes.
        images = rng.integers(0, 60, (n, 28, 28)) + 18 * labels[:, None, None]
        write_idx(directory, prefix, images, labels)


def recipe_defaults(table=None, preset="mocov1", **flags):
    """A recipe's config with `flags` given (by flag name, as on the command
    line) and no other: preset `preset` of `table` (default
    `presets.PRETRAINING`), each flag put in place by the recipes' one
    table (`common.with_flags`). `--workdir` and `--data_dir` default to
    placeholders."""
    from moco_keras import presets
    from moco_keras.recipes import common

    given = {"workdir": "/tmp/unused", "data_dir": "/data", **flags}
    preset = presets.get(table or presets.PRETRAINING, preset)
    return common.with_flags(preset, **given)


def register_tfds_dataset(class_name, examples, class_names):
    """Defines a tfds image dataset `class_name` (tfds names it in snake
    case), built offline on `download_and_prepare` from `examples`, a list
    of `(image, label)` (uint8 arrays or JPEG bytes) in key order."""
    import io

    import tensorflow_datasets as tfds

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(names=class_names),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for key, (image, label) in enumerate(examples):
            if isinstance(image, bytes):
                image = io.BytesIO(image)
            yield key, {"image": image, "label": label}

    type(
        class_name,
        (tfds.core.GeneratorBasedBuilder,),
        {
            "__doc__": f"{len(examples)} images, built offline by a test.",
            "VERSION": tfds.core.Version("1.0.0"),
            "_info": _info,
            "_split_generators": _split_generators,
            "_generate_examples": _generate_examples,
        },
    )


def tensorboard_events(directory):
    """{tag: [(step, value)]} of the event files under `directory`; images
    as their (height, width) (tf.summary.image stores encoded PNGs)."""
    import tensorflow as tf

    found = {}
    for path in sorted(glob.glob(os.path.join(directory, "events.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                array = tf.make_ndarray(value.tensor)
                if array.dtype == object:  # [width, height, png...]
                    array = (int(array[1]), int(array[0]))
                else:
                    array = float(array)
                found.setdefault(value.tag, []).append((event.step, array))
    return found


def torchvision_mean_area(height, width, n=20000, scale=(0.2, 1.0)):
    """Mean area fraction of torchvision's RandomResizedCrop.get_params
    (ratio 3/4 to 4/3), its loop run in Python: the reference of the crop
    windows of both crop halves (tf.data and PIL)."""
    rng = np.random.default_rng(0)
    total = 0.0
    for _ in range(n):
        for _ in range(10):
            target = height * width * rng.uniform(*scale)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                total += w * h
                break
        else:
            total += height * width  # ratio 4/3 is in range: whole image
    return total / n / (height * width)
