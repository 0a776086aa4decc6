"""MoCo's colour augmentation, batched in the model.

After the crop (`moco_keras.views`: RandomResizedCrop and flip, uint8), a
view takes the rest of the torchvision v1/v2/v3 transforms: ColorJitter
(random op order, applied with a probability), RandomGrayscale,
GaussianBlur, Solarize and ImageNet normalization. Every image draws its
own parameters. The functions below take a batch (N x H x W x 3) in
`keras.ops`; `ColorAugmentation` runs them inside the model on the
accelerator, with draws from the layer's seed generator, saved in
checkpoints.

Horizontal flip stays in the crop: it commutes with every op here (the blur
kernel is symmetric and its padding mirrors).

Speed: torchvision applies the four jitter ops in a random order per image.
Batched, a naive version computes every op at every position and picks with
`where` (16 ops, four of them the costly hue rotation). Here brightness,
contrast and saturation are one blend `f * x + (1 - f) * t` (t = 0, the
gray mean, the gray image), the hue rotation runs once, and each image's
blends before and after its hue position run in two passes of three.
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
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)

# The probabilities of a colour config: all 0 is a view of crop and flip only.
PROBABILITIES = ("jitter_p", "grayscale_p", "blur_p", "solarize_p")

# The keys of a `views.AUGMENTATIONS` dict that the colour half reads.
CONFIG_KEYS = (
    "jitter",
    "jitter_p",
    "grayscale_p",
    "grayscale_first",
    "blur_p",
    "blur_sigma",
    "solarize_p",
    "mean",
    "std",
)


def validate(config):
    """Raises ValueError if a colour config is out of torchvision's ranges."""
    for name in PROBABILITIES:
        if not 0.0 <= config[name] <= 1.0:
            raise ValueError(
                f"`{name}` is a probability and must be in [0, 1]. "
                f"Received: {name}={config[name]!r}"
            )
    jitter = config["jitter"]
    if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
        raise ValueError(
            "`jitter` must be 4 non-negative strengths (brightness, "
            "contrast, saturation, hue) with hue <= 0.5, as torchvision "
            f"requires. Received: jitter={jitter!r}"
        )
    low, high = config["blur_sigma"]
    if not 0.0 < low <= high:
        raise ValueError(
            "`blur_sigma` must be a (low, high) range with "
            f"0 < low <= high. Received: blur_sigma={config['blur_sigma']!r}"
        )


