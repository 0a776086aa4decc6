"""MoCo v3 as one `keras.Model`: the step of the official `moco-v3` code.

Chen, Xie and He, "An Empirical Study of Training Self-Supervised Vision
Transformers" (ICCV 2021, arXiv 2104.02057); facebookresearch/moco-v3
`moco/builder.py`. No queue: the keys of the other images of the (global)
batch are the negatives, and the loss is symmetric over the two views:

    q1 = predictor(projector(encoder(x1)))        # and q2 from x2
    momentum update: theta_k = m * theta_k + (1 - m) * theta_q
    k1 = projector_k(encoder_k(x1))               # and k2 from x2
    loss = ctr(q1, k2) + ctr(q2, k1)
    ctr(q, k) = CE(normalize(q) @ normalize(gather(k)).T / T,
                   arange(N) + N * rank) * 2T

As in `MoCo` (v1/v2), Keras' training hook runs the step on every backend:
`call` computes `q1`, `compute_loss` the rest; the momentum encoder and
projector are non-trainable variables updated with `assign`. The file
reads as the step runs: `MoCoV3` (construction, `call`, `compute_loss`,
then the parts), then `contrastive_loss` and the MLP builder.
"""

import keras
from keras import layers
from keras import ops

from moco_keras import distribute
from moco_keras import health as health_lib
from moco_keras import momentum_pair
from moco_keras import optimizers
from moco_keras.batch_norm import SplitBatchNormalization
from moco_keras.presets import MOCOV3_RESNET
from moco_keras.presets import MOCOV3_VIT

# `MoCoV3` arguments of the official recipes, in `moco_keras.presets`.
PRESETS = {"mocov3_resnet": MOCOV3_RESNET, "mocov3_vit": MOCOV3_VIT}


