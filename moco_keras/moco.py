"""Momentum Contrast (MoCo v1 / v2) as one `keras.Model`.

He et al., "Momentum Contrast for Unsupervised Visual Representation
Learning" (arXiv 1911.05722) and Chen et al., "Improved Baselines with
Momentum Contrastive Learning" (arXiv 2003.04297). The step follows the
official `moco/builder.py`: query forward, momentum update of the key
encoder, key forward with shuffle BN, InfoNCE logits against the queue,
enqueue of the new keys.

Keras' shared training hook is used on every backend: `call` computes the
queries, `compute_loss` does the rest, and the key encoder, queue and queue
pointer are non-trainable variables updated with `assign`.

The file reads top to bottom as the step runs: `MoCo` (construction, then
`call` and `compute_loss`, the step in the order of `builder.forward`, then
its parts: momentum update, keys, enqueue), `shuffled_keys` (shuffle BN on
one device and across `tf.distribute` replicas, in one function), then the
small helpers (argument checks, key encoder clone, queue init, heads).
"""

import copy
import math

import keras
from keras import layers
from keras import ops

from moco_keras import distribute
from moco_keras.batch_norm import at_least_float32
from moco_keras.presets import MOCOV1
from moco_keras.presets import PRESETS


@keras.saving.register_keras_serializable(package="moco_keras")
class MoCo(keras.Model):
    """Momentum Contrast: a query encoder, a momentum key encoder, a queue.

    Train it with `fit` on a dataset of `(view_q, view_k)` pairs, two
    augmentations of the same images. `model(images)` returns the
    L2-normalized query embeddings (`N x dim`); `compute_loss` runs the rest
    of the MoCo step on the key view:

    1. momentum update of the key encoder, on trainable weights only:
       `theta_k = m * theta_k + (1 - m) * theta_q`;
    2. keys with shuffle BN: the key batch is permuted, encoded, and put
       back in order, so that the BN groups of queries and keys differ
       (with split BN in the encoder; see `SplitBatchNormalization`);
    3. `l_pos = q . k`, `l_neg = q @ queue`, logits `[l_pos, l_neg] / T`
       with the positive in column 0, cross-entropy;
    4. the keys are written into the queue at its pointer, overwriting the
       oldest ones, and the pointer advances by N modulo K.

    The queue keeps exactly the last K keys also when K is not a multiple of
    the batch size (the pointer wraps inside a batch). Metrics: `loss`, and
    the top-1 / top-5 accuracy of the (K+1)-way task (`acc1`, `acc5`), as
    in the official training log; with `health=True`, measures of the
    features computed from the step's own queries and keys (`HEALTH`):
    `alignment` and `uniformity` (Wang and Isola, ICML 2020), `q_std` (the
    queries' standard deviation per dimension, about 1/sqrt(dim) when they
    spread over the sphere, 0 when they collapse), and the mean cosine
    similarities `l_pos`, `l_neg` and `l_neg_max` (each query's largest
    negative), before the temperature.

    Args:
        encoder: a built `keras.Model` from images to rank-2 features
            (`N x D`), e.g. `moco_keras.encoders.resnet50(bn_splits=8)`.
            The key encoder is a clone of it, with the same initial weights.
        dim: int, output dimension of the projection head (128).
        mlp: bool, the MoCo v2 head `Dense(D) - ReLU - Dense(dim)` instead
            of the v1 head `Dense(dim)`.
        queue_size: int, K, the number of negative keys (65536).
        momentum: float in [0, 1], m, momentum of the key encoder (0.999).
        temperature: float > 0, T, softmax temperature (0.07 in v1, 0.2 in
            v2).
        augmentation: optional layer applied to both views before the
            encoders, e.g. `color.ColorAugmentation`, so that the colour
            ops run batched on the accelerator; it gets `training`, and
            `model(images)` then takes what the layer takes (uint8 crops).
        seed: optional int, seeds the initial queue and the key shuffle.
        health: bool, also track the `HEALTH` measures (a few matrix
            products of the batch's queries; BENCHMARKS.md has their cost).
        **kwargs: `keras.Model` arguments such as `name`.

    Example:

    >>> from moco_keras import encoders
    >>> encoder = encoders.cifar_resnet18(width=4, bn_splits=2)
    >>> model = MoCo(encoder, dim=16, queue_size=32, mlp=True, seed=0)
    >>> model.compile(optimizer=keras.optimizers.SGD(0.03, momentum=0.9))
    >>> images = keras.random.uniform((8, 16, 16, 3))
    >>> history = model.fit(images, images, batch_size=4, verbose=0)
    >>> sorted(history.history)[:3], len(history.history)
    (['acc1', 'acc5', 'alignment'], 9)
    """

    # The defaults are MoCo v1's, as `presets.MOCOV1` writes them.
    def __init__(
        self,
        encoder,
        dim=MOCOV1["dim"],
        mlp=MOCOV1["mlp"],
        queue_size=MOCOV1["queue_size"],
        momentum=MOCOV1["momentum"],
        temperature=MOCOV1["temperature"],
        augmentation=None,
        seed=None,
        health=True,
        **kwargs,
    ):
        check_arguments(dim, mlp, queue_size, momentum, temperature)
        super().__init__(**kwargs)
        feature_dim = check_encoder(encoder)
        self.dim = dim
        self.mlp = mlp
        self.queue_size = queue_size
        self.momentum = momentum
        self.temperature = temperature
        self.seed = seed
        check_augmentation(augmentation)
        self.augmentation = augmentation

        self.encoder_q = encoder
        self.encoder_k = _clone(encoder)
        self.head_q = _projection_head(feature_dim, dim, mlp, name="head_q")
        self.head_k = _projection_head(feature_dim, dim, mlp, name="head_k")
        for q_var, k_var in self._encoder_weight_pairs():
            # A copy: JAX refuses two variables that share one buffer.
            k_var.assign(ops.copy(q_var.value))
        # Freeze the key side variable by variable: setting the layers'
        # `trainable` would also put their BN layers in inference mode, and
        # the official key encoder uses batch statistics.
        for k_var in self.encoder_k.weights + self.head_k.weights:
            k_var.trainable = False

        self.queue = self.add_weight(
            shape=(dim, queue_size),
            initializer=_normalized_normal(seed),
            trainable=False,
            autocast=False,
            name="queue",
        )
        self.queue_ptr = self.add_weight(
            shape=(),
            initializer="zeros",
            dtype="int32",
            trainable=False,
            autocast=False,
            name="queue_ptr",
        )
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.acc1 = keras.metrics.SparseTopKCategoricalAccuracy(
            k=1, name="acc1"
        )
        self.acc5 = keras.metrics.SparseTopKCategoricalAccuracy(
            k=min(5, queue_size + 1), name="acc5"
        )
        self.health = health
        if health:
            self.health_metric = HealthMetric()
        self.built = True

    @classmethod
    def from_preset(cls, preset, encoder, **overrides):
        """Builds MoCo v1 or v2 (`"mocov1"`, `"mocov2"`) on `encoder`.

        Any constructor argument in `overrides` replaces the preset's value.

        Example:

        >>> from moco_keras import encoders
        >>> model = MoCo.from_preset(
        ...     "mocov2", encoders.cifar_resnet18(width=4), queue_size=64
        ... )
        >>> model.temperature, model.queue_size
        (0.2, 64)
        """
        if preset not in PRESETS:
            raise ValueError(
                f"Unknown preset {preset!r}; expected one of {sorted(PRESETS)}."
            )
        return cls(encoder, **{**PRESETS[preset], **overrides})

    def call(self, inputs, training=False):
        if self.augmentation is not None:
            inputs = self.augmentation(inputs, training=training)
        features = self.encoder_q(inputs, training=training)  # N x D
        q = self.head_q(features, training=training)  # N x C
        return normalize(q)  # N x C

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        if y is None:
            raise ValueError(
                "MoCo trains on pairs of views: pass `fit(view_q, view_k)` or "
                "a dataset of `(view_q, view_k)` tuples. The key view (y) "
                "was None."
            )
        if sample_weight is not None:
            raise ValueError(
                "MoCo does not support sample weights; the dataset should "
                "yield `(view_q, view_k)` pairs only."
            )
        q = y_pred  # N x C, normalized queries
        if training:
            # Before the key forward, as in the official code.
            self._momentum_update_key_encoder()
        k, queue_keys = self._compute_keys(y, training)  # N x C, N' x C
        k = ops.stop_gradient(k)  # N x C
        queue = self.queue.value  # C x K
        if keras.backend.backend() == "torch":
            # Autograd keeps the queue for the backward pass of l_neg; the
            # in-place enqueue below would invalidate it.
            queue = ops.copy(queue)
        l_pos = ops.sum(q * k, axis=1, keepdims=True)  # N x 1
        l_neg = ops.matmul(q, queue)  # N x K
        logits = ops.concatenate([l_pos, l_neg], axis=1)  # N x (1+K)
        logits = logits / self.temperature  # N x (1+K)
        # Cross-entropy with label 0 (the positive key) for every row.
        loss = ops.mean(ops.logsumexp(logits, axis=1) - logits[:, 0])  # ()
        labels = ops.zeros_like(logits[:, 0], dtype="int32")  # N
        scores = ops.stop_gradient(logits)  # N x (1+K)
        self.acc1.update_state(labels, scores)
        self.acc5.update_state(labels, scores)
        if self.health:
            # From the logits the accuracies read: a second reader of l_pos
            # or l_neg themselves splits XLA's fusion of the logits and
            # their gradient (+8 % of the JAX step on a CPU, measured).
            similarity = scores * self.temperature  # N x (1+K)
            self.health_metric.update_state(
                health_measures(q, k, similarity[:, :1], similarity[:, 1:])
            )
        if training:
            self._dequeue_and_enqueue(ops.stop_gradient(queue_keys))
        replicas = distribute.num_replicas()
        if replicas > 1:
            # tf.distribute sums the replicas' gradients. Keras divides its
            # own losses by the replica count, but not a `compute_loss`
            # override: without this the gradients are R times too large.
            loss = loss / replicas  # ()
        for extra in self.losses:
            loss = loss + self._aggregate_additional_loss(extra)
        return loss

    def _encoder_weight_pairs(self):
        """(query variable, key variable) pairs, encoder then head."""
        pairs = []
        for q_model, k_model in (
            (self.encoder_q, self.encoder_k),
            (self.head_q, self.head_k),
        ):
            q_weights, k_weights = q_model.weights, k_model.weights
            if len(q_weights) != len(k_weights):
                raise ValueError(
                    f"The key model {k_model.name!r} has {len(k_weights)} "
                    f"variables but the query model has {len(q_weights)}."
                )
            pairs.extend(zip(q_weights, k_weights, strict=True))
        return pairs

    def _momentum_update_key_encoder(self):
        m = self.momentum
        for q_var, k_var in self._encoder_weight_pairs():
            # Trainable weights only: BN moving statistics of the key encoder
            # are its own, accumulated from the key batches.
            if q_var.trainable:
                q_value = ops.stop_gradient(q_var.value)
                k_var.assign(m * k_var.value + (1.0 - m) * q_value)

    def _compute_keys(self, images, training):
        """Normalized keys of `images` with shuffle BN, and the queue's keys.

        Returns:
            `(k, queue_keys)`: the keys of this device's images (`N x C`),
            and the keys to enqueue, those of the global batch (`N x C` on
            one device, `R*N x C` over R replicas).
        """
        if self.augmentation is not None:
            images = self.augmentation(images, training=training)
        if not training:
            k = self._encode_keys(images, training=False)  # N x C
            return k, k
        return shuffled_keys(
            images,
            lambda x: self._encode_keys(x, training=True),
            self.seed_generator,
            context=distribute.replica_context(),
        )

    def _encode_keys(self, images, training):
        features = self.encoder_k(images, training=training)  # N x D
        k = self.head_k(features, training=training)  # N x C
        return normalize(k)  # N x C

    def _dequeue_and_enqueue(self, keys):
        batch_size = keys.shape[0]
        if batch_size is not None and batch_size > self.queue_size:
            raise ValueError(
                f"The batch ({batch_size} keys) is larger than the queue "
                f"(queue_size={self.queue_size}). Use a queue of at least "
                "the global batch size."
            )
        ptr = ops.convert_to_tensor(self.queue_ptr.value)  # ()
        count = ops.shape(keys)[0]
        columns = ops.mod(
            ptr + ops.arange(count, dtype="int32"), self.queue_size
        )  # N
        queue_t = ops.transpose(self.queue.value)  # K x C
        queue_t = ops.scatter_update(queue_t, columns[:, None], keys)  # K x C
        self.queue.assign(ops.transpose(queue_t))  # C x K
        self.queue_ptr.assign(ops.mod(ptr + count, self.queue_size))

    def save_own_variables(self, store):
        super().save_own_variables(store)
        # Keras does not save SeedGenerator states; the key shuffle's belongs
        # to a run that resumes where it stopped.
        store[_SEED_STATE] = self.seed_generator.state

    def load_own_variables(self, store):
        keys = list(store.keys())
        if _SEED_STATE in keys:
            self.seed_generator.state.assign(store[_SEED_STATE])
            store = {key: store[key] for key in keys if key != _SEED_STATE}
        super().load_own_variables(store)

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "encoder": keras.saving.serialize_keras_object(self.encoder_q),
            "dim": self.dim,
            "mlp": self.mlp,
            "queue_size": self.queue_size,
            "momentum": self.momentum,
            "temperature": self.temperature,
            "augmentation": keras.saving.serialize_keras_object(
                self.augmentation
            ),
            "seed": self.seed,
            "health": self.health,
        }

    @classmethod
    def from_config(cls, config):
        # Deserialization consumes the nested config: work on a copy.
        config = copy.deepcopy(config)
        for key in ("encoder", "augmentation"):
            config[key] = keras.saving.deserialize_keras_object(config.get(key))
        return cls(**config)


