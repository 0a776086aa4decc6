"""The optimizer and learning-rate schedules of the official MoCo code.

`main_moco.py` trains with `torch.optim.SGD(lr, momentum=0.9,
weight_decay=1e-4)` and sets the learning rate once per epoch: a cosine
(`--cos`, MoCo v2) or x0.1 steps at `--schedule` epochs (MoCo v1). Keras' SGD
differs in two ways that change the trajectory: its `weight_decay` is
decoupled from the momentum, and its momentum buffer holds `lr * gradient`
rather than the gradient. `SGD` here is torch's update.
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
        direction = ops.cast(gradient, variable.dtype)
        if self.l2_weight_decay:
            direction = direction + self.l2_weight_decay * variable
        if self.momentum:
            buffer = self.momentums[self._get_variable_index(variable)]
            self.assign(buffer, buffer * self.momentum + direction)
            direction = buffer
        self.assign_sub(variable, learning_rate * direction)

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
