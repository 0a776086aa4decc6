"""Files from outside are untrusted: nothing read from one runs code, and a
file that is corrupt, of another kind, or that names code is refused with a
message naming it (`convert.CheckpointError`), never a traceback.

The malicious files here are live: each test reads its file the unsafe way
at the end and sees the code run, so that a refusal that passes is a
refusal of something real.
"""

import collections
import json
import os
import pickle

import keras
import numpy as np
import pytest
import torch
from support import run_module
from torch_checkpoints import TorchResNet
from torch_checkpoints import classifier_head
from torch_checkpoints import official_state
from torch_checkpoints import paddle_names
from torch_checkpoints import save_official
from torch_checkpoints import save_pdparams
from torch_checkpoints import v2_head

from moco_keras import configs
from moco_keras import convert
from moco_keras import linear_classification


class Payload:
    """Pickles as a call that creates `marker`: `os.system("touch ...")`,
    or `eval` of Python that opens it (a builtin, as a pickle names it)."""

    def __init__(self, marker, call):
        self.marker, self.call = str(marker), call

    def __reduce__(self):
        if self.call == "system":
            return os.system, (f"touch {self.marker}",)
        return eval, (f"open({self.marker!r}, 'w').close()",)


def malicious(path, marker, call):
    """A checkpoint whose pickle calls `call` among real-looking weights."""
    weights = {"conv1.weight": np.zeros((8, 3, 7, 7), "float32")}
    if str(path).endswith(".pdparams"):
        with open(path, "wb") as f:
            pickle.dump({**weights, "x": Payload(marker, call)}, f, protocol=4)
    else:
        state = {n: torch.from_numpy(v) for n, v in weights.items()}
        torch.save({"state_dict": state, "x": Payload(marker, call)}, path)
    return str(path)


def read_unsafely(path):
    """What a plain reader would do with the file (the code runs)."""
    if path.endswith(".pdparams"):
        with open(path, "rb") as f:
            pickle.load(f)
    else:
        torch.load(path, weights_only=False)


@pytest.mark.parametrize("call", ["system", "eval"])
@pytest.mark.parametrize("suffix", [".pdparams", ".pth.tar"])
def test_a_pickle_that_calls_a_function_is_refused_unrun(
    tmp_path, suffix, call
):
    marker = tmp_path / "MARKER"
    path = malicious(tmp_path / f"checkpoint{suffix}", marker, call)
    with pytest.raises(convert.CheckpointError) as error:
        convert.convert(path)
    message = str(error.value)
    # torch names `eval` as `eval`, this package's reader `builtins.eval`.
    named = "posix.system" if call == "system" else "eval"
    assert message.startswith(f"{path} was refused: its pickle names ")
    assert message.split()[6].endswith(f"{named},")
    assert "Nothing in the file was run" in message
    # torch's own message advises weights_only=False: never passed on.
    assert "weights_only" not in message
    assert not marker.exists()
    read_unsafely(path)
    assert marker.exists()  # the file was live


