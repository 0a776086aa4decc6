r"""Exports a pretrained encoder as a SavedModel feature extractor.

    KERAS_BACKEND=tensorflow python -m moco_keras.recipes.export \
        --pretrained=runs/mocov2 --output=exported/mocov2

`--pretrained` is what `recipes/lincls` takes: a pretraining workdir, a
`.keras` checkpoint, or a directory of `recipes/convert`. The SavedModel's
`serving_default` takes `images`, a uint8 `N x H x W x 3` batch of any size,
and returns `features` (`N x 2048` for ResNet-50): the evaluation transform
(short side to `--image_size / --crop_fraction`, center crop, normalization
with the statistics the encoder was trained with) runs inside. Load it with
`tf.saved_model.load(DIR)` in any TensorFlow process. For a run of
`recipes/pretrain`, `--dataset`, `--image_size` and `--crop_fraction`
default to the run's own (its `config.json`), so the export preprocesses as
the run did; given on the command line, they win. Runs under the
TensorFlow and JAX backends. `--format=keras_hub` writes a keras-hub preset
of the backbone instead (any backend).
"""

import json
import os

from absl import flags

from moco_keras import configs
from moco_keras import convert
from moco_keras import export_pytorch
from moco_keras import linear_classification
from moco_keras import sources
from moco_keras import training
from moco_keras.recipes import common

FLAGS = flags.FLAGS

flags.DEFINE_enum(
    "format",
    "saved_model",
    ["saved_model", "keras_hub", "onnx", *export_pytorch.FORMATS],
    "saved_model: a TensorFlow SavedModel feature extractor (uint8 images "
    "of any size in, features out); keras_hub: a keras-hub ResNetBackbone "
    "preset with its image converter (ResNet-18/34/50 of width 64); onnx: "
    "the network as ONNX, normalized float images in, features out, its "
    "preprocessing in OUTPUT.json (TensorFlow or torch backend); "
    "torchvision: a torchvision ResNet state dict .pth (fc from a lincls "
    "run); moco_pytorch: main_moco.py's checkpoint .pth.tar; detectron2: "
    "the official detection converter's .pkl; timm: a MoCo v3 ViT as "
    "timm's VisionTransformer state dict .pth (no head).",
)


# The pretraining run's values the export preprocesses with, in its
# config's `data` section.
RUN_FLAGS = ("dataset", "image_size", "crop_fraction")


