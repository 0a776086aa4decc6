"""The `tf.data` pipelines from a source (`moco_keras.datasets`) to batches.

A pipeline first draws the order of a pass over all images
(`Source.order`) and reads each image when its turn comes.
`two_view_dataset` turns a source into the `(view_q, view_k)` batches that
`MoCo.fit` trains on, on every backend; `labelled_dataset` into
`(image, label)` batches for evaluation and linear classification.
"""

import tensorflow as tf

from moco_keras import augment
from moco_keras import color
from moco_keras.datasets import epoch_seed

# The official linear transform, written once (`moco_keras.views`).
from moco_keras.views import linear_augmentation  # noqa: F401


def two_view_dataset(
    source,
    augmentation,
    batch_size,
    seed=0,
    shuffle=True,
    drop_remainder=True,
    color_in_model=False,
    epoch=None,
    skip_batches=0,
    shard=None,
):
    """Batches of `(view_q, view_k)`: two augmentations of each image.

    Each pass reads the images in a uniform random order (`Source.order`)
    and every image draws its own crop, jitter, grayscale, blur and flip
    parameters from stateless seeds derived from `seed`, so the same seed
    gives the same batches; a new epoch draws a new order and new views.

    Two modes: with `epoch=None`, one dataset for the whole run, reshuffled
    and redrawn on each iteration (`model.fit(..., epochs=n)`); with an
    `epoch`, that one epoch alone, its order and draws a function of
    `(seed, epoch)`, from batch `skip_batches` on, which is what a run that
    resumes mid-epoch needs (`training.fit_resumable`).

    Args:
        source: a `Source` (or `TfdsSource`).
        augmentation: an `augment.AUGMENTATIONS` dict (see
            `augment.get_augmentation`).
        batch_size: the global batch size.
        seed: int, fixes the order and every augmentation draw.
        shuffle: False reads the images in their stored order.
        drop_remainder: drop the last partial batch (MoCo's queue and split
            BN want full batches).
        color_in_model: stop each view after crop and flip, as uint8, for a
            `MoCo(..., augmentation=color.ColorAugmentation(...))` that runs
            the colour ops, blur and normalization on the accelerator.
        epoch: build this one epoch only (see above).
        skip_batches: with `epoch`, start after this many batches; the
            skipped images are not read.
        shard: `(index, count)`: this worker's share of every batch, for
            `count` workers (or JAX processes) that each read their own
            images (`distribute.distribute_dataset`): rows `index * b` to
            `(index + 1) * b - 1` of every global batch, `b = batch_size //
            count`, so the shares in worker order are the global batch.
            `batch_size` and `skip_batches` stay global. None: all of them.

    Returns:
        A `tf.data.Dataset` of `(view_q, view_k)`, each
        `batch x size x size x 3` float32, normalized (uint8 crops with
        `color_in_model`).
    """
    per_run = epoch is None
    if skip_batches and per_run:
        raise ValueError("`skip_batches` needs an `epoch`.")
    keys = source.order(seed, epoch, shuffle=shuffle)
    if not per_run:
        seed = epoch_seed(seed, epoch)
    seeds = tf.data.Dataset.random(
        seed=seed, rerandomize_each_iteration=per_run
    )
    dataset = tf.data.Dataset.zip((keys, seeds.batch(2)))
    dataset = dataset.skip(skip_batches * batch_size)
    if shard is not None:
        index, count = shard
        if batch_size % count:
            raise ValueError(
                f"The global batch of {batch_size} does not split over "
                f"{count} workers. Use a multiple of {count}."
            )
        # The order is the same on every worker (same seed and epoch), and
        # nothing is read yet: each image is read and decoded by one worker.
        # Contiguous blocks: the workers' shares, in worker order, are the
        # global batch of one process, row for row (so are its BN groups).
        share = batch_size // count
        dataset = (
            dataset.batch(batch_size, drop_remainder=True)
            .map(
                lambda keys, pair_seeds: (
                    keys[index * share : (index + 1) * share],
                    pair_seeds[index * share : (index + 1) * share],
                )
            )
            .unbatch()
        )
        batch_size = share

    # Traced as written, not through AutoGraph: the views branch with
    # `tf.cond` and `switch_case` themselves, and AutoGraph's rewrite of
    # their code was most of the time a process's first pipeline took to
    # build.
    @tf.autograph.experimental.do_not_convert
    def views(key, pair_seed):
        return augment.two_crops(
            source.read(key)[0],
            pair_seed,
            augmentation,
            source.encoded,
            color_in_model=color_in_model,
        )

    dataset = dataset.map(
        views,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return _batched(dataset, source, batch_size, drop_remainder)


def _batched(dataset, source, batch_size, drop_remainder):
    if source.encoded:
        # Files that passed the header check but fail to decode.
        dataset = dataset.ignore_errors(log_warning=True)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    return dataset.prefetch(tf.data.AUTOTUNE)


def _decoded(element, encoded):
    if not encoded:
        image = element
        if image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        return image
    return tf.io.decode_image(element, channels=3, expand_animations=False)


def eval_view(image, size, mean, std, crop_fraction=0.875):
    """The official evaluation transform of a decoded uint8 image.

    Resize the short side to `round(size / crop_fraction)` (256 for 224),
    center crop `size x size`, normalize. `crop_fraction=1` resizes the
    short side to `size` (small images such as Fashion-MNIST).
    """
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    short = tf.round(size / crop_fraction)
    scale = short / tf.reduce_min(shape)
    new_shape = tf.cast(tf.round(shape * scale), tf.int32)
    new_shape = tf.maximum(new_shape, size)
    # Antialiased when shrinking, as PIL's resize in the official loader.
    resized = tf.image.resize(
        tf.cast(image, tf.float32), new_shape, antialias=True
    )
    top = (new_shape[0] - size) // 2
    left = (new_shape[1] - size) // 2
    crop = tf.slice(resized, [top, left, 0], [size, size, 3])
    crop = tf.clip_by_value(crop / 255.0, 0.0, 1.0)
    return (crop - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def labelled_dataset(
    source,
    batch_size,
    size,
    mean,
    std,
    train_augmentation=None,
    crop_fraction=0.875,
    seed=0,
    epoch=None,
    skip_batches=0,
):
    """Batches of `(image, label)` for linear classification and kNN.

    Without `train_augmentation` and `epoch`: `eval_view` of every image, in
    the source's order, the last batch kept. With `epoch`: one training
    epoch in a uniform random order (`Source.order`, the same order for
    the same `(seed, epoch)` as `two_view_dataset`'s), from batch
    `skip_batches` on, the last partial batch dropped; its views are
    `train_augmentation` (an `augment` dict, e.g. the official
    RandomResizedCrop(scale 0.08-1) + flip) drawn from `(seed, epoch)`, or
    `eval_view` without one.

    Returns:
        A `tf.data.Dataset` of float32 `N x size x size x 3`, int32 `N`.
    """

    def evaluate(key):
        element, label = source.read(key)
        image = _decoded(element, source.encoded)
        view = eval_view(image, size, mean, std, crop_fraction)
        return tf.ensure_shape(view, [size, size, 3]), label

    if train_augmentation is None and epoch is None:
        dataset = source.order(shuffle=False).map(
            evaluate, num_parallel_calls=tf.data.AUTOTUNE
        )
        return _batched(dataset, source, batch_size, drop_remainder=False)
    colored = [
        name
        for name in color.PROBABILITIES
        if train_augmentation and train_augmentation[name] > 0
    ]
    if colored:
        raise ValueError(
            "`train_augmentation` of a labelled dataset is crop and flip "
            f"only (the official linear protocol); it sets {colored} above "
            "0. Use `linear_augmentation`, or set them to 0."
        )
    epoch = epoch or 0
    keys = source.order(seed, epoch)
    if train_augmentation is None:
        dataset = keys.skip(skip_batches * batch_size).map(
            evaluate, num_parallel_calls=tf.data.AUTOTUNE
        )
    else:
        seeds = tf.data.Dataset.random(seed=epoch_seed(seed, epoch)).batch(2)
        dataset = tf.data.Dataset.zip((keys, seeds))
        dataset = dataset.skip(skip_batches * batch_size)

        def train_view(key, image_seed):
            element, label = source.read(key)
            image = _decoded(element, source.encoded)
            # RandomResizedCrop and flip; the official transform has no
            # colour ops.
            crop = augment.crop_view(image, image_seed, train_augmentation)
            view = color.normalize(crop, mean, std, color.TF_OPS)
            return view, label

        dataset = dataset.map(
            train_view,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    return _batched(dataset, source, batch_size, drop_remainder=True)