@keras.saving.register_keras_serializable(package="moco_keras")
class MoCoV3(momentum_pair.MomentumPair):
    """MoCo v3: an encoder with projector and predictor, a momentum copy.

    Train it with `fit(view_1, view_2)` (or a dataset of such pairs), two
    augmentations of the same images. `model(images)` returns the
    L2-normalized predictions `q` (`N x dim`); `compute_loss` runs the rest
    of the official step (`moco/builder.py`, `MoCo.forward`):

    1. `q1`, `q2`: the encoder, projector and predictor on each view, each
       view a batch of its own for batch normalization;
    2. the momentum update of the key encoder and projector, before the
       keys, on the trainable weights (BN's moving statistics are each
       side's own): `theta_k = m * theta_k + (1 - m) * theta_q`;
    3. `k1`, `k2` from the momentum side in training mode (batch
       statistics, no gradient);
    4. `ctr(q1, k2) + ctr(q2, k1)` (`contrastive_loss`).

    The momentum `m` is `momentum`: a number, or a schedule such as the
    official `--moco-m-cos` (`optimizers.CosineMomentum`, from 0.99 to 1
    over the run), which the official loop evaluates every step and hands
    to `forward`. Here the model evaluates it at its own count of training
    steps (`train_steps`, a variable saved with the weights, so that the
    schedule resumes with the run; the optimizer's counter is out of reach
    of the step under JAX).

    Batch normalization: the official code converts every BN to SyncBN,
    whose statistics are those of the global batch. On one device and
    under JAX's data parallel (one program over the global batch) the
    encoder's BN already sees the whole batch: build it with
    `bn_splits=1`. Under a `tf.distribute` strategy of several replicas,
    build the model in its scope with a SyncBN encoder
    (`encoders.resnet50(sync_bn=True)`); the projector and predictor then
    get SyncBN too, and the keys of all replicas are gathered, each
    replica's labels offset by its rank.

    Metrics: `loss`, `acc1` (the share of queries whose positive key
    scores highest among the batch's keys), and with
    `health=True` the `health.HEALTH` measures of `q1` against `k2`.

    Args:
        encoder: a built `keras.Model` from images to `N x D` features,
            e.g. `encoders.resnet50()` or `vits.vit_small()`. The momentum
            encoder is a clone with the same initial weights.
        dim: int, the projector's and predictor's output size (256).
        mlp_dim: int, their hidden layers' size (4096).
        projector_layers: int, Linear layers of the projector (2 for
            ResNet, 3 for ViT).
        predictor_last_bn: bool, the predictor ends with an affine-free BN
            (ViT) or with its last Linear (ResNet).
        momentum: m, a float in [0, 1] (0.99), or a schedule of the
            training step (`optimizers.CosineMomentum`).
        temperature: float > 0, T (1.0 for ResNet, 0.2 for ViT).
        augmentation: optional in-model colour half of the views: one
            layer for both, or a pair, the first view's and the second's
            (`color.ColorAugmentation`s of `views.get_augmentation(
            "mocov3")`), for inputs that are uint8 crops
            (`views.two_view_batches`). Inference takes the first (which only
            normalizes outside training).
        health: bool, also track the `health.HEALTH` measures.
        **kwargs: `keras.Model` arguments such as `name`.

    Example:

    >>> from moco_keras import encoders
    >>> encoder = encoders.cifar_resnet18(width=4)
    >>> model = MoCoV3(encoder, dim=8, mlp_dim=16)
    >>> model.compile(optimizer=keras.optimizers.SGD(0.1))
    >>> images = keras.random.uniform((8, 16, 16, 3))
    >>> history = model.fit(images, images, batch_size=4, verbose=0)
    >>> "acc1" in history.history and "uniformity" in history.history
    True
    """

    PRESETS = PRESETS
    CONFIG_KEYS = (
        "dim",
        "mlp_dim",
        "projector_layers",
        "predictor_last_bn",
        "momentum",
        "temperature",
    )
    TITLE = "MoCo v3"

    def __init__(
        self,
        encoder,
        dim=MOCOV3_RESNET["dim"],
        mlp_dim=MOCOV3_RESNET["mlp_dim"],
        projector_layers=MOCOV3_RESNET["projector_layers"],
        predictor_last_bn=MOCOV3_RESNET["predictor_last_bn"],
        momentum=MOCOV3_RESNET["momentum"],
        temperature=MOCOV3_RESNET["temperature"],
        augmentation=None,
        health=True,
        **kwargs,
    ):
        check_arguments(dim, mlp_dim, projector_layers, momentum, temperature)
        super().__init__(**kwargs)
        feature_dim = momentum_pair.check_encoder(encoder)
        pair = (
            tuple(augmentation)
            if isinstance(augmentation, (list, tuple))
            else (augmentation, augmentation)
        )
        if len(pair) != 2:
            raise ValueError(
                "`augmentation` is one layer for both views or a pair, the "
                f"first view's and the second's. Received {len(pair)} layers."
            )
        for layer in pair:
            momentum_pair.check_augmentation(layer)
        if (pair[0] is None) != (pair[1] is None):
            raise ValueError(
                "Both views take an in-model augmentation or neither: "
                f"received augmentation={augmentation!r}."
            )
        synchronized = distribute.num_replicas() > 1
        if synchronized:
            _check_synchronized(encoder)
        self.dim = dim
        self.mlp_dim = mlp_dim
        self.projector_layers = projector_layers
        self.predictor_last_bn = predictor_last_bn
        self.momentum = momentum
        self.temperature = temperature
        self.augmentation = augmentation
        self._augmentations = pair

        self.encoder_q = encoder
        self.encoder_k = momentum_pair.clone_encoder(encoder)
        self.projector_q = build_mlp(
            projector_layers,
            feature_dim,
            mlp_dim,
            dim,
            True,
            "projector_q",
            synchronized,
        )
        self.projector_k = build_mlp(
            projector_layers,
            feature_dim,
            mlp_dim,
            dim,
            True,
            "projector_k",
            synchronized,
        )
        self.predictor = build_mlp(
            2, dim, mlp_dim, dim, predictor_last_bn, "predictor", synchronized
        )
        self.initialize_key_side()
        self.train_steps = self.add_weight(
            shape=(),
            initializer="zeros",
            dtype="int32",
            trainable=False,
            autocast=False,
            name="train_steps",
        )
        self.acc1 = keras.metrics.Mean(name="acc1")
        self.track_health(health)
        self.built = True

    def momentum_models(self):
        return [
            (self.encoder_q, self.encoder_k),
            (self.projector_q, self.projector_k),
        ]

    def call(self, inputs, training=False):
        images = self._augment(inputs, 0, training)
        q = self._predict(images, training)  # N x C
        if training and self.augmentation is not None:
            # The keys of the first view need its augmented images:
            # `compute_loss` takes them from here.
            return q, images
        return q

    def _augment(self, images, view, training):
        layer = self._augmentations[view]
        return images if layer is None else layer(images, training=training)

    def _predict(self, images, training):
        features = self.encoder_q(images, training=training)  # N x D
        z = self.projector_q(features, training=training)  # N x C
        q = self.predictor(z, training=training)  # N x C
        return momentum_pair.normalize(q)  # N x C

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        self.check_views(y, sample_weight)
        context = distribute.replica_context()
        if isinstance(y_pred, (tuple, list)):
            q1, x = y_pred  # N x C, the augmented first view
        else:
            q1 = y_pred  # N x C
            x = self._augment(x, 0, training)
        y = self._augment(y, 1, training)
        q2 = self._predict(y, training)  # N x C
        if training:
            self.momentum_update_key_encoder()
            self.train_steps.assign(self.train_steps + 1)
        k1 = ops.stop_gradient(self.encode_keys(x, training))  # N x C
        k2 = ops.stop_gradient(self.encode_keys(y, training))  # N x C
        t = self.temperature
        loss_12, l_12 = contrastive_loss(q1, k2, t, context)  # (), N x M
        loss_21, _ = contrastive_loss(q2, k1, t, context)  # ()
        loss = loss_12 + loss_21  # ()
        n = ops.shape(q1)[0]
        offset = n * distribute.replica_id(context)  # ()
        labels = ops.arange(n, dtype="int32") + offset  # N
        correct = ops.argmax(l_12, axis=1) == labels  # N
        self.acc1.update_state(ops.cast(correct, "float32"))
        if self.health:
            l_pos = ops.sum(q1 * k2, axis=1, keepdims=True)  # N x 1
            l_neg = _without_positives(l_12, labels)  # N x (M-1)
            self.health_metric.update_state(
                health_lib.health_measures(q1, k2, l_pos, l_neg)
            )
        return self.replica_loss(loss)

    def current_momentum(self):
        """m of this step: fixed, or its schedule at `train_steps`."""
        if callable(self.momentum):
            return self.momentum(self.train_steps.value)
        return self.momentum

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        # Checkpoints written before the schedule was an object held its
        # epochs and steps per epoch as arguments of their own.
        epochs = config.pop("momentum_epochs", None)
        steps_per_epoch = config.pop("steps_per_epoch", None)
        if epochs is not None:
            config["momentum"] = optimizers.CosineMomentum(
                config["momentum"], steps_per_epoch, epochs
            )
        return super().from_config(config)