def normalize(x):
    """`x / ||x||` over the features (axis 1), in float32 at least: under
    mixed precision the loss is computed in float32; float64 stays
    float64 (the tests compare the step with the official one in it)."""
    return ops.normalize(ops.cast(x, at_least_float32(x.dtype)), axis=1)


def shuffled_keys(images, encode, seed_generator, context=None):
    """Shuffle BN: the keys of a permuted batch, put back in batch order.

    The official `_batch_shuffle_ddp` / `_batch_unshuffle_ddp`. BN computes
    its statistics per group of images (per GPU in the official code), and
    queries and keys of the same images in one group would let the model
    cheat through them; so the key images are permuted before the key
    encoder and its keys unpermuted after it. Where the groups are:

    - one device, and JAX's data parallel (one program over the global
      batch): `SplitBatchNormalization(num_splits)` in the encoder cuts the
      batch into groups (under JAX they line up with the device shards);
    - `tf.distribute` (`context` given): each replica is a group, as each
      GPU in the official code; the key images of all replicas are
      gathered, permuted by one permutation that every replica draws alike
      (their seed generators hold the same state), each replica encodes its
      slice of the permuted batch, and the keys are gathered back.

    Args:
        images: this replica's key images, `N x H x W x 3`.
        encode: maps images to normalized keys (`N x C`), in training mode.
        seed_generator: `keras.random.SeedGenerator` of the permutation.
        context: the `tf.distribute` replica context of a step over several
            replicas (`distribute.replica_context()`), or None.

    Returns:
        `(k, queue_keys)`: the keys of this replica's images in their order
        (`N x C`), and the keys of the global batch in its order (`R*N x C`,
        replica 0's rows first; the same as `k` on one device).
    """
    n = ops.shape(images)[0]
    images_all = distribute.all_gather(context, images)  # R*N x H x W x 3
    order = keras.random.shuffle(
        ops.arange(ops.shape(images_all)[0], dtype="int32"),
        seed=seed_generator,
    )  # R*N
    start = distribute.replica_id(context) * n  # ()
    mine = order[start : start + n]  # N, this replica's slice of the order
    k = encode(ops.take(images_all, mine, axis=0))  # N x C
    k_all = distribute.all_gather(context, k)  # R*N x C, permuted order
    k_all = ops.take(k_all, ops.argsort(order), axis=0)  # R*N x C
    if context is None:
        return k_all, k_all
    return k_all[start : start + n], k_all  # N x C, R*N x C


