"""MoCo's colour augmentation as a Keras layer, batched, in `keras.ops`.

The tf.data pipeline (`moco_keras.augment`) can stop after the crop: it
decodes, crops, resizes and flips on the CPU and hands over uint8 views.
`ColorAugmentation` then runs the rest of the torchvision v1/v2 transforms
inside the model, on the accelerator, over the whole batch: ColorJitter
(random order, applied with a probability), RandomGrayscale, GaussianBlur
and ImageNet normalization. Each image draws its own parameters from the
same distributions as the per-image tf.data path, which it matches to
float rounding for the same parameters (tested).

Horizontal flip stays in tf.data: it commutes with every op here (the blur
kernel is symmetric and its padding mirrors), so where it happens does not
change the distribution.
"""

import keras
import numpy as np
from keras import ops

from moco_keras import distribute

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R 601-2 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale.
LUMA = (0.299, 0.587, 0.114)
# A kernel of 2 * ceil(3 * sigma) + 1 taps holds 99.7 % of a Gaussian's mass;
# sigma is at most 2.0 in MoCo v2, hence 13 taps.
BLUR_KERNEL_SIZE = 13

_CONFIG_KEYS = (
    "jitter",
    "jitter_p",
    "grayscale_p",
    "grayscale_first",
    "blur_p",
    "blur_sigma",
    "mean",
    "std",
)


def _column(values):
    """N -> N x 1 x 1 x 1, to scale a batch of images per image."""
    return ops.reshape(values, (-1, 1, 1, 1))


def grayscale(images):
    """N x H x W x 3 -> N x H x W x 3 with three equal luma channels."""
    images = ops.convert_to_tensor(images, "float32")
    gray = ops.sum(images * ops.array(LUMA, "float32"), axis=-1, keepdims=True)
    return ops.broadcast_to(gray, ops.shape(images))


def adjust_brightness(images, factor):
    return ops.clip(images * _column(factor), 0.0, 1.0)


def adjust_contrast(images, factor):
    # The mean of the grayscale image, from the three channel means.
    means = ops.mean(images, axis=(1, 2))  # N x 3
    mean = ops.sum(means * ops.array(LUMA, "float32"), axis=-1)  # N
    factor = _column(factor)
    return ops.clip(factor * images + (1.0 - factor) * _column(mean), 0.0, 1.0)


def adjust_saturation(images, factor):
    factor = _column(factor)
    return ops.clip(
        factor * images + (1.0 - factor) * grayscale(images), 0.0, 1.0
    )


def adjust_hue(images, delta):
    """Rotates the hue of each image by `delta` (a fraction of a turn)."""
    hsv = ops.image.rgb_to_hsv(images)
    hue = ops.mod(hsv[..., 0] + ops.reshape(delta, (-1, 1, 1)), 1.0)
    hsv = ops.stack([hue, hsv[..., 1], hsv[..., 2]], axis=-1)
    return ops.clip(ops.image.hsv_to_rgb(hsv), 0.0, 1.0)


_JITTER_OPS = (
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    adjust_hue,
)


def color_jitter(images, factors, order):
    """torchvision's ColorJitter with per-image factors and order.

    Args:
        images: float N x H x W x 3 in [0, 1].
        factors: N x 4: brightness, contrast and saturation factors and the
            hue delta.
        order: int N x 4, a permutation of (0, 1, 2, 3) per image: which op
            (brightness, contrast, saturation, hue) runs at each position.
    """
    images = ops.convert_to_tensor(images, "float32")
    factors = ops.convert_to_tensor(factors, "float32")
    order = ops.convert_to_tensor(order, "int32")
    for position in range(4):
        chosen = _column(order[:, position])
        for index, op in enumerate(_JITTER_OPS):
            images = ops.where(
                chosen == index, op(images, factors[:, index]), images
            )
    return images


def _symmetric_indices(size, radius):
    # numpy's "symmetric" padding: the edge pixel repeats.
    index = np.arange(-radius, size + radius)
    index = np.where(index < 0, -index - 1, index)
    return np.where(index >= size, 2 * size - 1 - index, index)


