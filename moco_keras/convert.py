"""Checkpoints of the official PyTorch code and of PaddleFleetX, in Keras.

`convert(path)` reads a checkpoint, recognises what it holds and returns the
Keras model with its weights:

- official MoCo pretraining (`main_moco.py`'s `*.pth.tar`: `state_dict` with
  `module.encoder_q.*`, `module.encoder_k.*`, `module.queue`,
  `module.queue_ptr`; with or without `module.`; v1 head `fc`, v2 `fc.0` /
  `fc.2`) and PaddleFleetX pretraining (`*.pdparams`: `base_encoder.*`,
  `momentum_encoder.*`, `queue`, `queue_ptr`): a `MoCo` model, queue and
  pointer included, ready to train on;
- official MoCo v3 pretraining (facebookresearch/moco-v3 `main_moco.py`'s
  `r-50-*.pth.tar`, `vit-s-300ep.pth.tar`, `vit-b-300ep.pth.tar`:
  `module.base_encoder.*` with its projector as `fc.*` (ResNet) or
  `head.*` (ViT, timm's names), `module.momentum_encoder.*`,
  `module.predictor.*`): a `mocov3.MoCoV3` model (`kind="mocov3"`);
- a linear-classification checkpoint (official `main_lincls.py`, or
  PaddleFleetX's) or a bare torchvision ResNet state dict: the classifier,
  a `keras.Model` from images to logits whose layer `fc` is the linear layer
  and whose layer `backbone` is the encoder.

Weights are laid out as Keras wants them (convolutions `[kh, kw, in, out]`,
dense kernels `[in, out]`; PaddleFleetX's Linear weights already are), and
BN statistics named as Keras names them. The architecture (ResNet-18, 34 or
50 and its width) is read from the shapes. Nothing is assigned unless every
variable of the model finds a tensor of its shape and every tensor a
variable: otherwise `ValueError` names the missing, unexpected and
mismatched entries.

Each source normalized its inputs its own way (the official code with
ImageNet's mean and std, PaddleFleetX with 0.5 and 0.5): `Converted`
carries it, `save` writes it beside the model and the recipes read it.

Reading `.pth.tar` needs torch (`pip install torch`); `.pdparams` files are
pickles of numpy arrays, read without Paddle.

Checkpoints come from the internet, so no file read here can run code: a
`.pdparams` pickle may name only what a state dict holds (numpy arrays and
dtypes, dicts, lists, tuples; `_StateDictUnpickler`), torch files are read
with `weights_only=True`, `.keras` files with Keras' `safe_mode`
(`load_keras`). A file that names anything else, or that is corrupt or of
another kind, raises `CheckpointError`, whose message names the file; nothing
in it was run.
"""

import collections
import dataclasses
import importlib
import json
import os
import pickle
import re

import keras
import numpy as np

from moco_keras import color
from moco_keras import encoders
from moco_keras import vits
from moco_keras.moco import MoCo
from moco_keras.mocov3 import PRESETS as MOCOV3_PRESETS
from moco_keras.mocov3 import MoCoV3
from moco_keras.momentum_pair import MomentumPair
from moco_keras.presets import MOCOV1
from moco_keras.presets import MOCOV2