_SEED_STATE = "seed_generator_state"

# The feature measures `MoCo(health=True)` tracks, in the order logged.
HEALTH = ("alignment", "uniformity", "q_std", "l_pos", "l_neg", "l_neg_max")


@keras.saving.register_keras_serializable(package="moco_keras")
class HealthMetric(keras.metrics.Metric):
    """The running means of the `HEALTH` measures, as one metric.

    One vector of sums and one count, so that a step carries two metric
    variables rather than two per measure; `result()` is a dict, which
    Keras spreads into the logs under the measures' names.

    Example:

    >>> metric = HealthMetric()
    >>> metric.update_state({name: 1.0 for name in HEALTH})
    >>> sorted(metric.result()) == sorted(HEALTH)
    True
    """

    def __init__(self, name="health", **kwargs):
        super().__init__(name=name, **kwargs)
        self.totals = self.add_variable(
            shape=(len(HEALTH),), initializer="zeros", name="totals"
        )
        self.count = self.add_variable(
            shape=(), initializer="zeros", name="count"
        )

    def update_state(self, measures):
        values = ops.stack(
            [ops.cast(measures[name], "float32") for name in HEALTH]
        )  # len(HEALTH)
        self.totals.assign_add(values)
        self.count.assign_add(1.0)

    def result(self):
        means = self.totals / ops.maximum(self.count, 1.0)  # len(HEALTH)
        return {name: means[i] for i, name in enumerate(HEALTH)}

    def reset_state(self):
        self.totals.assign(ops.zeros((len(HEALTH),)))
        self.count.assign(0.0)