def gaussian_blur(images, sigma):
    """Separable Gaussian blur, per-image sigma, mirrored edges.

    Args:
        images: float N x H x W x 3, H and W known.
        sigma: N standard deviations in pixels.
    """
    images = ops.convert_to_tensor(images, "float32")
    sigma = ops.convert_to_tensor(sigma, "float32")
    height, width = images.shape[1], images.shape[2]
    if height is None or width is None:
        raise ValueError(
            "gaussian_blur needs a static image size; received images of "
            f"shape {images.shape}."
        )
    radius = BLUR_KERNEL_SIZE // 2
    taps = ops.arange(-radius, radius + 1, dtype="float32")  # T
    kernel = ops.exp(-0.5 * ops.square(taps[None, :] / sigma[:, None]))
    kernel = kernel / ops.sum(kernel, axis=1, keepdims=True)  # N x T
    for axis, size in ((1, height), (2, width)):
        padded = ops.take(images, _symmetric_indices(size, radius), axis=axis)
        blurred = 0.0
        for tap in range(BLUR_KERNEL_SIZE):
            if axis == 1:
                window = padded[:, tap : tap + size]
            else:
                window = padded[:, :, tap : tap + size]
            blurred = blurred + _column(kernel[:, tap]) * window
        images = blurred
    return images