# Input normalization of each source, (mean, std) on [0, 1] pixels.
NORMALIZATION = {
    "pytorch": (color.IMAGENET_MEAN, color.IMAGENET_STD),
    "paddle": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
# What `save` writes beside the model.
METADATA = "conversion.json"
MODEL_FILE = "model.keras"

# PyTorch's BN names -> Keras'.
BN_NAMES = {
    "weight": "gamma",
    "bias": "beta",
    "running_mean": "moving_mean",
    "running_var": "moving_variance",
}
_PADDLE_BN = {"_mean": "running_mean", "_variance": "running_var"}


@dataclasses.dataclass
class Converted:
    """A converted checkpoint.

    Attributes:
        model: a `MoCo` model (`kind="moco"`), a `MoCoV3` model
            (`kind="mocov3"`) or a classifier `keras.Model`
            (`kind="classifier"`).
        kind: `"moco"`, `"mocov3"` or `"classifier"`.
        source: `"pytorch"` or `"paddle"`.
        mean, std: the input normalization the weights were trained with.
        info: what was read: architecture, width, head, queue size, classes.
    """

    model: keras.Model
    kind: str
    source: str
    mean: tuple
    std: tuple
    info: dict

    @property
    def backbone(self):
        """The encoder (pooled features), for `recipes/lincls`."""
        return backbone_of(self.model)

    def save(self, directory):
        """Writes `model.keras` and `conversion.json` into `directory`."""
        os.makedirs(directory, exist_ok=True)
        self.model.save(os.path.join(directory, MODEL_FILE))
        metadata = {
            "kind": self.kind,
            "source": self.source,
            "mean": list(self.mean),
            "std": list(self.std),
            "model": MODEL_FILE,
            **self.info,
        }
        with open(os.path.join(directory, METADATA), "w") as f:
            json.dump(metadata, f, indent=2, sort_keys=True)


class CheckpointError(ValueError):
    """A file that is not a checkpoint this package reads: corrupt, of
    another kind, or holding code. The message names the file; nothing in
    the file was run."""


# The formats `convert` reads, for the messages.
FORMATS = (
    ".pth.tar / .pth (official MoCo, main_lincls.py or torchvision, "
    "written by torch.save) or .pdparams (PaddleFleetX, paddle.save)"
)


def _numpy_module(name):
    # numpy 2 moved numpy.core to numpy._core; pickles name either.
    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{name}")


def _latin1_encode(text, encoding):
    """`_codecs.encode` as protocol-2 pickles spell bytes, latin-1 only."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


def _state_dict_globals():
    """What a state dict's pickle may name: numpy arrays (rebuilt from
    their bytes), dtypes and scalars, and containers. Each is a constructor
    of plain data; none runs code of the file's choosing."""
    multiarray = _numpy_module("multiarray")
    numeric = _numpy_module("numeric")
    allowed = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_codecs", "encode"): _latin1_encode,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = (
            multiarray._reconstruct
        )
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    for container in (dict, list, tuple, set, frozenset):
        allowed[("builtins", container.__name__)] = container
    return allowed


_STATE_DICT_GLOBALS = _state_dict_globals()


class _Refused(pickle.UnpicklingError):
    """A global outside `_STATE_DICT_GLOBALS`, refused before any call."""