def check_arguments(dim, mlp_dim, projector_layers, momentum, temperature):
    """Raises `ValueError` unless these are valid `MoCoV3` arguments.

    `MoCoV3` calls it first; `methods.METHODS["mocov3"]` before any data is
    read.
    """
    momentum_pair.check_arguments(dim, momentum, temperature)
    for name, value in (
        ("mlp_dim", mlp_dim),
        ("projector_layers", projector_layers),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(
                f"`{name}` must be a positive int (4096 and 2 or 3 in the "
                f"official code). Received: {name}={value!r}"
            )


def contrastive_loss(q, k, temperature, context=None):
    """The official `contrastive_loss`: InfoNCE of q against all keys.

    Args:
        q: this replica's queries, `N x C` (normalized here).
        k: this replica's keys, `N x C` (normalized here, gathered over the
            replicas of `context`).
        temperature: T.
        context: the `tf.distribute` replica context, or None for one
            program over the whole batch.

    Returns:
        `(loss, logits)`: the cross-entropy with the label of each query
        its own key (`arange(N) + N * rank`) times `2 * T`, and the
        similarities `q @ k_all.T` before the temperature (`N x R*N`).
    """
    q = momentum_pair.normalize(q)  # N x C
    k = momentum_pair.normalize(k)  # N x C
    k_all = distribute.all_gather(context, k)  # M x C, M = R*N
    similarity = ops.matmul(q, ops.transpose(k_all))  # N x M
    logits = similarity / temperature  # N x M
    n = ops.shape(q)[0]
    labels = ops.arange(n, dtype="int32") + n * distribute.replica_id(
        context
    )  # N
    positive = ops.take_along_axis(logits, labels[:, None], axis=1)  # N x 1
    # A sum over n rather than `ops.mean`, which Keras runs in float32 on
    # JAX and torch even for float64.
    per_query = ops.logsumexp(logits, axis=1) - positive[:, 0]  # N
    loss = ops.sum(per_query) / ops.cast(n, per_query.dtype)  # ()
    return loss * (2.0 * temperature), similarity


def build_mlp(
    num_layers,
    input_dim,
    mlp_dim,
    output_dim,
    last_bn,
    name,
    synchronized=False,
):
    """The official `_build_mlp`: Linear (no bias), BN, ReLU, ..., Linear,
    and with `last_bn` a BN without scale or offset (SimCLR's design).

    The Linear layers have torch's default initialisation, as the official
    heads are built after the encoder's own initialisation; BN is torch's
    (eps 1e-5, momentum 0.1), over the global batch of all `tf.distribute`
    replicas with `synchronized` (SyncBN).
    """
    bn = {"synchronized": True} if synchronized else {}
    mlp_layers = []
    for i in range(num_layers):
        fan_in = input_dim if i == 0 else mlp_dim
        units = output_dim if i == num_layers - 1 else mlp_dim
        initializers = momentum_pair.torch_linear_initializers(fan_in)
        mlp_layers.append(
            layers.Dense(
                units,
                use_bias=False,
                kernel_initializer=initializers["kernel_initializer"],
                name=f"linear_{i}",
            )
        )
        if i < num_layers - 1:
            mlp_layers.append(SplitBatchNormalization(name=f"bn_{i}", **bn))
            mlp_layers.append(layers.ReLU(name=f"relu_{i}"))
        elif last_bn:
            mlp_layers.append(
                SplitBatchNormalization(
                    center=False, scale=False, name=f"bn_{i}", **bn
                )
            )
    mlp = keras.Sequential(mlp_layers, name=name)
    mlp.build((None, input_dim))
    return mlp


def _check_synchronized(encoder):
    """Under several `tf.distribute` replicas every BN of the encoder must
    be SyncBN: the official code converts them all."""
    plain = [
        layer.name
        for layer in encoder._flatten_layers(include_self=False)
        if isinstance(layer, layers.BatchNormalization)
        and not layer.synchronized
    ]
    if plain:
        raise ValueError(
            f"MoCo v3 over {distribute.num_replicas()} replicas normalizes "
            "over the global batch (SyncBN, as the official code), but the "
            f"encoder {encoder.name!r} has per-replica BN layers "
            f"({', '.join(plain[:3])}, ...). Build it with `sync_bn=True` "
            "(`encoders.resnet50(sync_bn=True)`) inside the strategy's scope."
        )


def _without_positives(similarity, labels):
    """Each row's negatives: `N x M` without row i's positive column
    `labels[i]`."""
    m = ops.shape(similarity)[1]
    # Columns l+1, ..., l+M-1 modulo M: every column but the positive.
    columns = ops.mod(
        labels[:, None] + 1 + ops.arange(m - 1, dtype="int32")[None, :], m
    )  # N x (M-1)
    return ops.take_along_axis(similarity, columns, axis=1)  # N x (M-1)
