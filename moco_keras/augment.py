"""MoCo's two-crop augmentation: presets and the crop half, tf.data.

The official code augments PIL images with torchvision transforms
(`main_moco.py`):

- v1 (arXiv 1911.05722): RandomResizedCrop(224, scale=(0.2, 1)),
  RandomGrayscale(p=0.2), ColorJitter(0.4, 0.4, 0.4, 0.4),
  RandomHorizontalFlip, Normalize(ImageNet).
- v2 (arXiv 2003.04297): RandomResizedCrop(224, scale=(0.2, 1)),
  RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
  RandomGrayscale(p=0.2), RandomApply([GaussianBlur([0.1, 2.0])], p=0.5),
  RandomHorizontalFlip, Normalize(ImageNet).
- v3 (arXiv 2104.02057, BYOL's pair): RandomResizedCrop(224, scale=(0.08,
  1)), RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
  RandomGrayscale(p=0.2), GaussianBlur with p 1.0 (first view) or 0.1
  (second), Solarize with p 0 or 0.2, RandomHorizontalFlip, Normalize.

A view is made in two halves. The crop half is here, per image in
tf.data (images differ in size): decode, RandomResizedCrop, resize,
horizontal flip, rounded to uint8 as the official code's PIL images are.
The colour half (jitter, grayscale, blur, normalization) is
`moco_keras.color`: in tf.data one view at a time (`two_crops`), or
batched in the model on an accelerator (`color.ColorAugmentation`).
Keras' own preprocessing layers do not have these semantics (one crop
offset and one blur sigma per batch, a fixed jitter order, no
RandomResizedCrop). Every image draws its
own parameters from stateless seeds, so a seed fixes every draw.
"""

import math

import tensorflow as tf

from moco_keras import color
from moco_keras import views

# The views' presets live with the TensorFlow-free crop half, so that a
# host without TensorFlow has them too; here for the tf.data pipelines.
from moco_keras.views import AUGMENTATIONS  # noqa: F401
from moco_keras.views import get_augmentation  # noqa: F401


def _uniform(seed, low, high, shape=()):
    return tf.random.stateless_uniform(
        shape, seed=seed, minval=low, maxval=high, dtype=tf.float32
    )


def _coin(seed, p):
    return _uniform(seed, 0.0, 1.0) < p


def random_resized_crop_window(image_shape, seed, scale, ratio, count=None):
    """torchvision's RandomResizedCrop.get_params, vectorized over 10 tries.

    Area fraction ~ U(scale), log aspect ratio ~ U(log ratio); the first of
    10 tries that fits is taken, else a center crop clamped to `ratio`.
    `count` windows are drawn at once, each on its own draws: one set of
    ops for a pair's two views (a view's small ops cost as much as its
    plain resize in tf.data).

    Returns:
        int32 `[top, left, height, width]`, or `count x 4` with a `count`.
    """
    lead = [] if count is None else [count]
    height = tf.cast(image_shape[0], tf.float32)
    width = tf.cast(image_shape[1], tf.float32)
    area_seed, ratio_seed, top_seed, left_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4)
    )
    target_area = (
        height * width * _uniform(area_seed, scale[0], scale[1], lead + [10])
    )
    log_ratio = _uniform(
        ratio_seed, math.log(ratio[0]), math.log(ratio[1]), lead + [10]
    )
    aspect = tf.exp(log_ratio)
    w = tf.round(tf.sqrt(target_area * aspect))
    h = tf.round(tf.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32), axis=-1)
    # Fallback: center crop with the aspect ratio clamped into `ratio`.
    in_ratio = width / height
    fallback_w = tf.where(
        in_ratio < ratio[0],
        width,
        tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width),
    )
    fallback_h = tf.where(
        in_ratio < ratio[0],
        tf.round(width / ratio[0]),
        height,
    )
    any_fit = tf.reduce_any(fits, axis=-1)
    h = tf.where(any_fit, tf.gather(h, first, batch_dims=len(lead)), fallback_h)
    w = tf.where(any_fit, tf.gather(w, first, batch_dims=len(lead)), fallback_w)
    # torch.randint(0, H - h + 1): uniform over the valid offsets.
    top = tf.floor(_uniform(top_seed, 0.0, 1.0, lead) * (height - h + 1))
    left = tf.floor(_uniform(left_seed, 0.0, 1.0, lead) * (width - w + 1))
    top = tf.where(any_fit, top, tf.floor((height - h) / 2))
    left = tf.where(any_fit, left, tf.floor((width - w) / 2))
    return tf.cast(tf.stack([top, left, h, w], axis=-1), tf.int32)