def health_measures(q, k, l_pos, l_neg):
    """How the step's features are doing, from what the step computed.

    Args:
        q: the normalized queries, `N x C`.
        k: their normalized positive keys, `N x C`.
        l_pos: `q . k` per query, `N x 1`.
        l_neg: `q @ queue`, `N x K`.

    Returns:
        A dict of scalars, the `HEALTH` names: `alignment`, E ||q - k||^2
        over the positive pairs (0 when the two views map alike; lower is
        better); `uniformity`, log E exp(-2 ||q_i - q_j||^2) over the
        batch's distinct pairs (Wang and Isola's t = 2: -4 for orthogonal
        features, 0 when all collapse to one point; lower is better);
        `q_std`, the standard deviation over the batch of each dimension,
        averaged (about 1/sqrt(C) spread out, 0 collapsed); `l_pos`,
        `l_neg`, the mean positive and negative cosine similarities;
        `l_neg_max`, each query's largest negative, averaged.

    Example:

    >>> import numpy as np
    >>> q = np.eye(4, dtype="float32")
    >>> m = health_measures(q, q, np.ones((4, 1)), np.zeros((4, 8)))
    >>> round(float(m["alignment"]), 4), round(float(m["uniformity"]), 4)
    (0.0, -4.0)
    """
    q = ops.stop_gradient(ops.convert_to_tensor(q, "float32"))  # N x C
    k = ops.stop_gradient(ops.convert_to_tensor(k, "float32"))  # N x C
    l_pos = ops.stop_gradient(ops.convert_to_tensor(l_pos, "float32"))  # N x 1
    l_neg = ops.stop_gradient(ops.convert_to_tensor(l_neg, "float32"))  # N x K
    n = ops.shape(q)[0]
    alignment = ops.mean(ops.sum(ops.square(q - k), axis=1))  # ()
    similarity = ops.matmul(q, ops.transpose(q))  # N x N
    # ||q_i - q_j||^2 = 2 - 2 q_i . q_j for unit vectors.
    kernel = ops.exp(-2.0 * (2.0 - 2.0 * similarity))  # N x N
    distinct = 1.0 - ops.eye(n, dtype="float32")  # N x N, off the diagonal
    pairs = ops.maximum(ops.cast(n * (n - 1), "float32"), 1.0)  # ()
    uniformity = ops.log(ops.sum(kernel * distinct) / pairs)  # ()
    return {
        "alignment": alignment,
        "uniformity": uniformity,
        "q_std": ops.mean(ops.std(q, axis=0)),  # ()
        "l_pos": ops.mean(l_pos),  # ()
        "l_neg": ops.mean(l_neg),  # ()
        "l_neg_max": ops.mean(ops.max(l_neg, axis=1)),  # ()
    }


