"""The trained encoder as a TensorFlow SavedModel feature extractor.

`export_feature_extractor` writes a SavedModel whose `serving_default`
signature takes a batch of uint8 RGB images of any size and returns their
pooled features: the official evaluation transform (resize the short side to
`size / crop_fraction`, center crop `size`, scale to [0, 1], normalize) runs
inside it, so whoever loads it (`tf.saved_model.load`, TF Serving, TFLite
converters) needs neither this package nor Keras.

It works from the TensorFlow and the JAX backends (Keras exports the encoder
through `jax2tf` there); the torch backend cannot write a SavedModel.
"""

import os
import shutil
import tempfile

import keras

from moco_keras import data


def export_feature_extractor(
    backbone, directory, size=224, mean=None, std=None, crop_fraction=0.875
):
    """Writes `backbone` with its preprocessing as a SavedModel.

    Args:
        backbone: a Keras model from normalized `N x H x W x 3` images to
            `N x D` features (a MoCo model's `encoder_q`).
        directory: where the SavedModel goes (replaced if it exists).
        size: the crop the backbone sees (224 for ImageNet).
        mean, std: the input normalization of the backbone's training
            (ImageNet's by default; a converted checkpoint's own).
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

    from moco_keras import layers

    mean = tuple(layers.IMAGENET_MEAN if mean is None else mean)
    std = tuple(layers.IMAGENET_STD if std is None else std)
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
                    lambda image: data.eval_view(
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
