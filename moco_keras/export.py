"""The trained encoder out: a SavedModel feature extractor, a keras-hub
preset, an ONNX model.

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

`export_onnx` writes the network alone as ONNX (Keras' `model.export`:
tf2onnx on TensorFlow, `torch.onnx` on torch), with its preprocessing in a
JSON file beside it.
"""

import json
import os
import shutil
import tempfile

import keras


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
                    lambda image: _eval_view(
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


# What `export_onnx` needs per backend (Keras' ONNX export).
ONNX_PACKAGES = {
    "tensorflow": ("onnx", "onnxruntime", "tf2onnx"),
    "torch": ("onnx", "onnxruntime", "onnxscript"),
}


def export_onnx(
    backbone, path, size=224, mean=None, std=None, crop_fraction=0.875
):
    """Writes `backbone` as an ONNX model and its preprocessing beside it.

    The model takes `images`, float32 `N x H x W x 3` (any batch and size)
    normalized as the backbone was trained (`(x / 255 - mean) / std`), and
    returns the pooled features `N x D`. `PATH.json` holds `mean`, `std`,
    `size` and `crop_fraction` (the evaluation transform: short side to
    `size / crop_fraction`, center crop `size`).

    Args:
        backbone: a Keras model from normalized images to features.
        path: the `.onnx` file to write.
        size: the crop the backbone was evaluated at.
        mean: the input normalization's mean (ImageNet's by default).
        std: its standard deviation, likewise.
        crop_fraction: see above.

    Raises:
        ValueError: under the JAX backend (its ONNX export, jax2onnx, writes
            a max-pool onnxruntime rejects): export from TensorFlow or torch.
        ImportError: the backend's ONNX packages are not installed.

    Example:

    ```python
    export_onnx(model.encoder_q, "exported/mocov2.onnx")
    # elsewhere:
    session = onnxruntime.InferenceSession("exported/mocov2.onnx")
    features = session.run(None, {"images": normalized_images})[0]
    ```
    """
    from moco_keras import color

    backend = keras.backend.backend()
    if backend not in ONNX_PACKAGES:
        raise ValueError(
            f"ONNX is exported from the TensorFlow or torch backend, not "
            f"{backend} (Keras exports JAX through jax2onnx, whose max-pool "
            "onnxruntime rejects). Run the export with KERAS_BACKEND=torch "
            "or tensorflow: the checkpoint loads on any backend."
        )
    import importlib.util

    missing = [
        name
        for name in ONNX_PACKAGES[backend]
        if importlib.util.find_spec(name) is None
    ]
    if missing:
        raise ImportError(
            f"Exporting ONNX from the {backend} backend needs "
            f'{", ".join(missing)}: pip install -e ".[onnx]".'
        )
    mean = tuple(color.IMAGENET_MEAN if mean is None else mean)
    std = tuple(color.IMAGENET_STD if std is None else std)
    # Keras exports a model that has been called (its traced shapes).
    backbone(keras.ops.zeros((1, size, size, 3)), training=False)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    backbone.export(path, format="onnx", verbose=False)
    preprocessing = {
        "input": "images: float32 N x H x W x 3, (x / 255 - mean) / std",
        "output": f"features: float32 N x {backbone.output_shape[-1]}",
        "mean": list(mean),
        "std": list(std),
        "size": size,
        "crop_fraction": crop_fraction,
    }
    with open(path + ".json", "w") as f:
        json.dump(preprocessing, f, indent=2)
    return preprocessing


def _eval_view(image, size, mean, std, crop_fraction):
    """The official evaluation transform of a uint8 image, in TensorFlow
    (the SavedModel's serving graph): the short side resized to
    `round(size / crop_fraction)` (256 for 224), antialiased where it
    shrinks as PIL's resize in the official loader, then the center
    `size x size`, normalized. `views.center_view` is the same view for
    the pipeline, in PIL.
    """
    import tensorflow as tf

    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    short = tf.round(size / crop_fraction)
    scale = short / tf.reduce_min(shape)
    new_shape = tf.cast(tf.round(shape * scale), tf.int32)
    new_shape = tf.maximum(new_shape, size)
    resized = tf.image.resize(
        tf.cast(image, tf.float32), new_shape, antialias=True
    )
    top = (new_shape[0] - size) // 2
    left = (new_shape[1] - size) // 2
    crop = tf.slice(resized, [top, left, 0], [size, size, 3])
    crop = tf.clip_by_value(crop / 255.0, 0.0, 1.0)
    return (crop - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)
