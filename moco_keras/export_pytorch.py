"""The weights out to the PyTorch world: torchvision, official MoCo and
detectron2 files.

`moco_keras.convert` reads these layouts in; this module writes them, with
the same names (a Keras layer `layer1_0_downsample_1` is torchvision's
`layer1.0.downsample.1`) and layouts (convolutions `[out, in, kh, kw]`,
linear weights `[out, in]`):

- `torchvision_state(backbone, fc)`: a `torchvision.models.resnet{18,34,50}`
  state dict, BN running statistics and `num_batches_tracked` included;
  without `fc` only `fc.weight` and `fc.bias` are missing when loaded.
- `moco_pytorch_checkpoint(model)`: the checkpoint `main_moco.py` writes
  (`state_dict` with `module.encoder_q.*`, `module.encoder_k.*`,
  `module.queue`, `module.queue_ptr`; `epoch`, `arch`, `optimizer`), which
  the official `main_lincls.py` and detection converter take.
- `detectron2_model(state)`: what the official
  `detection/convert-pretrain-to-detectron2.py` writes from such a
  checkpoint (`stem.conv1.*`, `res2.0.conv1.norm.*`, `shortcut`, ...), a
  pickle of numpy arrays that needs neither PyTorch nor detectron2 to write.

The state dicts are `{name: numpy array}` and work from every backend and
either data format. `save_torch` writes a `.pth` (it needs torch);
`save_detectron2` writes the `.pkl` without it.

Example:

```python
state = torchvision_state(model.encoder_q)
save_torch(state, "resnet50_moco.pth")
# in PyTorch:
#   net = torchvision.models.resnet50()
#   net.load_state_dict(torch.load("resnet50_moco.pth"), strict=False)
#   -> missing_keys == ["fc.weight", "fc.bias"]
```
"""

import pickle

import keras
import numpy as np

from moco_keras import convert

# What `recipes/export --format=` writes.
FORMATS = ("torchvision", "moco_pytorch", "detectron2", "timm")


def _numpy(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable.value))


def _check_torchvision_layout(backbone, what):
    """torchvision's (and detectron2's) ResNets: the ImageNet stem, width 64."""
    names = {layer.name for layer in backbone.layers}
    kernel = backbone.get_layer("conv1").kernel.shape
    if "maxpool" not in names or kernel[0] != 7:
        raise ValueError(
            f"{what} holds ResNets with the ImageNet stem (7x7 convolution "
            f"and max-pool); {backbone.name!r} has a {kernel[0]}x{kernel[1]} "
            "stem without one (cifar_resnet18). Export it with "
            "--format=moco_pytorch, which this package's converter reads "
            "back, or pretrain resnet18/34/50."
        )
    if kernel[-1] != 64:
        raise ValueError(
            f"{what} holds ResNets of 64 channels in their first stage; "
            f"{backbone.name!r} has {kernel[-1]} (its `width`). Export it "
            "with --format=moco_pytorch, or pretrain with --width=64."
        )


def backbone_state(backbone):
    """`{name: array}` of a ResNet encoder in torchvision's names and
    layouts (no `fc`), any width and stem."""
    state = {}
    for layer in backbone.layers:
        key = convert.torch_key(layer)
        if isinstance(layer, keras.layers.Conv2D):
            # Keras [kh, kw, in, out] -> PyTorch [out, in, kh, kw].
            kernel = _numpy(layer.kernel)
            state[f"{key}.weight"] = np.ascontiguousarray(
                kernel.transpose(3, 2, 0, 1)
            )
        elif isinstance(layer, keras.layers.BatchNormalization):
            for torch_name, keras_name in convert.BN_NAMES.items():
                state[f"{key}.{torch_name}"] = _numpy(
                    getattr(layer, keras_name)
                )
            # torchvision's buffer; it only matters for BN with
            # momentum=None (a cumulative average), which ResNets do not use.
            state[f"{key}.num_batches_tracked"] = np.array(0, np.int64)
        elif layer.weights:
            raise ValueError(
                f"No PyTorch name for the layer {layer.name!r} "
                f"({type(layer).__name__}) of {backbone.name!r}: only "
                "moco_keras.encoders' ResNets export."
            )
    return state