class _StateDictUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` for state dicts: like torch's `weights_only=True`,
    a global the pickle names is looked up in `_STATE_DICT_GLOBALS` and
    anything else is refused, so a pickle that would call `os.system` (or
    any function) fails before the call. Persistent ids are refused too
    (`pickle.Unpickler`'s default)."""

    def find_class(self, module, name):
        found = _STATE_DICT_GLOBALS.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found


def _size(path):
    size = os.path.getsize(path)
    return "an empty file" if size == 0 else f"{size:,} bytes"


def _refused(path, name):
    return CheckpointError(
        f"{path} was refused: its pickle names {name}, which no checkpoint "
        "of weights holds (a state dict holds arrays, numbers, strings and "
        "containers), so it may run code on this machine. Nothing in the "
        "file was run. Download the checkpoint again from its publisher, or "
        "ask whoever sent it for the state dict alone."
    )


def _corrupt(path, kind, error):
    return CheckpointError(
        f"{path} is not a {kind} checkpoint, or it is corrupt ({_size(path)}; "
        f"reading it stopped with {type(error).__name__}). This converter "
        f"reads {FORMATS}. A file cut short by a download gives this too: "
        "download it again and compare its checksum with the published one."
    )


def _read_pdparams(path):
    with open(path, "rb") as f:
        try:
            return _StateDictUnpickler(f, encoding="latin1").load()
        except _Refused as refused:
            raise _refused(path, str(refused)) from None
        except Exception as error:  # noqa: BLE001 - any failure: corrupt.
            raise _corrupt(path, "PaddlePaddle", error) from None


def _read_torch(path):
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            f"Reading the PyTorch checkpoint {path} needs torch, which is not "
            "installed. Install the CPU build: pip install torch "
            "--index-url https://download.pytorch.org/whl/cpu"
        ) from error
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - each is a message.
        # torch's refusal names the global ("... GLOBAL posix.system ...")
        # and suggests weights_only=False, which this message must not.
        refused = re.search(r"GLOBAL ([\w.]+)", str(error))
        if isinstance(error, pickle.UnpicklingError) and refused:
            raise _refused(path, refused.group(1)) from None
        raise _corrupt(path, "PyTorch", error) from None


def read_checkpoint(path):
    """`(state, source, arch)` of a `.pth.tar` / `.pth` / `.pdparams`.

    `state` is `{name: numpy array}`: the official files hold `{"epoch",
    "arch", "state_dict", "optimizer"}`, whose `state_dict` it is; `arch`
    is that file's `arch` (`""` if none) and `source` `"pytorch"` or
    `"paddle"`. Nothing in the file can run code (the module's docstring).

    Raises:
        FileNotFoundError: no file at `path`.
        CheckpointError: a corrupt file, a file of another kind, or a
            pickle that names anything but plain data.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No checkpoint at {path!r}.")
    if path.endswith(".pdparams"):
        state = _read_pdparams(path)
        if not isinstance(state, dict):
            raise CheckpointError(
                f"{path} is not a PaddlePaddle state dict (a pickled dict of "
                f"arrays); it holds a {type(state).__name__}."
            )
        state = {
            name: np.asarray(value)
            for name, value in state.items()
            if name != "StructuredToParameterName@@"
        }
        return state, "paddle", ""
    checkpoint = _read_torch(path)
    arch = ""
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        arch = str(checkpoint.get("arch", ""))
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{path} holds a {type(checkpoint).__name__}, not a state dict "
            "or a {'state_dict': ...} checkpoint."
        )
    state = {}
    for name, value in checkpoint.items():
        if hasattr(value, "detach"):
            state[name] = value.detach().cpu().numpy()
    return state, "pytorch", arch


def _strip_module(state):
    if all(name.startswith("module.") for name in state):
        return {name[len("module.") :]: value for name, value in state.items()}
    return state


def _paddle_backbone(state):
    """PaddleFleetX ResNet names to torchvision's (BN `_mean`, `_variance`)."""
    renamed = {}
    for name, value in state.items():
        prefix, _, last = name.rpartition(".")
        renamed[f"{prefix}.{_PADDLE_BN.get(last, last)}"] = value
    return renamed


def _split(state, prefix):
    return {
        name[len(prefix) :]: value
        for name, value in state.items()
        if name.startswith(prefix)
    }


def _canonical(state, source, path):
    """The checkpoint in torchvision's names and PyTorch's layouts.

    Returns:
        `(kind, parts, rest)`: `"moco"` with parts `q`, `k` (backbones),
        `head_q`, `head_k` (`fc.*` / `fc.0.*` / `fc.2.*`), `queue`,
        `queue_ptr`; or `"classifier"` with parts `backbone` and `fc`
        (`fc.weight`, `fc.bias`); `rest`: the names that belong to neither.
    """
    state = {
        name: value
        for name, value in _strip_module(state).items()
        if not name.endswith("num_batches_tracked")
    }
    if source == "pytorch" and any(n.startswith("encoder_q.") for n in state):
        parts = {"queue": state.pop("queue", None)}
        parts["queue_ptr"] = state.pop("queue_ptr", None)
        for side in ("q", "k"):
            encoder = _split(state, f"encoder_{side}.")
            parts[f"head_{side}"] = {
                n: v for n, v in encoder.items() if n.startswith("fc.")
            }
            parts[side] = {
                n: v for n, v in encoder.items() if not n.startswith("fc.")
            }
        used = {f"encoder_{s}." for s in "qk"}
        rest = [n for n in state if not any(n.startswith(u) for u in used)]
        return "moco", parts, rest
    if source == "paddle" and any(n.startswith("base_encoder.") for n in state):
        parts = {"queue": state.pop("queue", None)}
        parts["queue_ptr"] = state.pop("queue_ptr", None)
        for side, prefix in (
            ("q", "base_encoder."),
            ("k", "momentum_encoder."),
        ):
            encoder = _split(state, prefix)
            parts[side] = _paddle_backbone(_split(encoder, "0."))
            projector = _split(encoder, "1.mlp.0.")
            classifier = _split(encoder, "2.fc.")
            layers = {"fc.2." if projector else "fc.": classifier}
            if projector:
                layers["fc.0."] = projector
            head = {}
            for prefix, weights in layers.items():
                for name, value in weights.items():
                    # Paddle's Linear weight is [in, out], PyTorch's [out, in].
                    head[prefix + name] = value.T if name == "weight" else value
            parts[f"head_{side}"] = head
        known = ("base_encoder.", "momentum_encoder.")
        rest = [n for n in state if not n.startswith(known)]
        read = ("0.", "1.mlp.0.", "2.fc.")
        rest += [
            name
            for name in state
            if name.startswith(known)
            and not name.split(".", 1)[1].startswith(read)
        ]
        return "moco", parts, rest
    fc = {n: v for n, v in state.items() if n.startswith("fc.")}
    backbone = {n: v for n, v in state.items() if not n.startswith("fc.")}
    if source == "paddle":
        backbone = _paddle_backbone(backbone)
        if "fc.weight" in fc:
            fc["fc.weight"] = fc["fc.weight"].T
    if "conv1.weight" not in backbone:
        raise CheckpointError(
            f"{path} is neither a MoCo pretraining checkpoint (no "
            "encoder_q.* / base_encoder.* keys) nor a ResNet (no "
            f"conv1.weight). Its first keys: {sorted(state)[:8]}."
        )
    return "classifier", {"backbone": backbone, "fc": fc}, []


_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.")


def infer_architecture(backbone, origin="The encoder"):
    """`(arch, width)` of a torchvision ResNet state dict, from its shapes;
    `origin` (the file) names it in the errors."""
    blocks = [0, 0, 0, 0]
    for name in backbone:
        match = _BLOCK.match(name)
        if match:
            stage, index = int(match.group(1)) - 1, int(match.group(2))
            blocks[stage] = max(blocks[stage], index + 1)
    bottleneck = any(".conv3." in name for name in backbone)
    if "conv1.weight" not in backbone:
        raise CheckpointError(
            f"{origin} has no conv1.weight, so its architecture cannot be "
            f"read; nothing was loaded. Its first keys: {sorted(backbone)[:8]}."
        )
    kernel = backbone["conv1.weight"]
    width = int(kernel.shape[0])
    cifar_stem = kernel.shape[-1] == 3
    found = {
        ((2, 2, 2, 2), False): "resnet18",
        ((3, 4, 6, 3), False): "resnet34",
        ((3, 4, 6, 3), True): "resnet50",
    }.get((tuple(blocks), bottleneck))
    if found is None:
        raise CheckpointError(
            f"{origin} is an unsupported ResNet: blocks per stage {blocks}, "
            f"{'bottleneck' if bottleneck else 'basic'} blocks. This library "
            "builds ResNet-18, 34 and 50 (torchvision's layouts)."
        )
    if cifar_stem:
        if found != "resnet18":
            raise CheckpointError(
                f"{origin} has a 3x3 stem on {found}, which is not supported."
            )
        return "cifar_resnet18", width
    return found, width


class _Plan:
    """Assignments gathered before any is made (all or nothing)."""

    def __init__(self):
        self.assignments, self.missing, self.mismatched = [], [], []
        self.prefix = ""  # the checkpoint's name of the part being planned

    def add(self, variable, name, tensors, transform=None):
        if name not in tensors:
            self.missing.append(f"{self.prefix}{name}")
            return
        original = tensors.pop(name)
        value = original if transform is None else transform(original)
        if tuple(value.shape) != tuple(variable.shape):
            self.mismatched.append(
                f"{self.prefix}{name}: {tuple(original.shape)} in the "
                f"checkpoint, the Keras variable {variable.path} is "
                f"{tuple(variable.shape)}"
            )
            return
        self.assignments.append((variable, value))

    def apply(self, unexpected, origin):
        problems = []
        for title, items in (
            ("missing", self.missing),
            ("unexpected", unexpected),
            ("with mismatched shapes", self.mismatched),
        ):
            if items:
                shown = "; ".join(items[:10])
                more = f" and {len(items) - 10} more" if len(items) > 10 else ""
                problems.append(f"{len(items)} {title}: {shown}{more}")
        if problems:
            raise CheckpointError(
                f"{origin} does not fit the model it describes, so nothing "
                "was loaded. Keys " + ". Keys ".join(problems) + ". Is it a "
                "MoCo, linear-classification or torchvision ResNet "
                "checkpoint, whole and unmodified?"
            )
        for variable, value in self.assignments:
            variable.assign(value.astype(variable.dtype))


def torch_key(layer):
    """The PyTorch module name of one of our layers: `layer1_0_downsample_1`
    is torchvision's `layer1.0.downsample.1`, `fc_0` the official head's
    `fc.0`."""
    return layer.name.replace("_", ".")


def _plan_backbone(plan, encoder, backbone, prefix=""):
    """Every weight of `encoder` from the torchvision-named `backbone`."""
    plan.prefix = prefix
    for layer in encoder.layers:
        key = torch_key(layer)
        if isinstance(layer, keras.layers.Conv2D):
            plan.add(
                layer.kernel,
                f"{key}.weight",
                backbone,
                lambda w: np.transpose(w, (2, 3, 1, 0)),
            )
        elif isinstance(layer, keras.layers.BatchNormalization):
            for torch_name, keras_name in BN_NAMES.items():
                plan.add(
                    getattr(layer, keras_name), f"{key}.{torch_name}", backbone
                )
        elif layer.weights:
            raise ValueError(f"No mapping for the layer {layer.name!r}.")
    return [f"{prefix}{name}" for name in backbone]


def _plan_dense(plan, dense, weights, prefix):
    plan.add(dense.kernel, f"{prefix}weight", weights, np.transpose)
    plan.add(dense.bias, f"{prefix}bias", weights)


def convert(path, bn_splits=1, input_shape=(None, None, 3)):
    """Reads a checkpoint of the official code or PaddleFleetX into Keras.

    Args:
        path: a `.pth.tar` / `.pth` (PyTorch) or `.pdparams` (PaddleFleetX)
            file.
        bn_splits: split BN groups of the built encoders (pretraining on one
            device; 1 for evaluation or several devices).
        input_shape: the encoders' image shape (any size by default).

    Returns:
        A `Converted`.

    Example:

    ```python
    converted = convert("moco_v2_800ep_pretrain.pth.tar")
    features = converted.backbone(images)  # images normalized as
    # (x / 255 - converted.mean) / converted.std
    converted.save("converted/mocov2_800ep")
    ```
    """
    state, source, saved_arch = read_checkpoint(path)
    stripped = _strip_module(state)
    if source == "pytorch" and any(
        n.startswith("predictor.") for n in stripped
    ):
        return _convert_mocov3(
            path, stripped, saved_arch, bn_splits, input_shape
        )
    kind, parts, unexpected = _canonical(state, source, path)
    plan = _Plan()
    if kind == "moco":
        arch, width = infer_architecture(parts["q"], path)
        head = parts["head_q"]
        mlp = "fc.0.weight" in head
        last = head.get("fc.2.weight" if mlp else "fc.weight")
        queue = parts["queue"]
        if last is None or queue is None:
            missing = [
                name
                for name, value in (("fc head", last), ("queue", queue))
                if value is None
            ]
            raise CheckpointError(
                f"{path} is a MoCo checkpoint without its "
                f"{' and '.join(missing)}; nothing was loaded."
            )
        dim, queue_size = int(last.shape[0]), int(queue.shape[1])
        encoder = encoders.get_encoder(
            arch, width=width, bn_splits=bn_splits, input_shape=input_shape
        )
        model = MoCo(
            encoder,
            dim=dim,
            mlp=mlp,
            queue_size=queue_size,
            # Not in the checkpoints: the paper's value for v1 or v2.
            temperature=(MOCOV2 if mlp else MOCOV1)["temperature"],
        )
        for side in ("q", "k"):
            if source == "pytorch":
                prefix = head_prefix = f"module.encoder_{side}."
            else:
                encoder_name = "base" if side == "q" else "momentum"
                prefix = f"{encoder_name}_encoder.0."
                head_prefix = f"{encoder_name}_encoder (head) "
            unexpected += _plan_backbone(
                plan, getattr(model, f"encoder_{side}"), parts[side], prefix
            )
            head_weights = parts[f"head_{side}"]
            plan.prefix = head_prefix
            for dense in getattr(model, f"head_{side}").layers:
                key = torch_key(dense) + "."
                _plan_dense(plan, dense, head_weights, key)
            unexpected += [f"{head_prefix}{n}" for n in head_weights]
        plan.prefix = ""
        plan.add(model.queue, "queue", {"queue": queue})
        ptr = parts["queue_ptr"]
        ptr = np.asarray(0 if ptr is None else ptr).reshape(())
        plan.add(model.queue_ptr, "queue_ptr", {"queue_ptr": ptr})
        info = {
            "arch": arch,
            "width": width,
            "mlp": mlp,
            "dim": dim,
            "queue_size": queue_size,
        }
    else:
        backbone = parts["backbone"]
        arch, width = infer_architecture(backbone, path)
        encoder = encoders.get_encoder(
            arch,
            width=width,
            bn_splits=bn_splits,
            input_shape=input_shape,
            name="backbone",
        )
        fc = parts["fc"]
        if "fc.weight" not in fc:
            raise CheckpointError(
                f"{path} has a ResNet without its `fc` layer; nothing was "
                "loaded. (A MoCo checkpoint has encoder_q.* keys.)"
            )
        classes = int(fc["fc.weight"].shape[0])
        inputs = keras.Input(input_shape)
        dense = keras.layers.Dense(classes, name="fc")
        model = keras.Model(
            inputs, dense(encoder(inputs)), name="linear_classifier"
        )
        unexpected += _plan_backbone(plan, encoder, backbone)
        plan.prefix = ""
        _plan_dense(plan, dense, fc, "fc.")
        unexpected += list(fc)
        info = {"arch": arch, "width": width, "classes": classes}
    plan.apply(unexpected, path)
    mean, std = NORMALIZATION[source]
    info["checkpoint"] = os.path.abspath(path)
    return Converted(model, kind, source, tuple(mean), tuple(std), info)


def _plan_mlp(plan, mlp, weights, prefix):
    """A MoCo v3 MLP from the official `nn.Sequential`'s `i.weight`, ..."""
    plan.prefix = prefix
    for index, layer in enumerate(mlp.layers):
        if isinstance(layer, keras.layers.Dense):
            plan.add(layer.kernel, f"{index}.weight", weights, np.transpose)
        elif isinstance(layer, keras.layers.BatchNormalization):
            for torch_name, keras_name in BN_NAMES.items():
                variable = getattr(layer, keras_name, None)
                if variable is not None:
                    plan.add(variable, f"{index}.{torch_name}", weights)
    return [f"{prefix}{name}" for name in weights]


def _plan_vit(plan, encoder, weights, prefix):
    """A `vits.vit` encoder from timm's names (`export_pytorch.
    timm_vit_state` is the other way)."""
    plan.prefix = prefix
    for layer in encoder.layers:
        key = torch_key(layer)
        if layer.name == "patch_embed_proj":
            plan.add(
                layer.kernel,
                "patch_embed.proj.weight",
                weights,
                lambda w: np.transpose(w, (2, 3, 1, 0)),
            )
            plan.add(layer.bias, "patch_embed.proj.bias", weights)
        elif layer.name == "embedding":
            plan.add(layer.cls_token, "cls_token", weights)
            plan.add(layer.pos_embed, "pos_embed", weights)
        elif isinstance(layer, keras.layers.LayerNormalization):
            plan.add(layer.gamma, f"{key}.weight", weights)
            plan.add(layer.beta, f"{key}.bias", weights)
        elif isinstance(layer, keras.layers.Dense):
            _plan_dense(plan, layer, weights, f"{key}.")
        elif isinstance(layer, vits.Attention):
            _plan_dense(plan, layer.qkv, weights, f"{key}.qkv.")
            _plan_dense(plan, layer.proj, weights, f"{key}.proj.")
        elif layer.weights:
            raise ValueError(f"No mapping for the layer {layer.name!r}.")
    return [f"{prefix}{name}" for name in weights]


def _linear_count(weights):
    """Linear layers of an official MLP: its 2-D `i.weight` entries."""
    return sum(
        1
        for name, value in weights.items()
        if name.endswith(".weight") and np.ndim(value) == 2
    )


def _vit_encoder(backbone, arch, input_shape, path):
    """The `vits.vit` that a timm-named state dict describes."""
    kernel = backbone.get("patch_embed.proj.weight")
    if kernel is None or "pos_embed" not in backbone:
        raise CheckpointError(
            f"{path}: its ViT has no patch_embed.proj.weight or pos_embed, so "
            "its shape cannot be read; nothing was loaded."
        )
    embed_dim, patch_size = int(kernel.shape[0]), int(kernel.shape[-1])
    grid = int(round((backbone["pos_embed"].shape[1] - 1) ** 0.5))
    depth = len(
        {name.split(".")[1] for name in backbone if name.startswith("blocks.")}
    )
    hidden = backbone["blocks.0.mlp.fc1.weight"].shape[0]
    # The heads are not in the weights: MoCo v3's ViT-S and ViT-B have 12.
    presets = {"vit_small": vits.VIT_SMALL, "vit_base": vits.VIT_BASE}
    num_heads = presets.get(arch, vits.VIT_SMALL)["num_heads"]
    size = input_shape[0] if input_shape[0] else grid * patch_size
    return vits.vit(
        image_size=size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=hidden / embed_dim,
        stop_grad_conv1=True,
        name=arch if arch in presets else "vit",
    )


def _convert_mocov3(path, state, arch, bn_splits, input_shape):
    """`convert` of an official MoCo v3 pretraining checkpoint; `arch` is
    the file's (`main_moco.py` saves vit_small, vit_base or resnet50 beside
    the weights)."""
    state = {
        name: value
        for name, value in state.items()
        if not name.endswith("num_batches_tracked")
    }
    base = _split(state, "base_encoder.")
    vit = "patch_embed.proj.weight" in base
    head_name = "head." if vit else "fc."
    sides = {}
    for side, prefix in (("q", "base_encoder."), ("k", "momentum_encoder.")):
        encoder = _split(state, prefix)
        sides[side] = (
            {n: v for n, v in encoder.items() if not n.startswith(head_name)},
            _split(encoder, head_name),
        )
    predictor = _split(state, "predictor.")
    projector = sides["q"][1]
    if not projector or not predictor:
        raise CheckpointError(
            f"{path} is a MoCo v3 checkpoint without its projector "
            f"({head_name}*) or predictor; nothing was loaded."
        )
    if vit:
        input_shape = tuple(input_shape)
        encoder = _vit_encoder(sides["q"][0], arch, input_shape, path)
        info = {"arch": encoder.name, "embed_dim": encoder.output.shape[-1]}
    else:
        arch_found, width = infer_architecture(sides["q"][0], path)
        encoder = encoders.get_encoder(
            arch_found,
            width=width,
            bn_splits=bn_splits,
            input_shape=input_shape,
        )
        info = {"arch": arch_found, "width": width}
    projector_layers = _linear_count(projector)
    predictor_layers = _linear_count(predictor)
    last = 3 * (predictor_layers - 1)  # the predictor's last Linear
    dim = int(predictor[f"{last}.weight"].shape[0])
    mlp_dim = int(projector["0.weight"].shape[0])
    preset = MOCOV3_PRESETS["mocov3_vit" if vit else "mocov3_resnet"]
    model = MoCoV3(
        encoder,
        dim=dim,
        mlp_dim=mlp_dim,
        projector_layers=projector_layers,
        predictor_last_bn=f"{last + 1}.running_mean" in predictor,
        # Not in the checkpoints: the official recipes' values.
        momentum=preset["momentum"],
        temperature=preset["temperature"],
    )
    plan = _Plan()
    unexpected = [
        name
        for name in state
        if not name.startswith(
            ("base_encoder.", "momentum_encoder.", "predictor.")
        )
    ]
    for side, prefix in (("q", "base_encoder."), ("k", "momentum_encoder.")):
        backbone, head = sides[side]
        if vit:
            unexpected += _plan_vit(
                plan, getattr(model, f"encoder_{side}"), backbone, prefix
            )
        else:
            unexpected += _plan_backbone(
                plan, getattr(model, f"encoder_{side}"), backbone, prefix
            )
        unexpected += _plan_mlp(
            plan,
            getattr(model, f"projector_{side}"),
            head,
            f"{prefix}{head_name}",
        )
    unexpected += _plan_mlp(plan, model.predictor, predictor, "predictor.")
    plan.apply(unexpected, path)
    info.update(
        {
            "dim": dim,
            "mlp_dim": mlp_dim,
            "projector_layers": projector_layers,
            "checkpoint": os.path.abspath(path),
        }
    )
    mean, std = NORMALIZATION["pytorch"]
    return Converted(model, "mocov3", "pytorch", tuple(mean), tuple(std), info)


def backbone_of(model):
    """The encoder of a converted model: a MoCo's query encoder, or the
    classifier's `backbone` layer."""
    if isinstance(model, MomentumPair):
        return model.encoder_q
    return model.get_layer("backbone")


def load_keras(path):
    """A `.keras` model file from anywhere, read so that nothing in it runs.

    Keras reads it in `safe_mode`: a file that holds Python code (a
    `Lambda` layer's function, saved as bytecode) is refused, and the
    classes it names must be Keras' own or registered ones (`MoCo`,
    `SplitBatchNormalization`, ...). Any other format (`.h5`, a pickle, a
    PyTorch file) is refused by its name before it is opened.

    Args:
        path: a `.keras` file.

    Returns:
        The model, not compiled.

    Raises:
        CheckpointError: what was wrong, naming the file; nothing in the
            file was run.

    Example:

    >>> import keras, os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "model.keras")
    >>> keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]).save(path)
    >>> load_keras(path).count_params()
    3
    """
    if not path.endswith(".keras"):
        raise CheckpointError(
            f"{path} is not a .keras file: models and checkpoints are read "
            "only as Keras writes them (.keras, in Keras' safe mode). A "
            "checkpoint of the official code or of PaddleFleetX is converted "
            f"first: python -m moco_keras.recipes.convert --source={path} "
            "--output=DIR, then pass DIR."
        )
    if not os.path.isfile(path):
        raise CheckpointError(f"No Keras model file at {path!r}.")
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # noqa: BLE001 - each is a message.
        text = str(error)
        # Keras' own message suggests turning safe mode off; this one must
        # not.
        if "safe_mode" in text or "unsafe_deserialization" in text:
            raise CheckpointError(
                f"{path} was refused: it holds Python code (a Lambda layer "
                "or a function saved as bytecode), which is never run from "
                "a file. Nothing in it was run. The models of this package "
                "hold no code; was the file written by moco_keras?"
            ) from None
        first = text.strip().splitlines()[0][:300] if text.strip() else ""
        raise CheckpointError(
            f"{path} is not a Keras model file that this package can read, "
            f"or it is corrupt ({_size(path)}; Keras stopped with "
            f"{type(error).__name__}: {first})"
        ) from None


def load_converted(directory):
    """`(model, metadata)` of a directory that `Converted.save` wrote.

    The directory may come from elsewhere: its model is read with
    `load_keras`, from `model.keras` inside it (never from a path the
    metadata names), and the metadata is checked before it is used.
    """
    path = os.path.join(directory, METADATA)
    try:
        with open(path) as f:
            metadata = json.load(f)
        normalization = [metadata["mean"], metadata["std"]]
        valid = metadata["kind"] in ("moco", "mocov3", "classifier") and all(
            len(values) == 3
            and all(isinstance(v, (int, float)) for v in values)
            for values in normalization
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"{path} cannot be read ({type(error).__name__}: {error}); "
            "recipes/convert writes it beside model.keras. Convert the "
            "checkpoint again."
        ) from None
    if not valid:
        raise CheckpointError(
            f"{path} is not what recipes/convert writes: it needs `kind` "
            "(moco, mocov3 or classifier) and three numbers each of `mean` "
            "and `std`. Convert the checkpoint again."
        )
    return load_keras(os.path.join(directory, MODEL_FILE)), metadata