def preprocessing_flags(pretrained, checkpoint):
    """`--dataset`, `--image_size`, `--crop_fraction`: the command line's,
    else those of the pretraining run that wrote `checkpoint`, else the
    defaults."""
    run = {}
    # A workdir, or a checkpoint in its checkpoints/ folder.
    for directory in (pretrained, os.path.dirname(os.path.dirname(checkpoint))):
        path = os.path.join(directory, configs.CONFIG_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                run = json.load(f)["data"]
            break
    return {
        name: FLAGS[name].value
        if FLAGS[name].present
        else run.get(name, FLAGS[name].value)
        for name in RUN_FLAGS
    }


def _lincls_run(path):
    """The config of a lincls workdir `path`, or None."""
    config = os.path.join(path, configs.CONFIG_FILE)
    if not os.path.isfile(config):
        return None
    with open(config) as f:
        config = json.load(f)
    return config if "classifier" in config else None


def weights_to_export(pretrained):
    """What `--pretrained` holds, for the PyTorch formats.

    Returns:
        `(moco, backbone, fc, epoch, origin)`: the `MoCo` model (None for a
        lincls run or a converted classifier), the query encoder, the
        linear classifier's `fc` layer (None for a pretraining run), the
        finished epochs, and the file read.
    """

    lincls = _lincls_run(pretrained) if os.path.isdir(pretrained) else None
    if lincls is not None:
        found, _ = training.latest_checkpoint(
            os.path.join(pretrained, "checkpoints")
        )
        configs.check(
            found is not None,
            f"--pretrained={pretrained} is a linear-classification workdir "
            "without checkpoints/ckpt-<step>.keras.",
        )
        classifier = convert.load_keras(found)
        source = linear_classification.resolve_pretrained(
            lincls["classifier"]["pretrained"]
        )
        backbone, _ = linear_classification.load_backbone(source)
        return None, backbone, classifier.get_layer("fc"), 0, found
    from moco_keras import momentum_pair

    checkpoint = linear_classification.resolve_pretrained(pretrained)
    if os.path.isfile(os.path.join(checkpoint, convert.METADATA)):
        model, _ = convert.load_converted(checkpoint)
        if not isinstance(model, momentum_pair.MomentumPair):
            # a converted classifier
            backbone = convert.backbone_of(model)
            return None, backbone, model.get_layer("fc"), 0, checkpoint
    else:
        model = linear_classification.load_moco(checkpoint)
    epoch = 0
    # In a pretraining workdir: the epochs its epochs.csv holds.
    workdir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
    csv = os.path.join(workdir, "epochs.csv")
    if os.path.isfile(checkpoint) and os.path.isfile(csv):
        epoch = len(training.read_csv_log(csv).get("epoch", []))
    return model, model.encoder_q, None, epoch, checkpoint


def export_for_pytorch(pretrained, output, format):
    """Writes `--format=torchvision|moco_pytorch|detectron2`."""
    from moco_keras import moco

    model, backbone, fc, epoch, origin = weights_to_export(pretrained)
    vit = any(layer.name == "embedding" for layer in backbone.layers)
    configs.check(
        vit == (format == "timm"),
        f"--format=timm writes ViTs and the other PyTorch formats ResNets; "
        f"{origin} holds a {'ViT' if vit else 'ResNet'}: use "
        f"{'--format=timm' if vit else '--format=torchvision'}.",
    )
    try:
        if format == "timm":
            state = export_pytorch.timm_vit_state(backbone)
            export_pytorch.save_torch(state, output)
            what = "a timm VisionTransformer state dict (all but the head)"
        elif format == "moco_pytorch":
            configs.check(
                isinstance(model, moco.MoCo),
                f"--format=moco_pytorch writes a MoCo pretraining checkpoint "
                f"(query and key encoders, queue); {origin} is not one "
                "(a linear classifier, or MoCo v3, which has no queue). Use "
                "--format=torchvision.",
            )
            checkpoint = export_pytorch.moco_pytorch_checkpoint(model, epoch)
            export_pytorch.save_torch(checkpoint, output)
            what = (
                f"main_moco.py's checkpoint ({checkpoint['arch']}, epoch "
                f"{epoch}, queue {tuple(model.queue.shape)})"
            )
        elif format == "torchvision":
            state = export_pytorch.torchvision_state(backbone, fc)
            export_pytorch.save_torch(state, output)
            what = "a torchvision ResNet state dict" + (
                "" if fc is not None else " (all but fc.weight and fc.bias)"
            )
        else:
            export_pytorch.check_detectron2(backbone)
            state = export_pytorch.backbone_state(backbone)
            head = model.head_q.layers if isinstance(model, moco.MoCo) else [fc]
            state.update(export_pytorch.dense_state(head))
            export_pytorch.save_detectron2(
                output, export_pytorch.detectron2_model(state)
            )
            what = "detectron2's weights (MODEL.WEIGHTS)"
    except (ImportError, ValueError) as error:
        configs.check(False, str(error))
    print(f"Wrote {what} of {origin} to {output}.")


def main(argv):
    del argv
    configs.check(
        FLAGS.output,
        "--output is required: a directory (saved_model, keras_hub) or a "
        "file (onnx, torchvision, moco_pytorch, detectron2).",
    )
    if FLAGS.format in export_pytorch.FORMATS:
        os.makedirs(
            os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True
        )
        export_for_pytorch(FLAGS.pretrained, FLAGS.output, FLAGS.format)
        return
    checkpoint = linear_classification.resolve_pretrained(FLAGS.pretrained)
    backbone, normalization = linear_classification.load_backbone(checkpoint)
    values = preprocessing_flags(FLAGS.pretrained, checkpoint)
    mean, std = normalization or sources.dataset_stats(values["dataset"])
    from moco_keras import export

    size = values["image_size"]
    fixed = backbone.input_shape[1]
    if fixed is not None and not FLAGS["image_size"].present:
        size = fixed  # the encoder's own input size, unless told otherwise
    if FLAGS.format == "keras_hub":
        try:
            export.export_keras_hub_preset(
                backbone, FLAGS.output, size=size, mean=mean, std=std
            )
        except (ImportError, ValueError) as error:
            configs.check(False, str(error))
        print(
            f"Wrote the keras-hub preset of {checkpoint} to {FLAGS.output}: "
            "keras_hub.models.ResNetBackbone.from_preset(DIR) and "
            "keras_hub.layers.ResNetImageConverter.from_preset(DIR) (crop "
            f"{size}, mean {tuple(mean)}, std {tuple(std)})."
        )
        return
    preprocessing = {
        "size": size,
        "mean": mean,
        "std": std,
        "crop_fraction": values["crop_fraction"],
    }
    if FLAGS.format == "onnx":
        try:
            export.export_onnx(backbone, FLAGS.output, **preprocessing)
        except (ImportError, ValueError) as error:
            configs.check(False, str(error))
        print(
            f"Wrote the encoder of {checkpoint} as ONNX to {FLAGS.output}: "
            f"input `images` (float32 N x H x W x 3, normalized with mean "
            f"{tuple(mean)}, std {tuple(std)}), output "
            f"{backbone.output_shape[-1]}-d features; the preprocessing in "
            f"{FLAGS.output}.json."
        )
        return
    try:
        key = export.export_feature_extractor(
            backbone, FLAGS.output, **preprocessing
        )
    except ValueError as error:
        configs.check(False, str(error))
    print(
        f"Exported the encoder of {checkpoint} to {FLAGS.output}: "
        f"signature serving_default, input `images` (uint8, any size), "
        f"output `{key}` ({backbone.output_shape[-1]}-d); crop "
        f"{size} (crop fraction {values['crop_fraction']}), mean "
        f"{tuple(mean)}, std {tuple(std)}."
    )


if __name__ == "__main__":
    from moco_keras import presets

    # Without a pretraining run's config.json: the ImageNet preset's
    # preprocessing.
    common.run(main, presets.PRETRAINING, "mocov1")
