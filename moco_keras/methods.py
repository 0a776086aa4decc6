"""The methods a pretraining config names, one object each.

A pretraining config says which method it trains (`config["method"]`):
`"mocov1"`, `"mocov2"` (one model, `moco.MoCo`, as the official
facebookresearch/moco `main_moco.py` runs both; v2 is v1 with
`--mlp --aug-plus --cos` and T 0.2) or `"mocov3"` (`mocov3.MoCoV3`, the
official moco-v3 `main_moco.py`). `get(config)` returns its `Method`, which
owns everything in a run that differs between the methods: the config's
checks, the views' preset, the encoder, the model with its in-model colour
layers, the head the kNN monitor reads, the queue the loss watch
compares with, and the linear protocol that evaluates it. Shared code
(`pretraining`, `evaluation`, `linear_classification`) asks the method and
never branches on it. The models themselves take no config: they are
the library's layer (`MoCo(encoder, **config["model"])`), usable alone.

Example:

    >>> from moco_keras import presets
    >>> method = get(presets.PRETRAINING["quickstart_mocov3"])
    >>> method.title, method.views(presets.PRETRAINING["quickstart_mocov3"])
    ('MoCo v3', 'mocov3')
    >>> get(presets.PRETRAINING["mocov2"]).title
    'MoCo v2'
"""

import re

from moco_keras import color
from moco_keras import encoders
from moco_keras import moco
from moco_keras import mocov3
from moco_keras import optimizers
from moco_keras import presets
from moco_keras import vits
from moco_keras.configs import ConfigError
from moco_keras.configs import check


class Method:
    """What one method owns in a pretraining run; shared by the methods.

    Args:
        name: the config's `method` value.
        title: "MoCo v1", "MoCo v2" or "MoCo v3", for titles and logs.
        model_keys: the keys of the config's `model` section: the
            arguments of the method's model (`presets.MOCOV2`, ...).

    Example:

    >>> method = METHODS["mocov3"]
    >>> method.linear_preset("vit_small"), method.linear_preset("resnet50")
    ('mocov3_vit', 'mocov3')
    """

    # The `kind` of `convert.Converted` that holds this method's model.
    CONVERTED_KIND = None

    def __init__(self, name, title, model_keys):
        self.name = name
        self.title = title
        self.model_keys = tuple(model_keys)

    def __repr__(self):
        return f"<method {self.name}: {self.title}>"

    def check(self, config):
        """The contradictions of the method's own values, before any data
        is read (`configs.ConfigError`): the `model` section holds this
        method's model arguments, then `check_method`'s."""
        model = config.get("model", {})
        check(
            set(model) == set(self.model_keys),
            f"method: {self.name!r} takes the model values "
            f"{', '.join(self.model_keys)}; this config's model section has "
            f"{', '.join(sorted(model))}. Start from a preset of the method "
            "(--preset) rather than changing another's method.",
        )
        self.check_method(config)

    def check_method(self, config):
        """The method's own contradictions (a subclass's)."""
        raise NotImplementedError

    def check_devices(self, config, devices):
        """The method's values against the run's device count."""

    def views(self, config):
        """The name of the views' preset (`views.AUGMENTATIONS`)."""
        raise NotImplementedError

    def build_encoder(self, config, replicas):
        """The query encoder: a ViT of `vits.VITS`, or the method's ResNet
        (`resnet_arguments`)."""
        settings = config["encoder"]
        size = config["data"]["image_size"]
        if settings["arch"] in vits.VITS:
            return vits.VITS[settings["arch"]](
                image_size=size, stop_grad_conv1=settings["stop_grad_conv1"]
            )
        return encoders.get_encoder(
            settings["arch"],
            width=settings["width"],
            input_shape=(size, size, 3),
            **self.resnet_arguments(config, replicas),
        )

    def resnet_arguments(self, config, replicas):
        """`encoders.get_encoder`'s BN arguments for this method."""
        raise NotImplementedError

    def build_model(self, config, encoder, pair, steps_per_epoch):
        """The method's model on `encoder`, uncompiled.

        Args:
            pair: the two views' `views.view_pair`, whose colour half
                runs in the model.
        """
        raise NotImplementedError

    def query_head(self, model):
        """The head after the query encoder whose features the kNN reads."""
        raise NotImplementedError

    def queue_size(self, config):
        """The queue's length (`training.LossWatch`), or None."""
        return None

    def linear_preset(self, arch):
        """The `presets.LINEAR_CLASSIFICATION` preset of the method's own
        linear protocol for an encoder `arch`."""
        raise NotImplementedError

    def check_model_arguments(self, check_arguments, *arguments):
        """`check_arguments(*arguments)`'s `ValueError` as a `ConfigError`
        naming the value (`model.temperature`), which the recipes print as
        the flag that sets it."""
        try:
            check_arguments(*arguments)
        except ValueError as error:
            argument = re.search(r"Received: (\w+)=", str(error))
            raise ConfigError(
                f"model.{argument[1] if argument else ''}: {error}"
            ) from None


