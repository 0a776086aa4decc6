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
its parts: keys, enqueue), `shuffled_keys` (shuffle BN on one device and
across `tf.distribute` replicas, in one function), then the small helpers
(argument checks, queue init, head). The momentum pair, its update and the
key forward are shared with MoCo v3 (`momentum_pair.MomentumPair`).
"""

import keras
from keras import layers
from keras import ops

from moco_keras import distribute
from moco_keras import health as health_lib
from moco_keras import momentum_pair
from moco_keras.presets import MOCOV1
from moco_keras.presets import PRESETS


@keras.saving.register_keras_serializable(package="moco_keras")
class MoCo(momentum_pair.MomentumPair):
    """Momentum Contrast: a query encoder, a momentum key encoder, a queue.

    Train it with `fit` on a dataset of `(view_q, view_k)` pairs, two
    augmentations of the same images. `model(images)` returns the
    L2-normalized query embeddings (`N x dim`); `compute_loss` runs the rest
    of the MoCo step on the key view:

    1. momentum update of the key encoder and head, on their parameters
       (`momentum_pair.MomentumPair`): `theta_k = m * theta_k + (1 - m) *
       theta_q`;
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
    features computed from the step's own queries and keys
    (`health.HEALTH`):
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
        health: bool, also track the `health.HEALTH` measures (a few matrix
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

    PRESETS = PRESETS
    CONFIG_KEYS = (
        "dim",
        "mlp",
        "queue_size",
        "momentum",
        "temperature",
        "seed",
    )
    TITLE = "MoCo"

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
        feature_dim = momentum_pair.check_encoder(encoder)
        self.dim = dim
        self.mlp = mlp
        self.queue_size = queue_size
        self.momentum = momentum
        self.temperature = temperature
        self.seed = seed
        momentum_pair.check_augmentation(augmentation)
        self.augmentation = augmentation

        self.encoder_q = encoder
        self.encoder_k = momentum_pair.clone_encoder(encoder)
        self.head_q = _projection_head(feature_dim, dim, mlp, name="head_q")
        self.head_k = _projection_head(feature_dim, dim, mlp, name="head_k")
        self.initialize_key_side()

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
        self.track_health(health)
        self.built = True

    def momentum_models(self):
        return [(self.encoder_q, self.encoder_k), (self.head_q, self.head_k)]

    def call(self, inputs, training=False):
        if self.augmentation is not None:
            inputs = self.augmentation(inputs, training=training)
        features = self.encoder_q(inputs, training=training)  # N x D
        q = self.head_q(features, training=training)  # N x C
        return momentum_pair.normalize(q)  # N x C

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        self.check_views(y, sample_weight)
        q = y_pred  # N x C, normalized queries
        if training:
            # Before the key forward, as in the official code.
            self.momentum_update_key_encoder()
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
                health_lib.health_measures(
                    q, k, similarity[:, :1], similarity[:, 1:]
                )
            )
        if training:
            self._dequeue_and_enqueue(ops.stop_gradient(queue_keys))
        return self.replica_loss(loss)

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
            k = self.encode_keys(images, training=False)  # N x C
            return k, k
        return shuffled_keys(
            images,
            lambda x: self.encode_keys(x, training=True),
            self.seed_generator,
            context=distribute.replica_context(),
        )

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


def check_arguments(dim, mlp, queue_size, momentum, temperature):
    """Raises `ValueError` unless these are valid `MoCo` arguments.

    `MoCo` calls it first; the methods `mocov1` and `mocov2`
    (`methods.METHODS`) before any data is read.
    """
    if callable(momentum):
        raise ValueError(
            "`momentum` (m) of MoCo v1/v2 is a number, fixed over the run as "
            "in the official code; a schedule of m is MoCo v3's "
            f"(`MoCoV3`). Received: momentum={momentum!r}"
        )
    momentum_pair.check_arguments(dim, momentum, temperature)
    if not isinstance(mlp, bool):
        raise ValueError(f"`mlp` must be True or False. Received: mlp={mlp!r}")
    if not isinstance(queue_size, int) or queue_size < 1:
        raise ValueError(
            "`queue_size` (K) must be a positive int (65536 in the paper). "
            f"Received: queue_size={queue_size!r}"
        )


def _normalized_normal(seed):
    def initializer(shape, dtype=None):
        queue = keras.random.normal(shape, dtype=dtype, seed=seed)
        return ops.normalize(queue, axis=0)

    return initializer


def _projection_head(feature_dim, dim, mlp, name):
    """The official `fc` head: Linear (v1) or Linear-ReLU-Linear (v2)."""
    if mlp:
        head_layers = [
            layers.Dense(
                feature_dim,
                activation="relu",
                name="fc_0",
                **momentum_pair.torch_linear_initializers(feature_dim),
            ),
            layers.Dense(
                dim,
                name="fc_2",
                **momentum_pair.torch_linear_initializers(feature_dim),
            ),
        ]
    else:
        head_layers = [
            layers.Dense(
                dim,
                name="fc",
                **momentum_pair.torch_linear_initializers(feature_dim),
            )
        ]
    head = keras.Sequential(head_layers, name=name)
    head.build((None, feature_dim))
    return head