def sample_parameters(config, uniform):
    """One image's (or a batch's) draws, torchvision's distributions.

    Brightness, contrast and saturation factors ~ U(max(0, 1 - x), 1 + x),
    the hue delta ~ U(-x, x), a random order of the four jitter ops, the
    coins of jitter, grayscale and blur, and the blur's sigma ~ U(range);
    with `solarize_p` > 0 (MoCo v3's second view) a coin of solarization,
    drawn last so that the other draws stay those of v1/v2.

    Args:
        config: a dict with `CONFIG_KEYS`.
        uniform: `uniform(shape)` -> U(0, 1) draws of `batch_shape + shape`
            (`batch_shape` is `()` for one image).

    Returns:
        A dict: `factors` (... x 4: b, c, s, h), `order` (int32 ... x 4, the
        op at each position), booleans `jitter`, `grayscale`, `blur`, and
        `sigma`.
    """
    b, c, s, h = config["jitter"]
    low = np.array([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
    high = np.array([1 + b, 1 + c, 1 + s, h])
    width = ops.convert_to_tensor((high - low).astype("float32"))
    factors = uniform((4,)) * width + ops.convert_to_tensor(
        low.astype("float32")
    )
    order = ops.cast(ops.argsort(uniform((4,)), axis=-1), "int32")
    coins = uniform((3,))
    sigma_low, sigma_high = config["blur_sigma"]
    sigma = uniform(()) * (sigma_high - sigma_low) + sigma_low
    parameters = {
        "factors": factors,
        "order": order,
        "jitter": coins[..., 0] < config["jitter_p"],
        "grayscale": coins[..., 1] < config["grayscale_p"],
        "blur": coins[..., 2] < config["blur_p"],
        "sigma": sigma,
    }
    if config["solarize_p"] > 0:
        parameters["solarize"] = uniform(()) < config["solarize_p"]
    return parameters


def _column(values):
    """N -> N x 1 x 1 x 1, to scale a batch of images per image."""
    return ops.reshape(values, (-1, 1, 1, 1))


def grayscale(images, keepdims=False):
    """N x H x W x 3 -> luma, 3 equal channels (1 with `keepdims`)."""
    images = ops.convert_to_tensor(images, "float32")
    # A matmul, not a sum over the channels: 2.5x faster in TensorFlow.
    luma = ops.convert_to_tensor(np.array(LUMA, "float32")[:, None])
    gray = ops.matmul(images, luma)
    return gray if keepdims else ops.broadcast_to(gray, ops.shape(images))


def _target(images, op):
    """The blend target of brightness (0), contrast (the gray image's mean)
    or saturation (the gray image), for a static `op`."""
    if op == BRIGHTNESS:
        return 0.0
    if op == CONTRAST:
        # The mean of the grayscale image, from the three channel means.
        means = ops.mean(images, axis=(1, 2), keepdims=True)  # N x 1 x 1 x 3
        return grayscale(means, keepdims=True)  # N x 1 x 1 x 1
    return grayscale(images, keepdims=True)  # N x H x W x 1


def _blend(images, factor, target):
    """`factor * x + (1 - factor) * target`, clipped; factor N x 1 x 1 x 1."""
    return ops.clip(factor * images + (1.0 - factor) * target, 0.0, 1.0)


def _chosen_blend(images, op, factor, active):
    """Brightness, contrast or saturation, the op picked per image by `op`
    (N), as one blend; images with `active` False (or whose op is the hue)
    pass through unchanged."""
    op = _column(op)
    target = ops.where(
        op == CONTRAST,
        _target(images, CONTRAST),
        ops.where(op == SATURATION, _target(images, SATURATION), 0.0),
    )  # N x H x W x 1
    factor = ops.where(_column(active) & (op != HUE), _column(factor), 1.0)
    return _blend(images, factor, target)


def adjust_hue(images, delta):
    """Rotates the hue of each image by `delta` (N, a fraction of a turn)."""
    hsv = ops.image.rgb_to_hsv(images, data_format="channels_last")
    hue = ops.mod(hsv[..., :1] + ops.reshape(delta, (-1, 1, 1, 1)), 1.0)
    hsv = ops.concatenate([hue, hsv[..., 1:]], axis=-1)
    rgb = ops.image.hsv_to_rgb(hsv, data_format="channels_last")
    return ops.clip(rgb, 0.0, 1.0)


def color_jitter(images, factors, order):
    """torchvision's ColorJitter with per-image factors and op order.

    Brightness scales, contrast blends with the mean of the grayscale
    image, saturation blends with the grayscale image, hue rotates in HSV;
    each result is clipped to [0, 1].

    Args:
        images: float N x H x W x 3 in [0, 1].
        factors: N x 4: brightness, contrast and saturation factors and the
            hue delta.
        order: int N x 4, a permutation of (0, 1, 2, 3) per image: which op
            (brightness, contrast, saturation, hue) runs at each position.
    """
    images = ops.convert_to_tensor(images, "float32")
    factors = ops.convert_to_tensor(factors, "float32")
    order = ops.cast(order, "int32")
    # Where each image's hue rotation sits, blends before it, then
    # the hue of all images at once, then the blends after it.
    hue_at = ops.argmax(ops.cast(order == HUE, "int32"), axis=-1)  # N
    for position in range(3):
        op = order[:, position]
        factor = ops.take_along_axis(factors, op[:, None], axis=1)[:, 0]
        images = _chosen_blend(images, op, factor, position < hue_at)
    images = adjust_hue(images, factors[:, HUE])
    for position in range(1, 4):
        op = order[:, position]
        factor = ops.take_along_axis(factors, op[:, None], axis=1)[:, 0]
        images = _chosen_blend(images, op, factor, position > hue_at)
    return images


def _symmetric_indices(size, radius):
    # numpy's "symmetric" padding: the edge pixel repeats.
    index = np.arange(-radius, size + radius)
    index = np.where(index < 0, -index - 1, index)
    return np.where(index >= size, 2 * size - 1 - index, index)


def gaussian_blur(images, sigma):
    """Separable Gaussian blur, per-image sigma, mirrored edges.

    The batch folds into the channels (N x H x W x 3 -> 1 x H x W x 3N), so
    one depthwise convolution per axis blurs every image with its own
    kernel.

    Args:
        images: float N x H x W x 3, H and W known.
        sigma: N standard deviations in pixels.
    """
    images = ops.convert_to_tensor(images, "float32")
    height, width, channels = images.shape[1:]
    if height is None or width is None:
        raise ValueError(
            "gaussian_blur needs a static image size; received images of "
            f"shape {images.shape}."
        )
    radius = BLUR_KERNEL_SIZE // 2
    taps = ops.convert_to_tensor(
        np.arange(-radius, radius + 1, dtype="float32")
    )  # T
    sigma = ops.reshape(ops.cast(sigma, "float32"), (-1, 1))  # N x 1
    kernel = ops.exp(-0.5 * ops.square(taps[None, :] / sigma))
    kernel = kernel / ops.sum(kernel, axis=1, keepdims=True)  # N x T
    # Channel n * 3 + c of the folded image is channel c of image n.
    kernel = ops.repeat(ops.transpose(kernel), channels, axis=1)  # T x 3N
    folded = ops.reshape(
        ops.transpose(images, (1, 2, 0, 3)), (1, height, width, -1)
    )  # 1 x H x W x 3N
    for axis, size in ((1, height), (2, width)):
        padded = ops.take(folded, _symmetric_indices(size, radius), axis=axis)
        taps_shape = (
            (BLUR_KERNEL_SIZE, 1) if axis == 1 else (1, BLUR_KERNEL_SIZE)
        )
        folded = ops.depthwise_conv(
            padded,
            ops.reshape(kernel, (*taps_shape, -1, 1)),
            padding="valid",
            data_format="channels_last",
        )
    images = ops.reshape(folded, (height, width, -1, channels))
    return ops.transpose(images, (2, 0, 1, 3))


def solarize(images):
    """PIL's `ImageOps.solarize` (threshold 128) on images in [0, 1]: every
    value of 128/255 or more inverted; between the uint8 levels 127 and 128
    the cut at 0.5 gives the same result."""
    return ops.where(images >= 0.5, 1.0 - images, images)


def augment(images, parameters, config):
    """Applies drawn `parameters` to float images in [0, 1]: the whole
    colour half but the normalization.

    Every op runs on every image and `where` keeps it where the image's
    coin says so (static shapes, as an accelerator wants).
    """

    images = ops.convert_to_tensor(images, "float32")

    def maybe(name, transform, x):
        """`transform` where an image's coin says so."""
        if config[f"{name}_p"] <= 0:
            return x
        return ops.where(_column(parameters[name]), transform(x), x)

    def gray(x):
        return maybe("grayscale", grayscale, x)

    def jitter(x):
        return maybe(
            "jitter",
            lambda y: color_jitter(
                y, parameters["factors"], parameters["order"]
            ),
            x,
        )

    images = (
        jitter(gray(images))
        if config["grayscale_first"]
        else gray(jitter(images))
    )
    images = maybe(
        "blur", lambda y: gaussian_blur(y, parameters["sigma"]), images
    )
    # MoCo v3's second view solarizes after the blur (`main_moco.py`).
    return maybe("solarize", solarize, images)


def normalize(images, mean, std):
    """uint8 (or float) [0, 255] -> `(x / 255 - mean) / std`, float32."""
    images = ops.cast(images, "float32") / 255.0
    mean = ops.convert_to_tensor(np.array(mean, "float32"))
    std = ops.convert_to_tensor(np.array(std, "float32"))
    return (images - mean) / std


@keras.saving.register_keras_serializable(package="moco_keras")
class ColorAugmentation(keras.layers.Layer):
    """MoCo's colour augmentation and normalization over a batch.

    The colour half of `moco_keras.color` inside the model, after the
    pipeline's crops (`views.two_view_batches`): training draws per-image
    parameters
    (`sample_parameters`) and applies them (`augment`), then normalizes;
    inference only normalizes.

    Inputs are `N x H x W x 3` images in [0, 255] (uint8 or float).

    Args:
        jitter: (brightness, contrast, saturation, hue) strengths.
        jitter_p: probability of the jitter.
        grayscale_p: probability of grayscale.
        grayscale_first: grayscale before the jitter (MoCo v1).
        blur_p: probability of the blur.
        blur_sigma: (low, high) range of the blur's sigma.
        solarize_p: probability of solarization, after the blur (MoCo v3's
            second view: 0.2).
        mean: per-channel mean of the normalization of [0, 1] images.
        std: per-channel standard deviation of that normalization.
        seed: int, seeds the draws.

    Example:

    >>> import numpy as np
    >>> from moco_keras import views
    >>> layer = ColorAugmentation.from_augmentation(
    ...     views.get_augmentation("mocov2"), seed=1)
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
        solarize_p=0.0,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.jitter = tuple(float(x) for x in jitter)
        self.jitter_p = float(jitter_p)
        self.grayscale_p = float(grayscale_p)
        self.grayscale_first = bool(grayscale_first)
        self.blur_p = float(blur_p)
        self.blur_sigma = tuple(float(x) for x in blur_sigma)
        self.solarize_p = float(solarize_p)
        self.mean = tuple(float(x) for x in mean)
        self.std = tuple(float(x) for x in std)
        validate(self.config)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    @property
    def config(self):
        """The colour config, as in a `views.AUGMENTATIONS` dict."""
        return {key: getattr(self, key) for key in CONFIG_KEYS}

    @classmethod
    def from_augmentation(cls, augmentation, **kwargs):
        """The layer for a `views.AUGMENTATIONS` dict (crop keys ignored)."""
        return cls(**{key: augmentation[key] for key in CONFIG_KEYS}, **kwargs)

    def sample_parameters(self, batch_size):
        """Per-image draws, a dict of N-vectors (`factors`, `order`: N x 4).

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
        def uniform(shape):
            return keras.random.uniform(
                (batch_size, *shape), seed=self.seed_generator
            )

        return sample_parameters(self.config, uniform)

    def augment(self, images, parameters):
        """Applies drawn `parameters` to float images in [0, 1]."""
        return augment(images, parameters, self.config)

    def call(self, inputs, training=False):
        images = ops.cast(inputs, "float32")
        if training:
            parameters = self.sample_parameters(ops.shape(images)[0])
            images = self.augment(images / 255.0, parameters) * 255.0
        images = normalize(images, self.mean, self.std)
        return ops.cast(images, self.compute_dtype)

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
        config.update({**self.config, "seed": self.seed})
        return config