class MoCoMethod(Method):
    """MoCo v1 and v2 (`moco.MoCo`): a queue of keys, shuffle BN through
    split BN (`encoder.bn_splits` groups over the global batch), the views
    of v1 or, with `augmentation.aug_plus`, v2."""

    CONVERTED_KIND = "moco"

    def check_method(self, config):
        model, batch = config["model"], config["data"]["batch_size"]
        self.check_model_arguments(
            moco.check_arguments,
            model["dim"],
            model["mlp"],
            model["queue_size"],
            model["momentum"],
            model["temperature"],
        )
        k = model["queue_size"]
        check(
            k % batch == 0,
            f"--moco_k={k} is not divisible by the global --batch_size="
            f"{batch}; the official code asserts it so that each step "
            "replaces whole batches of keys. Use e.g. "
            f"--moco_k={max(batch, k // batch * batch)}.",
        )
        splits = config["encoder"]["bn_splits"]
        check(
            splits >= 1 and batch % splits == 0,
            f"--bn_splits={splits} does not divide the global batch of "
            f"{batch}: split BN needs equal groups. Pick a divisor of {batch}.",
        )

    def check_devices(self, config, devices):
        splits = config["encoder"]["bn_splits"]
        check(
            splits % devices == 0,
            f"--bn_splits={splits} is the number of BN groups over the global "
            f"batch (the official code's GPU count); over {devices} devices "
            f"it must be a multiple of {devices} (each device takes "
            f"bn_splits / devices groups). Use --bn_splits={devices} for one "
            "group per device, as the official code on that many GPUs.",
        )

    def views(self, config):
        return "mocov2" if config["augmentation"]["aug_plus"] else "mocov1"

    def resnet_arguments(self, config, replicas):
        # Each tf.distribute replica normalizes its share of the groups
        # (JAX's data parallel runs the global batch as one program: its
        # groups, all bn_splits, line up with the device shards).
        return {"bn_splits": config["encoder"]["bn_splits"] // replicas}

    def build_model(self, config, encoder, pair, steps_per_epoch):
        seed = config["run"]["seed"]
        # One layer for both views: v1's and v2's views are alike.
        augmentation = color.ColorAugmentation.from_augmentation(
            pair[0], seed=seed
        )
        return moco.MoCo(
            encoder,
            **config["model"],
            augmentation=augmentation,
            seed=seed,
            health=config["run"]["health"],
        )

    def query_head(self, model):
        return model.head_q

    def queue_size(self, config):
        return config["model"]["queue_size"]

    def linear_preset(self, arch):
        # main_lincls.py of facebookresearch/moco: lr 30, 100 epochs.
        return "imagenet"


class MoCoV3Method(Method):
    """MoCo v3 (`mocov3.MoCoV3`): no queue, a projector and a predictor,
    BN over the global batch (SyncBN across replicas), BYOL's pair of
    views, the key momentum on a cosine to 1 with
    `schedule.momentum_cosine`."""

    CONVERTED_KIND = "mocov3"

    def check_method(self, config):
        model, encoder = config["model"], config["encoder"]
        self.check_model_arguments(
            mocov3.check_arguments,
            model["dim"],
            model["mlp_dim"],
            model["projector_layers"],
            model["momentum"],
            model["temperature"],
        )
        size = config["data"]["image_size"]
        if encoder["arch"] in vits.VITS:
            check(
                size % vits.PATCH_SIZE == 0,
                f"--arch={encoder['arch']} cuts {vits.PATCH_SIZE} px patches: "
                f"--image_size={size} must be a multiple of {vits.PATCH_SIZE}.",
            )
        else:
            check(
                "stop_grad_conv1" not in encoder,
                "--stop_grad_conv1 freezes a ViT's patch projection; "
                f"--arch={encoder['arch']} has none. Drop it, or pick a vit_* "
                "--arch (with a ViT preset: --preset=mocov3_vit_small).",
            )

    def views(self, config):
        return "mocov3"

    def resnet_arguments(self, config, replicas):
        # The official code's SyncBN over replicas, and torchvision's
        # zero_init_residual, which moco-v3 builds its ResNets with.
        return {"sync_bn": replicas > 1, "zero_init_residual": True}

    def build_model(self, config, encoder, pair, steps_per_epoch):
        # One layer per view, seeded apart: the views draw independently.
        seed = config["run"]["seed"]
        augmentation = [
            color.ColorAugmentation.from_augmentation(view, seed=seed + i)
            for i, view in enumerate(pair)
        ]
        momentum = config["model"]["momentum"]
        if config["schedule"]["momentum_cosine"]:
            momentum = optimizers.CosineMomentum(
                momentum, steps_per_epoch, config["schedule"]["epochs"]
            )
        return mocov3.MoCoV3(
            encoder,
            **{**config["model"], "momentum": momentum},
            augmentation=augmentation,
            health=config["run"]["health"],
        )

    def query_head(self, model):
        # The predictor follows the projector; the kNN reads the projector.
        return model.projector_q

    def linear_preset(self, arch):
        # moco-v3's main_lincls.py: lr 0.1 per 256 (its ViTs: 3), 90 epochs.
        return "mocov3_vit" if arch in vits.VITS else "mocov3"


METHODS = {
    "mocov1": MoCoMethod("mocov1", "MoCo v1", presets.MOCOV1),
    "mocov2": MoCoMethod("mocov2", "MoCo v2", presets.MOCOV2),
    "mocov3": MoCoV3Method("mocov3", "MoCo v3", presets.MOCOV3_RESNET),
}


def of_converted(kind):
    """The method of a converted checkpoint's `kind` (`convert.Converted`),
    or None (a classifier). v1 and v2 convert alike: the first is given."""
    for method in METHODS.values():
        if method.CONVERTED_KIND == kind:
            return method
    return None


def get(config):
    """The `Method` that `config["method"]` names (`ConfigError` if none)."""
    name = config.get("method")
    check(
        name in METHODS,
        f"method: {name!r} is not a method; a pretraining config names one "
        f"of {', '.join(METHODS)} (its preset does: --preset=mocov2).",
    )
    return METHODS[name]
