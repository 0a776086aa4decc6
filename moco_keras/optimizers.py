"""The optimizer and learning-rate schedules of the official MoCo code.

`main_moco.py` trains with `torch.optim.SGD(lr, momentum=0.9,
weight_decay=1e-4)` and sets the learning rate once per epoch: a cosine
(`--cos`, MoCo v2) or x0.1 steps at `--schedule` epochs (MoCo v1). Keras' SGD
differs in two ways that change the trajectory: its `weight_decay` is
decoupled from the momentum, and its momentum buffer holds `lr * gradient`
rather than the gradient. `SGD` here is torch's update.

MoCo v3 (`moco-v3` `main_moco.py`, `moco/optimizer.py`) trains ResNet-50
with `LARS` and ViTs with `torch.optim.AdamW` (`AdamW` here: Keras' adds
epsilon before the bias correction, torch after it), sets the rate every
step (`WarmupCosine`), and raises the key encoder momentum along a cosine
(`CosineMomentum`).
"""

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="moco_keras")
class SGD(keras.optimizers.Optimizer):
    """`torch.optim.SGD` with momentum and coupled L2 weight decay.

    For each trainable variable `w` with gradient `g`:
    `d = g + weight_decay * w; buf = momentum * buf + d; w -= lr * buf`.
    The decay applies to every trainable weight (BN and biases included), as
    the official code passes all parameters to the optimizer.

    Args:
        learning_rate: float or a `LearningRateSchedule`.
        momentum: float >= 0 (0.9 in MoCo).
        weight_decay: float >= 0, the L2 coefficient (1e-4 in MoCo).
        **kwargs: other `keras.optimizers.Optimizer` arguments, except the
            decoupled `weight_decay` of the base class.

    Example:

        >>> optimizer = SGD(0.03, momentum=0.9, weight_decay=1e-4)
        >>> w = keras.Variable([1.0])
        >>> _ = optimizer.apply_gradients([(keras.ops.array([0.5]), w)])
        >>> round(float(w.numpy()[0]), 6)  # 1 - 0.03 * (0.5 + 1e-4)
        0.984997
    """

    def __init__(
        self,
        learning_rate=0.03,
        momentum=0.9,
        weight_decay=0.0,
        name="SGD",
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if momentum < 0 or weight_decay < 0:
            raise ValueError(
                "momentum and weight_decay must be >= 0. Received: "
                f"momentum={momentum}, weight_decay={weight_decay}"
            )
        self.momentum = momentum
        # Not `self.weight_decay`: the base class would add decoupled decay.
        self.l2_weight_decay = weight_decay

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = []
        if self.momentum:
            self.momentums = [
                self.add_variable_from_reference(v, name="momentum")
                for v in variables
            ]

    def update_step(self, gradient, variable, learning_rate):
        learning_rate = ops.cast(learning_rate, variable.dtype)
        direction = self.direction(ops.cast(gradient, variable.dtype), variable)
        if self.momentum:
            buffer = self.momentums[self._get_variable_index(variable)]
            self.assign(buffer, buffer * self.momentum + direction)
            direction = buffer
        self.assign_sub(variable, learning_rate * direction)

    def direction(self, gradient, variable):
        """`d`, what the momentum buffer accumulates: `g + weight_decay *
        w` (`LARS` scales it)."""
        if self.l2_weight_decay:
            return gradient + self.l2_weight_decay * variable
        return gradient

    def get_config(self):
        config = super().get_config()
        config.update(
            {"momentum": self.momentum, "weight_decay": self.l2_weight_decay}
        )
        return config


@keras.saving.register_keras_serializable(package="moco_keras")
class EpochSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """The official per-epoch learning rate: cosine or steps.

    With `cosine=True`: `lr * 0.5 * (1 + cos(pi * epoch / epochs))`; else
    `lr * 0.1 ** (number of milestones <= epoch)`. The rate changes at epoch
    boundaries only, as in `main_moco.py`'s `adjust_learning_rate`.

    Args:
        learning_rate: the base rate, for the global batch.
        steps_per_epoch: optimizer steps in one epoch.
        epochs: total epochs (for the cosine).
        cosine: bool.
        milestones: epochs at which the step schedule multiplies by 0.1.

    Example:

        >>> schedule = EpochSchedule(0.03, steps_per_epoch=10, epochs=200,
        ...                          milestones=(120, 160))
        >>> [round(float(schedule(s)), 5) for s in (0, 1199, 1200, 1600)]
        [0.03, 0.03, 0.003, 0.0003]
    """

    def __init__(
        self,
        learning_rate,
        steps_per_epoch,
        epochs,
        cosine=False,
        milestones=(),
    ):
        if steps_per_epoch < 1 or epochs < 1:
            raise ValueError(
                "steps_per_epoch and epochs must be >= 1. Received: "
                f"steps_per_epoch={steps_per_epoch}, epochs={epochs}"
            )
        self.learning_rate = learning_rate
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.cosine = cosine
        self.milestones = tuple(milestones)

    def __call__(self, step):
        epoch = ops.floor(ops.cast(step, "float32") / self.steps_per_epoch)
        if self.cosine:
            return (
                self.learning_rate
                * 0.5
                * (1.0 + ops.cos(math.pi * epoch / self.epochs))
            )
        factor = ops.ones_like(epoch)
        for milestone in self.milestones:
            factor = ops.where(epoch >= milestone, factor * 0.1, factor)
        return self.learning_rate * factor

    def get_config(self):
        return {
            "learning_rate": self.learning_rate,
            "steps_per_epoch": self.steps_per_epoch,
            "epochs": self.epochs,
            "cosine": self.cosine,
            "milestones": list(self.milestones),
        }


@keras.saving.register_keras_serializable(package="moco_keras")
class LARS(SGD):
    """LARS as MoCo v3's `moco/optimizer.py` runs it (ResNet-50 recipes).

    `SGD`'s momentum step on another direction: for each trainable
    variable `w` with gradient `g`, if `w` is a matrix or a kernel
    (rank > 1), `d = g + weight_decay * w` scaled by the trust ratio
    `trust_coefficient * ||w|| / ||d||` (1 where either norm is 0); biases
    and normalization scales and offsets (rank 1) keep `d = g`, with no
    decay and no scaling. Then `buf = momentum * buf + d; w -= lr * buf`.

    Args:
        learning_rate: float or a `LearningRateSchedule`.
        momentum: float >= 0 (0.9 in MoCo v3).
        weight_decay: float >= 0 (1e-6 in MoCo v3's ResNet-50 recipe).
        trust_coefficient: float > 0 (0.001).
        **kwargs: other `keras.optimizers.Optimizer` arguments, except the
            decoupled `weight_decay` of the base class.

    Example:

        >>> optimizer = LARS(0.5, momentum=0.9, weight_decay=0.0)
        >>> w = keras.Variable([[3.0, 4.0]])  # ||w|| = 5
        >>> _ = optimizer.apply_gradients([(keras.ops.array([[0.0, 2.0]]), w)])
        >>> [round(float(v), 4) for v in w.numpy()[0]]  # 4 - 0.5 * 0.005
        [3.0, 3.9975]
    """

    def __init__(
        self,
        learning_rate=0.6,
        momentum=0.9,
        weight_decay=0.0,
        trust_coefficient=0.001,
        name="LARS",
        **kwargs,
    ):
        if trust_coefficient <= 0:
            raise ValueError(
                "trust_coefficient must be > 0 (0.001 in MoCo v3). Received: "
                f"trust_coefficient={trust_coefficient}"
            )
        super().__init__(
            learning_rate=learning_rate,
            momentum=momentum,
            weight_decay=weight_decay,
            name=name,
            **kwargs,
        )
        self.trust_coefficient = trust_coefficient

    def direction(self, gradient, variable):
        if len(variable.shape) <= 1:
            return gradient
        direction = gradient + self.l2_weight_decay * variable
        param_norm = ops.sqrt(ops.sum(ops.square(variable)))  # ()
        update_norm = ops.sqrt(ops.sum(ops.square(direction)))  # ()
        trust = ops.where(
            (param_norm > 0.0) & (update_norm > 0.0),
            self.trust_coefficient
            * param_norm
            / ops.maximum(update_norm, 1e-30),
            1.0,
        )  # ()
        return direction * ops.cast(trust, variable.dtype)

    def get_config(self):
        config = super().get_config()
        config["trust_coefficient"] = self.trust_coefficient
        return config


def _bias_correction(beta, step):
    """`1 - beta ** step` as `-expm1(step * log(beta))`: in float32,
    `1 - 0.999 ** t` loses 5e-5 of itself to the rounding of 0.999 (torch
    computes it in double)."""
    if beta == 0:
        return 1.0
    return -ops.expm1(step * math.log(beta))


@keras.saving.register_keras_serializable(package="moco_keras")
class AdamW(keras.optimizers.Optimizer):
    """`torch.optim.AdamW`, which MoCo v3 trains its ViTs with.

    For each trainable variable `w` with gradient `g`, at step `t` (from 1):
    `w -= lr * weight_decay * w` (decoupled decay, on every weight as the
    official code passes them all), then
    `m = beta_1 * m + (1 - beta_1) * g`,
    `v = beta_2 * v + (1 - beta_2) * g ** 2` and
    `w -= lr * (m / (1 - beta_1 ** t)) / (sqrt(v / (1 - beta_2 ** t)) + eps)`:
    torch's update (`torch/optim/adamw.py`, Loshchilov and Hutter 2019).
    `keras.optimizers.AdamW` adds `eps` to `sqrt(v)` before the bias
    correction, which equals torch's only with an epsilon of
    `eps * sqrt(1 - beta_2 ** t)`, a schedule Keras' constant epsilon cannot
    take; early in training, where `1 - beta_2 ** t` is small, the two
    differ most.

    Args:
        learning_rate: float or a `LearningRateSchedule`.
        weight_decay: float >= 0, decoupled (0.1 in MoCo v3's ViT recipes;
            torch's default 0.01).
        beta_1: float in [0, 1), the first moment's decay (torch's 0.9).
        beta_2: float in [0, 1), the second moment's decay (torch's 0.999).
        epsilon: float > 0 (torch's 1e-8).
        **kwargs: other `keras.optimizers.Optimizer` arguments.

    Example:

        >>> optimizer = AdamW(0.1, weight_decay=0.0)
        >>> w = keras.Variable([1.0])
        >>> _ = optimizer.apply_gradients([(keras.ops.array([0.5]), w)])
        >>> round(float(w.numpy()[0]), 6)  # 1 - 0.1 * 0.5 / (0.5 + 1e-8)
        0.9
    """

    def __init__(
        self,
        learning_rate=0.001,
        weight_decay=0.01,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
        name="AdamW",
        **kwargs,
    ):
        if not (0 <= beta_1 < 1 and 0 <= beta_2 < 1) or epsilon <= 0:
            raise ValueError(
                "beta_1 and beta_2 must be in [0, 1) and epsilon > 0. "
                f"Received: beta_1={beta_1}, beta_2={beta_2}, "
                f"epsilon={epsilon}"
            )
        if weight_decay is None or weight_decay < 0:
            raise ValueError(
                f"weight_decay must be >= 0. Received: {weight_decay!r}"
            )
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            name=name,
            **kwargs,
        )
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.exp_avgs = [
            self.add_variable_from_reference(v, name="exp_avg")
            for v in variables
        ]
        self.exp_avg_sqs = [
            self.add_variable_from_reference(v, name="exp_avg_sq")
            for v in variables
        ]

    def update_step(self, gradient, variable, learning_rate):
        # The decoupled decay ran before, in the base class's `apply`:
        # `w -= lr * weight_decay * w`, as torch's first line.
        learning_rate = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        step = ops.cast(self.iterations + 1, variable.dtype)
        index = self._get_variable_index(variable)
        exp_avg, exp_avg_sq = self.exp_avgs[index], self.exp_avg_sqs[index]
        self.assign(
            exp_avg, exp_avg * self.beta_1 + gradient * (1.0 - self.beta_1)
        )
        self.assign(
            exp_avg_sq,
            exp_avg_sq * self.beta_2
            + ops.square(gradient) * (1.0 - self.beta_2),
        )
        bias_correction_1 = _bias_correction(self.beta_1, step)
        bias_correction_2 = _bias_correction(self.beta_2, step)
        denominator = (
            ops.sqrt(exp_avg_sq) / ops.sqrt(bias_correction_2) + self.epsilon
        )
        self.assign_sub(
            variable,
            learning_rate / bias_correction_1 * exp_avg / denominator,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="moco_keras")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """MoCo v3's learning rate, set every step: linear warm-up, then cosine.

    `main_moco.py`'s `adjust_learning_rate` at the fractional epoch
    `e = step / steps_per_epoch`: `lr * e / warmup_epochs` while
    `e < warmup_epochs`, then
    `lr * 0.5 * (1 + cos(pi * (e - warmup) / (epochs - warmup)))`.

    Args:
        learning_rate: the peak rate, for the global batch (MoCo v3 scales
            its `--lr` by batch / 256).
        steps_per_epoch: optimizer steps in one epoch.
        epochs: total epochs.
        warmup_epochs: epochs of linear warm-up (10 for ResNet-50, 40 for
            ViT).

    Example:

        >>> schedule = WarmupCosine(1.0, steps_per_epoch=10, epochs=100,
        ...                         warmup_epochs=10)
        >>> [round(float(schedule(s)), 4) for s in (0, 50, 100, 550, 1000)]
        [0.0, 0.5, 1.0, 0.5, 0.0]
    """

    def __init__(self, learning_rate, steps_per_epoch, epochs, warmup_epochs):
        if steps_per_epoch < 1 or epochs < 1 or not 0 <= warmup_epochs < epochs:
            raise ValueError(
                "steps_per_epoch and epochs must be >= 1 and warmup_epochs in "
                f"[0, epochs). Received: steps_per_epoch={steps_per_epoch}, "
                f"epochs={epochs}, warmup_epochs={warmup_epochs}"
            )
        self.learning_rate = learning_rate
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.warmup_epochs = warmup_epochs

    def __call__(self, step):
        epoch = ops.cast(step, "float32") / self.steps_per_epoch
        warmup = self.learning_rate * epoch / max(self.warmup_epochs, 1e-12)
        progress = (epoch - self.warmup_epochs) / (
            self.epochs - self.warmup_epochs
        )
        cosine = self.learning_rate * 0.5 * (1.0 + ops.cos(math.pi * progress))
        return ops.where(epoch < self.warmup_epochs, warmup, cosine)

    def get_config(self):
        return {
            "learning_rate": self.learning_rate,
            "steps_per_epoch": self.steps_per_epoch,
            "epochs": self.epochs,
            "warmup_epochs": self.warmup_epochs,
        }


