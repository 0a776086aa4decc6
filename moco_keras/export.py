"""The trained encoder out: a SavedModel feature extractor, a keras-hub preset.

`export_feature_extractor` writes a SavedModel whose `serving_default`
signature takes a batch of uint8 RGB images of any size and returns their
pooled features: the official evaluation transform (resize the short side to
`size / crop_fraction`, center crop `size`, scale to [0, 1], normalize) runs
inside it, so whoever loads it (`tf.saved_model.load`, TF Serving, TFLite
converters) needs neither this package nor Keras.

It works from the TensorFlow and the JAX backends (Keras exports the encoder
through `jax2tf` there); the torch backend cannot write a SavedModel.

`export_keras_hub_preset` writes the encoder as a keras-hub
`ResNetBackbone` preset with its image converter (any backend).
"""

import os
import shutil
import tempfile

import keras

from moco_keras import pipelines


def export_feature_extractor(
    backbone, directory, size=224, mean=None, std=None, crop_fraction=0.875
):
    """Writes `backbone` with its preprocessing as a SavedModel.

    Args:
        backbone: a Keras model from normalized `N x H x W x 3` images to
            `N x D` features (a MoCo model's `encoder_q`).
        directory: where the SavedModel goes (replaced if it exists).
        size: the crop the backbone sees (224 for ImageNet).
        mean: the input normalization's mean of the backbone's training
            (ImageNet's by default; a converted checkpoint's own).
        std: the input normalization's standard deviation, likewise.
        crop_fraction: the short side is resized to `size / crop_fraction`
            before the center crop (0.875: 256 -> 224; 1: to `size`).

    Returns:
        The signature's output key, `"features"`.

    Example:

    ```python
    export_feature_extractor(model.encoder_q, "exported/mocov2")
    # elsewhere, without moco_keras:
    extractor = tf.saved_model.load("exported/mocov2")
    features = extractor.signatures["serving_default"](
        images=tf.zeros([1, 300, 400, 3], tf.uint8))["features"]
    ```
    """
    backend = keras.backend.backend()
    if backend not in ("tensorflow", "jax"):
        raise ValueError(
            f"A SavedModel can be exported from the TensorFlow or JAX "
            f"backend, not {backend}. Run the export with "
            "KERAS_BACKEND=tensorflow (the checkpoint loads on any backend)."
        )
    import tensorflow as tf

    from moco_keras import color

    mean = tuple(color.IMAGENET_MEAN if mean is None else mean)
    std = tuple(color.IMAGENET_STD if std is None else std)
    fixed = backbone.input_shape[1:3]
    if None not in fixed and tuple(fixed) != (size, size):
        raise ValueError(
            f"The backbone takes {fixed[0]}x{fixed[1]} images; export it with "
            f"size={fixed[0]} (not {size})."
        )
    staging = tempfile.mkdtemp(prefix="moco-keras-export-")
    try:
        inner_path = os.path.join(staging, "backbone")
        # Stage 1: Keras writes the network alone (through jax2tf on JAX) at
        # the crop size ...
        archive = keras.export.ExportArchive()
        archive.track(backbone)
        archive.add_endpoint(
            "features",
            lambda x: backbone(x, training=False),
            input_signature=[
                keras.InputSpec(shape=(None, size, size, 3), dtype="float32")
            ],
        )
        archive.write_out(inner_path, verbose=False)
        inner = tf.saved_model.load(inner_path)

        # ... stage 2 puts the preprocessing, plain TensorFlow, in front.
        class FeatureExtractor(tf.Module):
            def __init__(self):
                super().__init__()
                self.backbone = inner

            @tf.function(
                input_signature=[
                    tf.TensorSpec([None, None, None, 3], tf.uint8, "images")
                ]
            )
            def serve(self, images):
                views = tf.map_fn(
                    lambda image: pipelines.eval_view(
                        image, size, mean, std, crop_fraction
                    ),
                    images,
                    fn_output_signature=tf.TensorSpec(
                        [size, size, 3], tf.float32
                    ),
                )
                return {"features": self.backbone.features(views)}

        module = FeatureExtractor()
        if os.path.exists(directory):
            shutil.rmtree(directory)
        tf.saved_model.save(
            module,
            directory,
            signatures={"serving_default": module.serve},
            # A feature extractor has no use for gradients, and the ones
            # jax2tf records do not survive a second save.
            options=tf.saved_model.SaveOptions(
                experimental_custom_gradients=False
            ),
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return "features"


def _hub_source_name(hub_name):
    """Our layer (torchvision's name) behind a keras-hub ResNet layer."""
    if hub_name == "conv1_conv":
        return "conv1"
    if hub_name == "conv1_bn":
        return "bn1"
    stack, block, index, kind = hub_name.split("_")
    stage = int(stack[len("stack") :]) + 1
    prefix = f"layer{stage}_{int(block[len('block') :])}"
    if index == "0":  # the projection shortcut
        return f"{prefix}_downsample_{0 if kind == 'conv' else 1}"
    return f"{prefix}_{'conv' if kind == 'conv' else 'bn'}{index}"


def export_keras_hub_preset(backbone, directory, size=224, mean=None, std=None):
    """Writes `backbone` as a keras-hub `ResNetBackbone` preset.

    keras-hub's ResNet with bottleneck (or basic) blocks and no
    pre-activation has torchvision's layout, so the weights copy one to one
    (tested: equal features). The preset also holds a `ResNetImageConverter`
    with the backbone's normalization, so that
    `keras_hub.models.ResNetBackbone.from_preset(directory)` and
    `keras_hub.layers.ResNetImageConverter.from_preset(directory)` give the
    network and its preprocessing for fine-tuning or detection there.

    Args:
        backbone: one of `moco_keras.encoders`' ResNets with the ImageNet stem
            (a MoCo model's `encoder_q`).
        directory: the preset directory to write.
        size: the image size of the converter.
        mean: the backbone's input normalization's mean (ImageNet's by
            default).
        std: its standard deviation, likewise.
    """
    try:
        import keras_hub
    except ImportError as error:
        raise ImportError(
            "Writing a keras-hub preset needs keras-hub (`make venv` installs "
            "it; elsewhere see the Makefile's keras-hub line)."
        ) from error
    from moco_keras import color

    mean = tuple(color.IMAGENET_MEAN if mean is None else mean)
    std = tuple(color.IMAGENET_STD if std is None else std)
    names = {layer.name for layer in backbone.layers}
    stem = backbone.get_layer("conv1").kernel.shape
    if "maxpool" not in names or stem[0] != 7:
        raise ValueError(
            "keras-hub's ResNet has the ImageNet stem (7x7 convolution and "
            f"max-pool); {backbone.name!r} has a {stem[0]}x{stem[1]} stem "
            "without one. Export ResNet-18/34/50, not cifar_resnet18."
        )
    if stem[-1] != 64:
        raise ValueError(
            "keras-hub's ResNetBackbone has 64 channels in its first stage; "
            f"{backbone.name!r} has {stem[-1]} (its `width`). Only full-width "
            "ResNets (width 64, as torchvision's) export to keras-hub."
        )
    basic = "layer1_0_conv3" not in names
    blocks = [
        len({n.split("_")[1] for n in names if n.startswith(f"layer{s}_")})
        for s in range(1, 5)
    ]
    width = int(stem[-1])
    hub = keras_hub.models.ResNetBackbone(
        input_conv_filters=[width],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=[width * 2**s for s in range(4)],
        stackwise_num_blocks=blocks,
        stackwise_num_strides=[1, 2, 2, 2],
        block_type="basic_block" if basic else "bottleneck_block",
        use_pre_activation=False,
        image_shape=(None, None, 3),
    )
    for layer in hub.layers:
        if not layer.weights:
            continue
        source = backbone.get_layer(_hub_source_name(layer.name))
        for target, value in zip(layer.weights, source.weights, strict=True):
            if tuple(target.shape) != tuple(value.shape):
                raise ValueError(
                    f"keras-hub's {target.path} is {tuple(target.shape)}, "
                    f"{value.path} is {tuple(value.shape)}."
                )
            target.assign(value)
    hub.save_to_preset(directory)
    converter = keras_hub.layers.ResNetImageConverter(
        image_size=(size, size),
        scale=[1.0 / (255.0 * s) for s in std],
        offset=[-m / s for m, s in zip(mean, std, strict=True)],
        antialias=True,
    )
    converter.save_to_preset(directory)
    return hub
