"""ResNet encoders in the torchvision layout, with a pluggable normalization.

MoCo's published numbers come from torchvision's ResNet-50 ("v1.5": the
stride of a bottleneck block sits on its 3x3 convolution, no convolution
biases, BN epsilon 1e-5, symmetric zero padding). `keras.applications`
differs on all of these, and keras-hub's `ResNetBackbone`, which matches the
layout, builds `keras.layers.BatchNormalization` inside its blocks with no way
to swap in split BN. So the encoders are written here, with layer names that
are torchvision's state-dict keys with `_` for `.` (`layer3_5_conv2`,
`layer1_0_downsample_1`; the torch backend forbids dots in names) so that
official checkpoints map one to one.

Every builder returns a functional `keras.Model` from images (NHWC) to the
globally average-pooled features (rank 2: `N x width * 8 * expansion`).
Inside, the layers run in `data_format`: channels-first by default on the
torch backend, whose convolutions and batch norm are channels-first (its
channels-last Keras layers pay a layout change around each one), and
channels-last elsewhere. The input stays NHWC in both layouts (one
transpose at the entry), and the weights have the same shapes and names in
both, so checkpoints, converters and exports do not depend on the layout.
"""

import functools

import keras
from keras import layers
from keras import ops

from moco_keras.batch_norm import SplitBatchNormalization

# (block, expansion, blocks per stage), as torchvision's resnet{18,34,50}.
_ARCHS = {
    18: ("basic", 1, (2, 2, 2, 2)),
    34: ("basic", 1, (3, 4, 6, 3)),
    50: ("bottleneck", 4, (3, 4, 6, 3)),
}


def _conv_initializer():
    # torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu").
    return keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_out", distribution="untruncated_normal"
    )


DATA_FORMATS = ("channels_first", "channels_last")


@keras.saving.register_keras_serializable(package="moco_keras")
class ChannelsFirst(layers.Layer):
    """NHWC images to NCHW, contiguous in memory on the torch backend.

    A transpose alone gives PyTorch a channels-last strided view, and its
    convolutions then keep that memory format all through the network. On
    CPUs with AVX2 but not AVX-512, torch 2.13's oneDNN hangs in the
    backward pass of a channels-last strided 1x1 convolution with fewer
    than about 6 input channels (a plain PyTorch `Conv2d(2, 4, 1, 2)` on a
    channels-last `16 x 2 x 16 x 16` batch reproduces it; contiguous NCHW
    ran 3000 steps). Contiguous NCHW is also the layout the official
    PyTorch code trains in.
    """

    def call(self, images):
        x = ops.transpose(images, (0, 3, 1, 2))
        if keras.backend.backend() == "torch":
            x = x.contiguous()
        return x

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        return (batch, channels, height, width)


def default_data_format():
    """The layout the encoders run in by default on the current backend.

    Returns:
        `"channels_first"` on the torch backend (PyTorch's own layout: Keras'
        channels-last convolutions there permute around every call), else
        `"channels_last"` (TensorFlow's CPU convolutions are NHWC only, and
        XLA picks its own layout on JAX).
    """
    if keras.backend.backend() == "torch":
        return "channels_first"
    return "channels_last"


class _Layout:
    """The data format of one encoder, with its channel axis."""

    def __init__(self, data_format):
        self.data_format = data_format
        self.axis = 1 if data_format == "channels_first" else -1

    def channels(self, x):
        return x.shape[self.axis]

    def conv(self, x, filters, kernel_size, strides, name):
        """A bias-free convolution padded as torch pads: k // 2 each side."""
        pad = kernel_size // 2
        if strides > 1 and pad:
            # Keras "same" pads asymmetrically for strided convolutions,
            # which shifts the sampling grid by one pixel against torch's
            # weights.
            x = layers.ZeroPadding2D(
                pad, data_format=self.data_format, name=f"{name}_pad"
            )(x)
            padding = "valid"
        else:
            padding = "same"
        return layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            use_bias=False,
            data_format=self.data_format,
            kernel_initializer=_conv_initializer(),
            name=name,
        )(x)