@keras.saving.register_keras_serializable(package="moco_keras")
class ColorAugmentation(keras.layers.Layer):
    """MoCo's colour augmentation and normalization over a batch.

    Training: each image draws ColorJitter factors (brightness, contrast,
    saturation ~ U(max(0, 1 - x), 1 + x), hue ~ U(-x, x)) and a random op
    order, applied with probability `jitter_p`; grayscale with probability
    `grayscale_p` (before the jitter in v1, after it in v2); a Gaussian blur
    with sigma ~ U(`blur_sigma`) with probability `blur_p`; then
    `(x - mean) / std`. Inference: normalization only.

    Inputs are `N x H x W x 3` images in [0, 255] (uint8 or float), the
    crops that `data.two_view_dataset(..., color_in_model=True)` yields.

    Args:
        jitter: (brightness, contrast, saturation, hue) strengths.
        jitter_p: probability of the jitter.
        grayscale_p: probability of grayscale.
        grayscale_first: grayscale before the jitter (MoCo v1).
        blur_p: probability of the blur.
        blur_sigma: (low, high) range of the blur's sigma.
        mean, std: per-channel normalization of [0, 1] images.
        seed: int, seeds the draws.

    Example:

    >>> import numpy as np
    >>> layer = ColorAugmentation.from_augmentation(
    ...     {"jitter": (0.4, 0.4, 0.4, 0.1), "jitter_p": 0.8,
    ...      "grayscale_p": 0.2, "grayscale_first": False, "blur_p": 0.5,
    ...      "blur_sigma": (0.1, 2.0), "mean": IMAGENET_MEAN,
    ...      "std": IMAGENET_STD}, seed=1)
    >>> crops = np.random.randint(0, 256, (4, 32, 32, 3), dtype="uint8")
    >>> tuple(layer(crops, training=True).shape)
    (4, 32, 32, 3)
    """

    def __init__(
        self,
        jitter=(0.4, 0.4, 0.4, 0.1),
        jitter_p=0.8,
        grayscale_p=0.2,
        grayscale_first=False,
        blur_p=0.5,
        blur_sigma=(0.1, 2.0),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for name, p in (
            ("jitter_p", jitter_p),
            ("grayscale_p", grayscale_p),
            ("blur_p", blur_p),
        ):
            if not 0.0 <= p <= 1.0:
                raise ValueError(
                    f"`{name}` is a probability and must be in [0, 1]. "
                    f"Received: {name}={p!r}"
                )
        if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
            raise ValueError(
                "`jitter` must be 4 non-negative strengths (brightness, "
                "contrast, saturation, hue) with hue <= 0.5, as torchvision "
                f"requires. Received: jitter={jitter!r}"
            )
        if not 0.0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(
                "`blur_sigma` must be a (low, high) range with "
                f"0 < low <= high. Received: blur_sigma={blur_sigma!r}"
            )
        self.jitter = tuple(float(x) for x in jitter)
        self.jitter_p = float(jitter_p)
        self.grayscale_p = float(grayscale_p)
        self.grayscale_first = bool(grayscale_first)
        self.blur_p = float(blur_p)
        self.blur_sigma = tuple(float(x) for x in blur_sigma)
        self.mean = tuple(float(x) for x in mean)
        self.std = tuple(float(x) for x in std)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    @classmethod
    def from_augmentation(cls, augmentation, **kwargs):
        """The layer for an `augment.AUGMENTATIONS` dict (crop keys ignored)."""
        return cls(**{key: augmentation[key] for key in _CONFIG_KEYS}, **kwargs)

    def _uniform(self, batch_size, low, high, shape=()):
        return keras.random.uniform(
            (batch_size, *shape),
            minval=low,
            maxval=high,
            seed=self.seed_generator,
        )

    def sample_parameters(self, batch_size):
        """Per-image draws, a dict of N-vectors (`order`: N x 4).

        Under a `tf.distribute` strategy every replica holds the same seed
        state, so each draws the parameters of the whole global batch and
        keeps its own rows: every image of the global batch gets its own,
        the same as on one device. (JAX's data parallel runs the layer on
        the global batch already.)
        """
        context = distribute.replica_context()
        if context is None:
            return self._draw(batch_size)
        parameters = self._draw(batch_size * context.num_replicas_in_sync)
        start = context.replica_id_in_sync_group * batch_size
        return {
            name: value[start : start + batch_size]
            for name, value in parameters.items()
        }

    def _draw(self, batch_size):
        b, c, s, h = self.jitter
        factors = ops.stack(
            [
                self._uniform(batch_size, max(0.0, 1 - b), 1 + b),
                self._uniform(batch_size, max(0.0, 1 - c), 1 + c),
                self._uniform(batch_size, max(0.0, 1 - s), 1 + s),
                self._uniform(batch_size, -h, h),
            ],
            axis=1,
        )  # N x 4
        order = ops.argsort(self._uniform(batch_size, 0.0, 1.0, (4,)), axis=1)
        coins = self._uniform(batch_size, 0.0, 1.0, (3,))  # N x 3
        return {
            "factors": factors,
            "order": ops.cast(order, "int32"),
            "jitter": coins[:, 0] < self.jitter_p,
            "grayscale": coins[:, 1] < self.grayscale_p,
            "blur": coins[:, 2] < self.blur_p,
            "sigma": self._uniform(batch_size, *self.blur_sigma),
        }

    def augment(self, images, parameters):
        """Applies drawn `parameters` to float images in [0, 1]."""

        def maybe(flags, transformed, original):
            return ops.where(_column(flags), transformed, original)

        def maybe_gray(x):
            if self.grayscale_p <= 0:
                return x
            return maybe(parameters["grayscale"], grayscale(x), x)

        def maybe_jitter(x):
            if self.jitter_p <= 0:
                return x
            jittered = color_jitter(
                x, parameters["factors"], parameters["order"]
            )
            return maybe(parameters["jitter"], jittered, x)

        if self.grayscale_first:
            images = maybe_jitter(maybe_gray(images))
        else:
            images = maybe_gray(maybe_jitter(images))
        if self.blur_p > 0:
            blurred = gaussian_blur(images, parameters["sigma"])
            images = maybe(parameters["blur"], blurred, images)
        return images

    def call(self, inputs, training=False):
        images = ops.cast(inputs, "float32") / 255.0
        if training:
            parameters = self.sample_parameters(ops.shape(images)[0])
            images = self.augment(images, parameters)
        mean = ops.array(self.mean, "float32")
        std = ops.array(self.std, "float32")
        return ops.cast((images - mean) / std, self.compute_dtype)

    def save_own_variables(self, store):
        # Keras does not save SeedGenerator states: a resumed run continues
        # the draws instead of repeating them.
        store["seed_generator_state"] = self.seed_generator.state

    def load_own_variables(self, store):
        if "seed_generator_state" in list(store.keys()):
            self.seed_generator.state.assign(store["seed_generator_state"])

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {key: getattr(self, key) for key in _CONFIG_KEYS + ("seed",)}
        )
        return config