@keras.saving.register_keras_serializable(package="moco_keras")
class CosineMomentum:
    """MoCo v3's `--moco-m-cos`: the key momentum rises from `momentum` to 1.

    `main_moco.py`'s `adjust_moco_momentum`, which its loop evaluates every
    step and hands to the model's `forward`: at the fractional epoch
    `e = step / steps_per_epoch`,
    `m = 1 - 0.5 * (1 + cos(pi * e / epochs)) * (1 - momentum)`.
    `MoCoV3(momentum=CosineMomentum(...))` evaluates it at its own count
    of training steps.

    Args:
        momentum: float in [0, 1], m at step 0 (0.99).
        steps_per_epoch: int, optimizer steps per epoch.
        epochs: the run's epochs; m reaches 1 at their end.

    Example:

        >>> schedule = CosineMomentum(0.99, steps_per_epoch=10, epochs=100)
        >>> [round(float(schedule(s)), 4) for s in (0, 500, 1000)]
        [0.99, 0.995, 1.0]
    """

    def __init__(self, momentum, steps_per_epoch, epochs):
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(
                "`momentum` (m at step 0) must be in [0, 1] (0.99 in MoCo "
                f"v3). Received: momentum={momentum!r}"
            )
        for name, value in (
            ("steps_per_epoch", steps_per_epoch),
            ("epochs", epochs),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"The cosine momentum schedule needs `{name}`, a positive "
                    f"int. Received: {name}={value!r}"
                )
        self.momentum = momentum
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs

    def __call__(self, step):
        epoch = ops.cast(step, "float32") / self.steps_per_epoch
        return 1.0 - 0.5 * (1.0 + ops.cos(math.pi * epoch / self.epochs)) * (
            1.0 - self.momentum
        )

    def __eq__(self, other):
        return type(other) is type(self) and other.get_config() == (
            self.get_config()
        )

    def __repr__(self):
        return f"CosineMomentum({self.get_config()})"

    def get_config(self):
        return {
            "momentum": self.momentum,
            "steps_per_epoch": self.steps_per_epoch,
            "epochs": self.epochs,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


# --- The optimizer of a run's config ----------------------------------------


def learning_rate(config):
    """`optimizer.lr`, scaled linearly from `lr_batch_size` to the batch if
    set."""
    optimizer = config["optimizer"]
    if optimizer["lr_batch_size"]:
        batch_size = config["data"]["batch_size"]
        return optimizer["lr"] * batch_size / optimizer["lr_batch_size"]
    return optimizer["lr"]


# `optimizer.name` of a config: MoCo v1/v2's and linear classification's
# SGD with a per-epoch schedule, MoCo v3's LARS (ResNet) and AdamW (ViT)
# with warm-up and a per-step cosine.
OPTIMIZERS = ("sgd", "lars", "adamw")


def from_config(config, milestones, steps_per_epoch):
    """The config's optimizer (`optimizer.name`, SGD where it has none):
    torch's SGD with the lr, per-epoch schedule and weight decay of v1/v2
    and the linear protocol; or MoCo v3's LARS or AdamW with
    `WarmupCosine` over `schedule.warmup_epochs`, as
    `main_moco.py` builds them."""
    schedule, settings = config["schedule"], config["optimizer"]
    name = settings.get("name", "sgd")
    if name != "sgd":
        learning_rate_ = WarmupCosine(
            learning_rate(config),
            steps_per_epoch,
            schedule["epochs"],
            schedule["warmup_epochs"],
        )
        if name == "lars":
            return LARS(
                learning_rate_,
                momentum=settings["momentum"],
                weight_decay=settings["weight_decay"],
            )
        # torch.optim.AdamW with its defaults, its decay on every parameter
        # as the official code gives it.
        return AdamW(learning_rate_, weight_decay=settings["weight_decay"])
    return SGD(
        EpochSchedule(
            learning_rate(config),
            steps_per_epoch,
            schedule["epochs"],
            cosine=schedule["cosine"],
            milestones=() if schedule["cosine"] else milestones,
        ),
        momentum=config["optimizer"]["momentum"],
        weight_decay=config["optimizer"]["weight_decay"],
    )
