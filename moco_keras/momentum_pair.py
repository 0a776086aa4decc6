"""The base of `moco.MoCo` and `mocov3.MoCoV3`: a query side, its momentum
copy, and what both steps do with the pair.

Both official codes (facebookresearch/moco and moco-v3, `moco/builder.py`)
build the key side as a copy of the query side's encoder and head, never
trained by the optimizer and moved towards the query side before each
key forward: `theta_k = m * theta_k + (1 - m) * theta_q`, over the
parameters (BN's moving statistics are each side's own buffers). Here the
key side's variables are non-trainable Keras variables updated with
`assign`, so that one `compute_loss` runs the step on every backend.

`MomentumPair` holds that shared half: the pairs of (query, key) models a
subclass names (`momentum_models`), the copy at construction, the momentum
update, the keys' forward, the config round trip and the presets. The
subclasses hold their own step: `MoCo`'s queue and shuffle BN, `MoCoV3`'s
predictor, symmetric loss and momentum schedule.
"""

import copy
import math

import keras
from keras import ops

from moco_keras import distribute
from moco_keras import health as health_lib
from moco_keras.batch_norm import at_least_float32


class MomentumPair(keras.Model):
    """A query encoder and head, and their momentum copy: the shared base.

    Not used alone: `moco.MoCo` (v1/v2) and `mocov3.MoCoV3` (v3) subclass
    it. A subclass builds `encoder_q`, its key copy (`clone_encoder`) and
    its heads, lists the pairs in `momentum_models`, then calls
    `initialize_key_side`; its `compute_loss` calls
    `momentum_update_key_encoder` before the keys and `encode_keys` for
    them, and ends with `replica_loss`.

    Subclasses set:
        PRESETS: `{name: constructor arguments}` of `from_preset`.
        CONFIG_KEYS: the constructor arguments `get_config` saves besides
            `encoder` and `augmentation` (the attributes of those names).
        TITLE: "MoCo" or "MoCo v3", for messages.
    """

    PRESETS = {}
    CONFIG_KEYS = ()
    TITLE = "MoCo"

    @classmethod
    def from_preset(cls, preset, encoder, **overrides):
        """The model of preset `preset` (`cls.PRESETS`) on `encoder`; any
        constructor argument in `overrides` replaces the preset's value.

        Example:

        >>> from moco_keras import MoCo, encoders
        >>> model = MoCo.from_preset(
        ...     "mocov2", encoders.cifar_resnet18(width=4), queue_size=64
        ... )
        >>> model.temperature, model.queue_size
        (0.2, 64)
        """
        if preset not in cls.PRESETS:
            raise ValueError(
                f"Unknown preset {preset!r} for {cls.__name__}: expected one "
                f"of {sorted(cls.PRESETS)}."
            )
        return cls(encoder, **{**cls.PRESETS[preset], **overrides})

    def momentum_models(self):
        """`[(query model, key model), ...]`: the encoders first, then the
        heads the keys go through, in the order of the key forward."""
        raise NotImplementedError(
            f"{type(self).__name__} must list its (query, key) model pairs."
        )

    def encoder_weight_pairs(self):
        """(query variable, key variable) pairs of every momentum model."""
        pairs = []
        for q_model, k_model in self.momentum_models():
            q_weights, k_weights = q_model.weights, k_model.weights
            if len(q_weights) != len(k_weights):
                raise ValueError(
                    f"The key model {k_model.name!r} has {len(k_weights)} "
                    f"variables but the query model has {len(q_weights)}."
                )
            pairs.extend(zip(q_weights, k_weights, strict=True))
        return pairs

    def initialize_key_side(self):
        """The key side starts as a copy of the query side and is never
        trained by the optimizer."""
        for q_var, k_var in self.encoder_weight_pairs():
            # A copy: JAX refuses two variables that share one buffer.
            k_var.assign(ops.copy(q_var.value))
        # Frozen variable by variable: setting the layers' `trainable` would
        # also put their BN layers in inference mode, and the official key
        # encoder uses batch statistics.
        for _, k_model in self.momentum_models():
            for k_var in k_model.weights:
                k_var.trainable = False

    def current_momentum(self):
        """m of this step (`MoCoV3` takes a schedule too)."""
        return self.momentum

    def momentum_update_key_encoder(self):
        """`theta_k = m * theta_k + (1 - m) * theta_q` over the parameters.

        The official loops are over `parameters()`: the trainable weights
        and those frozen on purpose (ViT's patch projection and position
        embedding, equal on both sides); BN's moving statistics are buffers,
        each side's own, accumulated from its own batches.
        """
        m = self.current_momentum()
        for q_var, k_var in self.encoder_weight_pairs():
            if is_parameter(q_var):
                q_value = ops.stop_gradient(q_var.value)
                k_var.assign(m * k_var.value + (1.0 - m) * q_value)

    def encode_keys(self, images, training):
        """Normalized keys: the key encoder, then the key heads."""
        x = images
        for _, k_model in self.momentum_models():
            x = k_model(x, training=training)  # N x D, then N x C
        return normalize(x)  # N x C

    def track_health(self, health):
        """With `health`, a `health.HealthMetric` of the step's features."""
        self.health = health
        if health:
            self.health_metric = health_lib.HealthMetric()

    def check_views(self, y, sample_weight):
        """Refuses a training call without the second view, or weighted."""
        if y is None:
            raise ValueError(
                f"{self.TITLE} trains on pairs of views: pass `fit(view_1, "
                "view_2)` or a dataset of `(view_1, view_2)` tuples. The "
                "second view (y) was None."
            )
        if sample_weight is not None:
            raise ValueError(
                f"{self.TITLE} does not support sample weights; the dataset "
                "should yield `(view_1, view_2)` pairs only."
            )

    def replica_loss(self, loss):
        """The step's loss as `fit` needs it: divided by the replicas under
        `tf.distribute`, which sums their gradients (Keras divides its own
        losses by the replica count, not a `compute_loss` override's), plus
        the layers' own losses."""
        replicas = distribute.num_replicas()
        if replicas > 1:
            loss = loss / replicas  # ()
        for extra in self.losses:
            loss = loss + self._aggregate_additional_loss(extra)
        return loss

    def get_config(self):
        config = {
            "name": self.name,
            "trainable": self.trainable,
            "encoder": keras.saving.serialize_keras_object(self.encoder_q),
            **{key: getattr(self, key) for key in self.CONFIG_KEYS},
            "augmentation": keras.saving.serialize_keras_object(
                self.augmentation
            ),
            "health": self.health,
        }
        if callable(self.momentum):  # a schedule
            config["momentum"] = keras.saving.serialize_keras_object(
                self.momentum
            )
        return config

    @classmethod
    def from_config(cls, config):
        # Deserialization consumes the nested config: work on a copy.
        config = copy.deepcopy(config)
        for key in ("encoder", "augmentation"):
            config[key] = keras.saving.deserialize_keras_object(config.get(key))
        if isinstance(config.get("momentum"), dict):  # a schedule
            config["momentum"] = keras.saving.deserialize_keras_object(
                config["momentum"]
            )
        return cls(**config)