def cut_in_half(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def real_checkpoint(path):
    """A PaddleFleetX linear classifier, or an official MoCo v2 run."""
    if path.endswith(".pdparams"):
        net = TorchResNet(18, 8, classifier_head, seed=0)
        fc = {
            "fc.weight": net.fc.weight.detach().numpy().T,
            "fc.bias": net.fc.bias.detach().numpy(),
        }
        save_pdparams(path, {**paddle_names(net), **fc})
    else:
        net = TorchResNet(18, 8, v2_head, seed=0)
        queue = np.zeros((128, 16), "float32")
        save_official(path, official_state(net, net, queue, 0))


@pytest.mark.parametrize("case", ["random", "empty", "text", "half"])
@pytest.mark.parametrize("suffix", [".pdparams", ".pth.tar"])
def test_a_corrupt_or_foreign_file_gets_a_message_naming_it(
    tmp_path, suffix, case
):
    path = str(tmp_path / f"checkpoint{suffix}")
    if case == "random":
        with open(path, "wb") as f:
            f.write(np.random.default_rng(0).bytes(4096))
    elif case == "empty":
        open(path, "wb").close()
    elif case == "text":
        with open(path, "w") as f:
            f.write("<html>Checkpoint moved</html>\n")
    else:
        real_checkpoint(path)
        convert.convert(path)  # whole, it converts
        cut_in_half(path)
    with pytest.raises(convert.CheckpointError) as error:
        convert.convert(path)
    message = str(error.value)
    kind = "PaddlePaddle" if suffix == ".pdparams" else "PyTorch"
    assert message.startswith(
        f"{path} is not a {kind} checkpoint, or it is corrupt ("
    )
    assert ("an empty file" in message) == (case == "empty")
    assert "weights_only" not in message


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_state_dicts_of_every_pickle_protocol_are_read(tmp_path, protocol):
    """What numpy and Python write at each protocol is allowed: protocol 2
    spells bytes as `_codecs.encode`, 5 arrays as `_frombuffer`, and numpy
    before 2.0 (older Paddle files) names `numpy.core`."""
    state = {
        "weight": np.arange(6, dtype="float32").reshape(2, 3),
        "queue_ptr": np.array([3], "int64"),
        "StructuredToParameterName@@": collections.OrderedDict(a="b"),
        "scalar": np.float64(0.5),
    }
    data = pickle.dumps(state, protocol=protocol)
    if protocol == 2:
        assert b"_codecs\nencode" in data
        data = data.replace(b"numpy._core", b"numpy.core")
        assert b"numpy.core.multiarray\n_reconstruct" in data
    path = tmp_path / "state.pdparams"
    path.write_bytes(data)
    read, source, _ = convert.read_checkpoint(str(path))
    assert source == "paddle" and sorted(read) == [
        "queue_ptr",
        "scalar",
        "weight",
    ]
    for name in read:
        np.testing.assert_array_equal(read[name], state[name])
        assert read[name].dtype == np.asarray(state[name]).dtype


def lambda_model(path, marker):
    """A `.keras` file whose Lambda layer creates `marker` when it runs."""
    inputs = keras.Input((2,))
    layer = keras.layers.Lambda(
        lambda x: x if open(marker, "w").close() is None else x
    )
    keras.Model(inputs, layer(inputs)).save(path)
    os.remove(marker)  # building the model ran it once
    return str(path)


def test_a_keras_file_with_code_is_refused_unrun(tmp_path):
    marker = str(tmp_path / "MARKER")
    path = lambda_model(tmp_path / "ckpt-000000001.keras", marker)
    with pytest.raises(convert.CheckpointError) as error:
        convert.load_keras(path)
    message = str(error.value)
    assert message.startswith(f"{path} was refused: it holds Python code")
    assert "safe_mode" not in message and "unsafe" not in message
    # As --pretrained: the same refusal, in the flag's words.
    with pytest.raises(configs.ConfigError, match="--pretrained is not a MoCo"):
        linear_classification.load_backbone(path)
    assert not os.path.exists(marker)
    keras.saving.load_model(path, safe_mode=False)
    assert os.path.exists(marker)  # the file was live


def test_only_keras_files_are_read_as_models(tmp_path):
    """A PyTorch file, an HDF5 model or anything else given where a Keras
    model is read is refused by its name, before it is opened."""
    marker = tmp_path / "MARKER"
    for name in ("checkpoint.pth.tar", "model.h5", "model.pkl"):
        path = malicious(tmp_path / name, marker, "system")
        with pytest.raises(convert.CheckpointError) as error:
            convert.load_keras(path)
        assert str(error.value).startswith(f"{path} is not a .keras file")
        assert f"recipes.convert --source={path}" in str(error.value)
    assert not marker.exists()
    garbage = tmp_path / "model.keras"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(
        convert.CheckpointError, match="not a Keras model file .* or it is"
    ):
        convert.load_keras(str(garbage))


def test_a_converted_folder_is_read_as_untrusted(tmp_path):
    """A folder as recipes/convert writes it, from elsewhere: its model is
    the folder's own model.keras (never a path its metadata names), read
    with safe mode, and metadata that does not fit is refused."""
    folder = tmp_path / "converted"
    folder.mkdir()
    metadata = {
        "kind": "classifier",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "model": str(tmp_path / "elsewhere.keras"),
    }
    (folder / convert.METADATA).write_text(json.dumps(metadata))
    inputs = keras.Input((4, 4, 3))
    backbone = keras.Sequential(
        [keras.Input((4, 4, 3)), keras.layers.GlobalAveragePooling2D()],
        name="backbone",
    )
    classifier = keras.Model(inputs, keras.layers.Dense(2)(backbone(inputs)))
    classifier.save(folder / convert.MODEL_FILE)
    marker = str(tmp_path / "MARKER")
    lambda_model(tmp_path / "elsewhere.keras", marker)
    backbone, normalization = linear_classification.load_backbone(str(folder))
    assert backbone.name == "backbone" and normalization[0] == (0.5,) * 3
    lambda_model(folder / convert.MODEL_FILE, marker)
    with pytest.raises(convert.CheckpointError, match="was refused"):
        linear_classification.load_backbone(str(folder))
    assert not os.path.exists(marker)
    for broken in ("{not json", json.dumps({**metadata, "mean": "0.5"})):
        (folder / convert.METADATA).write_text(broken)
        with pytest.raises(convert.CheckpointError) as error:
            convert.load_converted(str(folder))
        assert str(error.value).startswith(
            str(folder / convert.METADATA)
        ) and "Convert the checkpoint again" in str(error.value)


@pytest.mark.process
@pytest.mark.backends("torch")
def test_the_recipes_refuse_with_a_message_and_no_traceback(tmp_path):
    marker = tmp_path / "MARKER"
    evil = malicious(tmp_path / "moco_v2.pdparams", marker, "system")
    corrupt = str(tmp_path / "moco_v2.pth.tar")
    with open(corrupt, "wb") as f:
        f.write(b"\x80\x02")
    code = lambda_model(tmp_path / "ckpt-000000001.keras", str(marker))
    output, workdir = f"--output={tmp_path / 'out'}", f"--workdir={tmp_path}"
    for split in ("train", "val"):  # the folder lincls checks; never read
        (tmp_path / "data" / split / "a").mkdir(parents=True)
    workdir = [workdir, f"--data_dir={tmp_path / 'data'}"]
    for module, flags, expected in (
        ("convert", [f"--source={evil}", output], f"{evil} was refused"),
        ("convert", [f"--source={corrupt}", output], "is not a PyTorch"),
        ("lincls", [f"--pretrained={code}", *workdir], f"{code} was refused"),
    ):
        result = run_module(f"moco_keras.recipes.{module}", *flags)
        assert result.returncode == 1, result.stderr[-2000:]
        assert expected in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr, result.stderr[-2000:]
        assert "weights_only" not in result.stderr
    assert not marker.exists()