def _resize(crop, size, antialias=True):
    """Bilinear resize to `size x size`, float [0, 255] in and out.

    Antialiased where the crop shrinks, as PIL's bilinear resize behind
    torchvision's RandomResizedCrop on the official code's PIL images.
    Enlarging, antialiasing changes nothing (TF's two paths agree to 5e-5
    of 255) but costs 5x the time, so it is skipped. `antialias=False`
    skips it everywhere: the cheap resize, which aliases where it shrinks.
    """
    if not antialias:
        return tf.image.resize(crop, [size, size])
    shape = tf.shape(crop)
    shrinks = (shape[0] > size) | (shape[1] > size)
    return tf.cond(
        shrinks,
        lambda: tf.image.resize(crop, [size, size], antialias=True),
        lambda: tf.image.resize(crop, [size, size]),
    )


def _rgb(image):
    if image.shape[-1] == 1:
        return tf.image.grayscale_to_rgb(image)
    return image


def _view(image, window, flip, config):
    """The uint8 view of an RGB image: its crop `window` resized, flipped
    where `flip`."""
    crop = tf.slice(image, [window[0], window[1], 0], [window[2], window[3], 3])
    # Cast the crop, not the whole image: a third less work per view.
    resized = _resize(
        tf.cast(crop, tf.float32), config["size"], config.get("antialias", True)
    )
    # Rounded as PIL's uint8 images are, with no float passes in between:
    # they cost as much as the plain resize itself.
    view = tf.saturate_cast(tf.round(resized), tf.uint8)
    if config["flip"]:
        # On uint8, a quarter of the bytes of a float view.
        view = tf.cond(
            flip, lambda: tf.image.flip_left_right(view), lambda: view
        )
    return tf.ensure_shape(view, [config["size"], config["size"], 3])


def crop_view(image, seed, config):
    """The CPU half of a view when the colour ops run in the model.

    Random-resized crop and horizontal flip, rounded to uint8 (as the
    official code's PIL images are after their resize). The rest of the
    view is `color.augment_crops` (or `color.ColorAugmentation`).

    Returns:
        uint8 `size x size x 3`.
    """
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 2)
    )
    image = _rgb(image)
    window = random_resized_crop_window(
        tf.shape(image), crop_seed, config["scale"], config["ratio"]
    )
    return _view(image, window, _coin(flip_seed, 0.5), config)


def two_crops(image_or_contents, seed, config, encoded, color_in_model=False):
    """Two independent views `(view_q, view_k)` of one image.

    Each view: a crop and flip as `crop_view`'s (uint8; the two windows are
    drawn in one call), then unless `color_in_model` the colour half,
    `color.augment_crops`, with parameters drawn from the view's own
    stateless seed; with `color_in_model` the crops alone, for a model that
    holds a `color.ColorAugmentation`.

    Args:
        image_or_contents: encoded image bytes (`encoded=True`) or a decoded
            uint8 `H x W x C` image.
        seed: int32 shape `[2]` stateless seed for this image.
        config: an `AUGMENTATIONS` dict, or a pair of them (MoCo v3's
            views: the first view's, the second's).
        encoded: whether the first argument is encoded bytes.
        color_in_model: stop after crop and flip.

    Returns:
        Two normalized float32 `size x size x 3` views, or two uint8 crops.
    """
    crop_seed, flip_seed, *color_seeds = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4)
    )
    image = image_or_contents
    if encoded:
        # One full decode serves both crops: on ImageNet-sized JPEGs it costs
        # less than two `decode_and_crop_jpeg` calls, the windowed decode
        # saving little.
        # Any format TF reads, whatever the file name says; grayscale and
        # CMYK JPEGs come out as RGB.
        image = tf.io.decode_image(
            image_or_contents, channels=3, expand_animations=False
        )
    image = _rgb(image)
    configs = views.view_pair(config)
    windows = random_resized_crop_window(
        tf.shape(image),
        crop_seed,
        configs[0]["scale"],
        configs[0]["ratio"],
        count=2,
    )
    flips = _uniform(flip_seed, 0.0, 1.0, [2]) < 0.5
    crops = []
    for index, color_seed in enumerate(color_seeds):
        config = configs[index]
        crop = _view(image, windows[index], flips[index], config)
        if not color_in_model:
            parameters = color.sample_parameters(
                config, color.stateless_uniform(color_seed), color.TF_OPS
            )
            # A batch of one: the colour half skips what this view does not
            # take (`color.augment`).
            crop = color.augment_crops(
                crop[None],
                {name: value[None] for name, value in parameters.items()},
                config,
                color.TF_OPS,
            )[0]
        crops.append(crop)
    return tuple(crops)