def dense_state(layers):
    """`{name: array}` of Dense layers named as the official heads are
    (`fc`, or `fc_0` and `fc_2` for v2's MLP): `fc.weight` `[out, in]`,
    `fc.bias`."""
    state = {}
    for dense in layers:
        if not isinstance(dense, keras.layers.Dense):
            continue
        key = convert.torch_key(dense)
        state[f"{key}.weight"] = np.ascontiguousarray(_numpy(dense.kernel).T)
        state[f"{key}.bias"] = _numpy(dense.bias)
    return state


def torchvision_state(backbone, fc=None):
    """The encoder as a `torchvision.models.resnet{18,34,50}` state dict.

    Args:
        backbone: one of `moco_keras.encoders`' ResNets with the ImageNet
            stem and width 64 (a MoCo model's `encoder_q`).
        fc: the linear classifier (`keras.layers.Dense` named `fc`, from
            a lincls run) to write as `fc`, or None: the state then lacks
            only `fc.weight` and `fc.bias`.

    Returns:
        `{name: numpy array}` in torchvision's names and layouts.
    """
    _check_torchvision_layout(backbone, "torchvision")
    state = backbone_state(backbone)
    if fc is not None:
        state.update(dense_state([fc]))
    return state


def mlp_state(mlp, prefix):
    """`{name: array}` of a MoCo v3 MLP (`mocov3.build_mlp`) as the official
    `nn.Sequential`: the Keras layer at position i is module `prefix.i`
    (Linear weights `[out, in]`, no bias; BN with or without its affine
    weights, with its running statistics)."""
    state = {}
    for index, layer in enumerate(mlp.layers):
        key = f"{prefix}.{index}"
        if isinstance(layer, keras.layers.Dense):
            state[f"{key}.weight"] = np.ascontiguousarray(
                _numpy(layer.kernel).T
            )
        elif isinstance(layer, keras.layers.BatchNormalization):
            for torch_name, keras_name in convert.BN_NAMES.items():
                variable = getattr(layer, keras_name, None)
                if variable is not None:
                    state[f"{key}.{torch_name}"] = _numpy(variable)
            state[f"{key}.num_batches_tracked"] = np.array(0, np.int64)
    return state


def timm_vit_state(encoder):
    """`{name: array}` of a `vits.vit` encoder in timm's `VisionTransformer`
    names and layouts, the layout of MoCo v3's `vits.py` (no `head`):
    `patch_embed.proj.weight` `[D, 3, p, p]`, `cls_token`, `pos_embed`,
    `blocks.i.norm1`, `blocks.i.attn.qkv`, `blocks.i.attn.proj`,
    `blocks.i.norm2`, `blocks.i.mlp.fc1`, `blocks.i.mlp.fc2`, `norm`."""
    state = {}

    def dense(key, layer):
        state[f"{key}.weight"] = np.ascontiguousarray(_numpy(layer.kernel).T)
        state[f"{key}.bias"] = _numpy(layer.bias)

    for layer in encoder.layers:
        key = convert.torch_key(layer)
        if layer.name == "patch_embed_proj":
            state["patch_embed.proj.weight"] = np.ascontiguousarray(
                _numpy(layer.kernel).transpose(3, 2, 0, 1)
            )
            state["patch_embed.proj.bias"] = _numpy(layer.bias)
        elif layer.name == "embedding":
            state["cls_token"] = _numpy(layer.cls_token)
            state["pos_embed"] = _numpy(layer.pos_embed)
        elif isinstance(layer, keras.layers.LayerNormalization):
            state[f"{key}.weight"] = _numpy(layer.gamma)
            state[f"{key}.bias"] = _numpy(layer.beta)
        elif isinstance(layer, keras.layers.Dense):
            dense(key, layer)
        elif layer.name.endswith("_attn"):
            dense(f"{key}.qkv", layer.qkv)
            dense(f"{key}.proj", layer.proj)
        elif layer.weights:
            raise ValueError(
                f"No timm name for the layer {layer.name!r} "
                f"({type(layer).__name__}) of {encoder.name!r}: only "
                "moco_keras.vits' encoders export in timm's layout."
            )
    return state