def _basic_block(x, filters, strides, norm_layer, layout, name, last_norm):
    shortcut = x
    y = layout.conv(x, filters, 3, strides, f"{name}_conv1")
    y = norm_layer(name=f"{name}_bn1", axis=layout.axis)(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = layout.conv(y, filters, 3, 1, f"{name}_conv2")
    y = last_norm(name=f"{name}_bn2", axis=layout.axis)(y)
    if strides != 1 or layout.channels(x) != filters:
        shortcut = layout.conv(x, filters, 1, strides, f"{name}_downsample_0")
        shortcut = norm_layer(name=f"{name}_downsample_1", axis=layout.axis)(
            shortcut
        )
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=f"{name}_relu")(y)


def _bottleneck_block(x, filters, strides, norm_layer, layout, name, last_norm):
    shortcut = x
    y = layout.conv(x, filters, 1, 1, f"{name}_conv1")
    y = norm_layer(name=f"{name}_bn1", axis=layout.axis)(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    # ResNet v1.5: the stride is on the 3x3 convolution.
    y = layout.conv(y, filters, 3, strides, f"{name}_conv2")
    y = norm_layer(name=f"{name}_bn2", axis=layout.axis)(y)
    y = layers.ReLU(name=f"{name}_relu2")(y)
    y = layout.conv(y, filters * 4, 1, 1, f"{name}_conv3")
    y = last_norm(name=f"{name}_bn3", axis=layout.axis)(y)
    if strides != 1 or layout.channels(x) != filters * 4:
        shortcut = layout.conv(
            x, filters * 4, 1, strides, f"{name}_downsample_0"
        )
        shortcut = norm_layer(name=f"{name}_downsample_1", axis=layout.axis)(
            shortcut
        )
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=f"{name}_relu")(y)