def check_arguments(dim, mlp, queue_size, momentum, temperature):
    """Raises `ValueError` unless these are valid `MoCo` arguments.

    `MoCo` calls it first; the recipes call it before they read any data.
    """
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(
            f"`dim` must be a positive int (128 in the paper). Received: "
            f"dim={dim!r}"
        )
    if not isinstance(mlp, bool):
        raise ValueError(f"`mlp` must be True or False. Received: mlp={mlp!r}")
    if not isinstance(queue_size, int) or queue_size < 1:
        raise ValueError(
            "`queue_size` (K) must be a positive int (65536 in the paper). "
            f"Received: queue_size={queue_size!r}"
        )
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(
            "`momentum` (m) must be in [0, 1] (0.999 in the paper); it "
            "weighs the old key encoder in `m * key + (1 - m) * query`. "
            f"Received: momentum={momentum!r}"
        )
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(
            "`temperature` (T) must be a finite number > 0 (0.07 in MoCo v1, "
            f"0.2 in v2). Received: temperature={temperature!r}"
        )


def _clone(encoder):
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


def _normalized_normal(seed):
    def initializer(shape, dtype=None):
        queue = keras.random.normal(shape, dtype=dtype, seed=seed)
        return ops.normalize(queue, axis=0)

    return initializer


def _torch_linear_initializers(fan_in):
    # torch.nn.Linear's default init, as the official heads are initialised:
    # U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the weight and the bias.
    bound = 1.0 / math.sqrt(fan_in)
    return {
        "kernel_initializer": keras.initializers.VarianceScaling(
            scale=1.0 / 3.0, mode="fan_in", distribution="uniform"
        ),
        "bias_initializer": keras.initializers.RandomUniform(-bound, bound),
    }


def _projection_head(feature_dim, dim, mlp, name):
    """The official `fc` head: Linear (v1) or Linear-ReLU-Linear (v2)."""
    if mlp:
        head_layers = [
            layers.Dense(
                feature_dim,
                activation="relu",
                name="fc_0",
                **_torch_linear_initializers(feature_dim),
            ),
            layers.Dense(
                dim, name="fc_2", **_torch_linear_initializers(feature_dim)
            ),
        ]
    else:
        head_layers = [
            layers.Dense(
                dim, name="fc", **_torch_linear_initializers(feature_dim)
            )
        ]
    head = keras.Sequential(head_layers, name=name)
    head.build((None, feature_dim))
    return head


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