def moco_pytorch_checkpoint(model, epoch=0):
    """A `MoCo` model as the checkpoint `main_moco.py` writes.

    Args:
        model: a `moco_keras.MoCo`.
        epoch: the number of finished epochs (`main_moco.py` stores the
            next epoch to run, which is the same number).

    Returns:
        `{"epoch", "arch", "state_dict", "optimizer"}`: `state_dict` holds
        `module.encoder_q.*` and `module.encoder_k.*` (backbone and `fc`
        head), `module.queue` (`dim x K`) and `module.queue_ptr` (`[1]`,
        int64), as numpy arrays; `optimizer` is None (the optimizer's state
        stays with this package's checkpoints: the file is for
        `main_lincls.py`, the detection converter and `convert`).
    """
    state = {}
    for side in ("q", "k"):
        encoder = getattr(model, f"encoder_{side}")
        head = getattr(model, f"head_{side}")
        backbone = backbone_state(encoder)
        if side == "q":
            query_backbone = backbone
        for name, value in {**backbone, **dense_state(head.layers)}.items():
            state[f"module.encoder_{side}.{name}"] = value
    state["module.queue"] = _numpy(model.queue).astype(np.float32)
    pointer = int(_numpy(model.queue_ptr))
    state["module.queue_ptr"] = np.array([pointer], np.int64)
    arch, _ = convert.infer_architecture(query_backbone)
    return {
        "epoch": int(epoch),
        "arch": arch,
        "state_dict": state,
        "optimizer": None,
    }


def detectron2_model(state):
    """detectron2's names for a torchvision-named ResNet state dict.

    The renaming of the official `detection/convert-pretrain-to-detectron2.py`
    (keys without "layer" go under `stem.`, `layerN` -> `res{N+1}`, `bnN` ->
    `convN.norm`, `downsample.0` -> `shortcut`, `downsample.1` ->
    `shortcut.norm`), on the query encoder's keys with their
    `module.encoder_q.` stripped; a head comes along as `stem.fc.*`, as
    there, and detectron2 ignores it.

    Args:
        state: `{name: array}` in torchvision's names.

    Returns:
        `{"model": {name: array}, "__author__": "MOCO",
        "matching_heuristics": True}`, what `MODEL.WEIGHTS` takes.
    """
    renamed = {}
    for name, value in state.items():
        if "layer" not in name:
            name = "stem." + name
        for stage in (1, 2, 3, 4):
            name = name.replace(f"layer{stage}", f"res{stage + 1}")
        for index in (1, 2, 3):
            name = name.replace(f"bn{index}", f"conv{index}.norm")
        name = name.replace("downsample.0", "shortcut")
        name = name.replace("downsample.1", "shortcut.norm")
        renamed[name] = np.asarray(value)
    return {"model": renamed, "__author__": "MOCO", "matching_heuristics": True}


def check_detectron2(backbone):
    """detectron2's ResNets have torchvision's stem and width."""
    _check_torchvision_layout(backbone, "detectron2")


def save_detectron2(path, model):
    """Writes `detectron2_model`'s dict as a pickle (no PyTorch needed)."""
    with open(path, "wb") as f:
        pickle.dump(model, f)


def _to_torch(value, torch):
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, dict):
        return {name: _to_torch(item, torch) for name, item in value.items()}
    return value


def save_torch(obj, path):
    """`torch.save` of `obj` with its numpy arrays as tensors.

    Raises:
        ImportError: torch is not installed (the file format is PyTorch's).
    """
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            f"Writing {path} needs torch (PyTorch's file format), which is "
            "not installed. Install the CPU build: pip install torch "
            "--index-url https://download.pytorch.org/whl/cpu; or write "
            "--format=detectron2, a pickle of numpy arrays."
        ) from error
    torch.save(_to_torch(obj, torch), path)