def resnet(
    depth,
    width=64,
    cifar_stem=False,
    bn_splits=1,
    norm_layer=None,
    input_shape=(None, None, 3),
    data_format=None,
    name=None,
    sync_bn=False,
    zero_init_residual=False,
):
    """A torchvision-layout ResNet that returns pooled features.

    Args:
        depth: int, one of 18, 34, 50.
        width: int, channels of the first stage (64 in torchvision); the
            stages have `width`, `2 * width`, `4 * width`, `8 * width`
            channels, times 4 for the bottleneck output of ResNet-50.
        cifar_stem: bool. If True, the stem is a 3x3 stride-1 convolution
            with no max-pool (the official MoCo CIFAR demo's "common CIFAR
            ResNet recipe"); else torchvision's 7x7 stride-2 convolution and
            3x3 stride-2 max-pool.
        bn_splits: int, groups of the split batch normalization used in
            every normalization layer (1: ordinary batch normalization).
        norm_layer: optional callable `norm_layer(name=..., axis=...)`
            returning a normalization layer over channel axis `axis`, to
            replace split BN altogether. Mutually exclusive with
            `bn_splits > 1`.
        input_shape: shape of one image, channels last (whatever
            `data_format`).
        data_format: `"channels_first"` or `"channels_last"`, the layout
            of the layers inside; None for `default_data_format()`. The
            weights are the same in both.
        name: model name; defaults to `resnet{depth}`.
        sync_bn: bool, batch normalization over the global batch of all
            `tf.distribute` replicas (PyTorch's SyncBN, as MoCo v3 trains;
            TensorFlow only). One device, and JAX's data parallel, already
            normalize over the whole batch with `bn_splits=1`.
        zero_init_residual: bool, start the last BN of every residual
            block with a zero scale, so that each block starts as the
            identity (torchvision's `zero_init_residual`, which MoCo v3's
            ResNet-50 trains with). A `norm_layer` must then take
            `gamma_initializer`.

    Returns:
        A functional `keras.Model` mapping `N x H x W x C` images to
        `N x D` features, D = `8 * width` (18, 34) or `32 * width` (50).

    Example:

    >>> encoder = resnet(18, width=16, cifar_stem=True, bn_splits=8)
    >>> encoder.output_shape
    (None, 128)
    """
    if depth not in _ARCHS:
        raise ValueError(
            f"Unsupported ResNet depth {depth!r}; expected one of "
            f"{sorted(_ARCHS)}."
        )
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"`width` must be a positive int. Received: {width!r}")
    if norm_layer is not None and bn_splits != 1:
        raise ValueError(
            "Pass either `norm_layer` or `bn_splits`, not both. Received: "
            f"norm_layer={norm_layer!r}, bn_splits={bn_splits!r}"
        )
    if data_format is None:
        data_format = default_data_format()
    if data_format not in DATA_FORMATS:
        raise ValueError(
            f"`data_format` must be one of {DATA_FORMATS} or None. "
            f"Received: data_format={data_format!r}"
        )
    layout = _Layout(data_format)
    if norm_layer is None:
        norm_layer = functools.partial(
            SplitBatchNormalization, num_splits=bn_splits
        )
        if sync_bn:
            norm_layer = functools.partial(norm_layer, synchronized=True)
    last_norm = norm_layer
    if zero_init_residual:
        last_norm = functools.partial(norm_layer, gamma_initializer="zeros")
    block_type, expansion, stage_blocks = _ARCHS[depth]
    block = _bottleneck_block if block_type == "bottleneck" else _basic_block

    inputs = keras.Input(shape=input_shape, name="images")
    x = inputs
    if data_format == "channels_first":
        # Images arrive NHWC from every pipeline and export; one transpose
        # here instead of one around each layer.
        x = ChannelsFirst(name="to_channels_first")(x)
    if cifar_stem:
        x = layout.conv(x, width, 3, 1, "conv1")
    else:
        x = layout.conv(x, width, 7, 2, "conv1")
    x = norm_layer(name="bn1", axis=layout.axis)(x)
    x = layers.ReLU(name="relu")(x)
    if not cifar_stem:
        # Zero padding equals torch's -inf padding here: inputs are >= 0.
        x = layers.ZeroPadding2D(
            1, data_format=data_format, name="maxpool_pad"
        )(x)
        x = layers.MaxPooling2D(
            3, strides=2, data_format=data_format, name="maxpool"
        )(x)
    for stage, blocks in enumerate(stage_blocks):
        filters = width * 2**stage
        for index in range(blocks):
            strides = 2 if stage > 0 and index == 0 else 1
            x = block(
                x,
                filters,
                strides,
                norm_layer,
                layout,
                f"layer{stage + 1}_{index}",
                last_norm,
            )
    assert layout.channels(x) == width * 8 * expansion
    outputs = layers.GlobalAveragePooling2D(
        data_format=data_format, name="avgpool"
    )(x)
    return keras.Model(inputs, outputs, name=name or f"resnet{depth}")


def resnet18(**kwargs):
    """ResNet-18 (basic blocks, 512-d features). See `resnet`."""
    return resnet(18, **kwargs)


def resnet34(**kwargs):
    """ResNet-34 (basic blocks, 512-d features). See `resnet`."""
    return resnet(34, **kwargs)


def resnet50(**kwargs):
    """ResNet-50 v1.5 (bottleneck blocks, 2048-d features). See `resnet`."""
    return resnet(50, **kwargs)


def cifar_resnet18(width=16, **kwargs):
    """ResNet-18 with the CIFAR stem; `width=16` gives 128-d features.

    The encoder of the official MoCo CIFAR-10 demo has width 64; width 16
    keeps a training step fast on a laptop CPU.
    """
    return resnet(18, width=width, cifar_stem=True, **kwargs)


ENCODERS = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "cifar_resnet18": cifar_resnet18,
}


def get_encoder(arch, **kwargs):
    """Builds an encoder by name (`ENCODERS` lists the names)."""
    if arch not in ENCODERS:
        raise ValueError(
            f"Unknown encoder arch {arch!r}. Expected one of "
            f"{sorted(ENCODERS)}."
        )
    return ENCODERS[arch](**kwargs)