def check_arguments(dim, momentum, temperature):
    """Raises `ValueError` unless these are valid arguments of both models.

    Messages name the argument as `Received: name=value`, which the recipes
    turn into the flag that sets it.
    """
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(
            "`dim` must be a positive int (128 in MoCo v1/v2, 256 in v3). "
            f"Received: dim={dim!r}"
        )
    if not callable(momentum) and not 0.0 <= momentum <= 1.0:
        raise ValueError(
            "`momentum` (m) must be in [0, 1] (0.999 in MoCo v1/v2, 0.99 in "
            "v3), or a schedule of the step (MoCo v3); it weighs the old key "
            "encoder in `m * key + (1 - m) * query`. Received: "
            f"momentum={momentum!r}"
        )
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(
            "`temperature` (T) must be a finite number > 0 (0.07 in MoCo v1, "
            f"0.2 in v2). Received: temperature={temperature!r}"
        )


def normalize(x):
    """`x / ||x||` over the features (axis 1), in float32 at least: under
    mixed precision the loss is computed in float32; float64 stays
    float64 (the tests compare the step with the official one in it)."""
    return ops.normalize(ops.cast(x, at_least_float32(x.dtype)), axis=1)


def is_parameter(variable):
    """Whether `variable` is a torch parameter: trainable, or frozen on
    purpose (ViT's patch projection); not BN's moving statistics."""
    return variable.trainable or not (
        "moving_mean" in variable.path or "moving_variance" in variable.path
    )


def clone_encoder(encoder):
    """The key encoder: a clone of `encoder`'s architecture, built."""
    try:
        clone = keras.models.clone_model(encoder)
    except Exception as error:  # noqa: BLE001 - re-raised with advice.
        raise TypeError(
            f"Could not clone the encoder {encoder.name!r} to make the key "
            "encoder. Use a functional or Sequential keras.Model, or a "
            "subclassed one that implements `get_config`/`from_config`."
        ) from error
    if not clone.built:
        clone.build(encoder.input_shape)
    return clone


def check_encoder(encoder):
    """The feature size D of an encoder from images to `N x D` features, or
    an error that says what the encoder lacks."""
    if not isinstance(encoder, keras.layers.Layer):
        raise TypeError(
            "`encoder` must be a keras.Model mapping images to features. "
            f"Received: encoder={encoder!r} of type {type(encoder)}"
        )
    feature_shape = _feature_shape(encoder)
    if len(feature_shape) != 2 or feature_shape[-1] is None:
        raise ValueError(
            "The encoder must return rank-2 features `N x D` with a known "
            f"D; {encoder.name!r} returns shape {feature_shape}. End it "
            "with a global pooling layer (the encoders in "
            "`moco_keras.encoders` do)."
        )
    return feature_shape[-1]


def check_augmentation(augmentation):
    """Refuses an in-model augmentation that is not a layer (or None)."""
    if augmentation is not None and not callable(augmentation):
        raise TypeError(
            "`augmentation` must be a Keras layer applied to the views "
            "(e.g. `color.ColorAugmentation`). Received: "
            f"augmentation={augmentation!r}"
        )


def torch_linear_initializers(fan_in):
    """torch.nn.Linear's default init, as the official heads are
    initialised: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
    bound = 1.0 / math.sqrt(fan_in)
    return {
        "kernel_initializer": keras.initializers.VarianceScaling(
            scale=1.0 / 3.0, mode="fan_in", distribution="uniform"
        ),
        "bias_initializer": keras.initializers.RandomUniform(-bound, bound),
    }


def _feature_shape(encoder):
    try:
        return tuple(encoder.output.shape)
    except (AttributeError, ValueError):
        pass
    try:
        return tuple(encoder.compute_output_shape((None, 32, 32, 3)))
    except Exception as error:  # noqa: BLE001 - re-raised with advice.
        raise ValueError(
            "Could not infer the output shape of the encoder "
            f"{encoder.name!r}. Pass a built functional keras.Model such as "
            "`moco_keras.encoders.resnet50()`."
        ) from error
