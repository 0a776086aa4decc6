r"""Converts a checkpoint of the official MoCo code or of PaddleFleetX.

    python -m moco_keras.recipes.convert \
        --source=moco_v2_800ep_pretrain.pth.tar --output=converted/mocov2_800ep

Reads an official `main_moco.py` / `main_lincls.py` checkpoint (`.pth.tar`,
needs torch), a torchvision ResNet state dict (`.pth`) or a PaddleFleetX
pretraining / linear-classification checkpoint (`.pdparams`, no Paddle
needed), and writes `OUTPUT/model.keras` (a MoCo model with its queue, or a
linear classifier) and `OUTPUT/conversion.json` (what was read, and the
input normalization its weights expect). `recipes/lincls --pretrained=OUTPUT`
then trains on the converted backbone with that normalization.
"""

import os

from absl import app
from absl import flags

# --output (shared with recipes/export) and --bn_splits: the split BN groups
# of the converted encoders, as in recipes/pretrain (the preset's 8, to go
# on pretraining on one device as the official code on 8 GPUs; it does not
# matter for linear classification or export, which run BN in inference
# mode).
from moco_keras import presets
from moco_keras.recipes import common

FLAGS = flags.FLAGS

flags.DEFINE_string(
    "source", None, "The checkpoint: .pth.tar / .pth (PyTorch) or .pdparams."
)
flags.DEFINE_bool(
    "overwrite", False, "Replace a conversion already in --output."
)


def main(argv):
    del argv
    if not FLAGS.source or not FLAGS.output:
        raise app.UsageError(
            "--source=CHECKPOINT and --output=DIRECTORY are both required."
        )
    from moco_keras import convert

    existing = os.path.join(FLAGS.output, convert.METADATA)
    if os.path.exists(existing) and not FLAGS.overwrite:
        raise app.UsageError(
            f"{FLAGS.output} already holds a conversion ({existing}); pass "
            "--overwrite to replace it, or another --output."
        )
    try:
        converted = convert.convert(FLAGS.source, bn_splits=FLAGS.bn_splits)
    except convert.CheckpointError:
        raise  # the file's fault, not the flags': common.run says why
    except (FileNotFoundError, ImportError, ValueError) as error:
        raise app.UsageError(str(error)) from error
    converted.save(FLAGS.output)
    info = converted.info
    if converted.kind == "moco":
        what = (
            f"MoCo {'v2' if info.get('mlp') else 'v1'} pretraining (K "
            f"{info.get('queue_size')}, queue and pointer included)"
        )
    elif converted.kind == "mocov3":
        what = (
            f"MoCo v3 pretraining ({info['projector_layers']}-layer "
            f"projector, predictor, momentum encoder; {info['dim']}-d)"
        )
    else:
        what = f"linear classifier ({info['classes']} classes)"
    shape = (
        f"width {info['width']}"
        if "width" in info
        else f"embed_dim {info.get('embed_dim')}"
    )
    print(
        f"Converted {FLAGS.source} ({converted.source}): {what} on "
        f"{info['arch']} ({shape}).\n"
        f"Inputs: RGB in [0, 1], normalized with mean {converted.mean} and "
        f"std {converted.std}.\n"
        f"Wrote {os.path.join(FLAGS.output, convert.MODEL_FILE)}; linear "
        "classification on it: python -m moco_keras.recipes.lincls "
        f"--pretrained={FLAGS.output} ..."
    )


if __name__ == "__main__":
    common.run(main, presets.PRETRAINING, "mocov1")
