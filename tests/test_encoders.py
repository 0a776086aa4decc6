import keras
import numpy as np
import pytest
from support import random_images

from moco_keras import SplitBatchNormalization
from moco_keras import encoders


def trainable_count(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


def nhwc_shape(model, name):
    """A layer's output shape in NHWC, whatever the encoder's layout."""
    shape = model.get_layer(name).output.shape
    if encoders.default_data_format() == "channels_first":
        return (shape[0], shape[2], shape[3], shape[1])
    return shape


def nhwc(array):
    """A feature map of the default layout in NHWC."""
    if encoders.default_data_format() == "channels_first":
        return np.transpose(array, (0, 2, 3, 1))
    return array


@pytest.mark.parametrize(
    "arch, features, torchvision_params",
    [
        # torchvision's parameter counts without the 1000-way fc layer.
        ("resnet18", 512, 11_689_512 - 513_000),
        ("resnet34", 512, 21_797_672 - 513_000),
        ("resnet50", 2048, 25_557_032 - 2_049_000),
    ],
)
def test_torchvision_sizes(arch, features, torchvision_params):
    model = encoders.get_encoder(arch)
    assert model.output_shape == (None, features)
    assert trainable_count(model) == torchvision_params


def test_resnet50_v15_layout():
    model = encoders.resnet50(input_shape=(64, 64, 3))
    # The stride of a downsampling bottleneck is on its 3x3 convolution.
    assert model.get_layer("layer2_0_conv1").strides == (1, 1)
    assert model.get_layer("layer2_0_conv2").strides == (2, 2)
    assert model.get_layer("layer2_0_downsample_0").strides == (2, 2)
    convs = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.Conv2D)
    ]
    assert len(convs) == 53 and not any(c.use_bias for c in convs)
    norms = [
        layer
        for layer in model.layers
        if isinstance(layer, SplitBatchNormalization)
    ]
    assert len(norms) == 53
    assert all(n.epsilon == 1e-5 and n.momentum == 0.9 for n in norms)
    gammas = [keras.ops.convert_to_numpy(n.gamma) for n in norms]
    assert all(np.all(g == 1.0) for g in gammas)  # no zero-init residual
    assert nhwc_shape(model, "layer4_2_relu") == (None, 2, 2, 2048)


def _numpy_conv(x, kernel, stride, pad):
    """Cross-correlation with symmetric zero padding, as torch computes it."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    k = kernel.shape[0]
    out = (x.shape[1] - k) // stride + 1
    y = np.zeros((x.shape[0], out, out, kernel.shape[-1]), np.float64)
    for i in range(out):
        for j in range(out):
            patch = x[
                :, i * stride : i * stride + k, j * stride : j * stride + k
            ]
            y[:, i, j] = np.tensordot(
                patch, kernel, axes=([1, 2, 3], [0, 1, 2])
            )
    return y


@pytest.mark.parametrize("size", [9, 10])
def test_strided_convolutions_pad_like_torch(size):
    model = encoders.resnet18(input_shape=(size, size, 3))
    x = random_images(2, (size, size, 3))
    stem = keras.Model(model.input, model.get_layer("conv1").output)
    kernel = keras.ops.convert_to_numpy(model.get_layer("conv1").kernel)
    np.testing.assert_allclose(
        nhwc(keras.ops.convert_to_numpy(stem(x))),
        _numpy_conv(x, kernel, stride=2, pad=3),
        atol=1e-4,
    )


def test_cifar_variant_and_width():
    model = encoders.cifar_resnet18(width=16, input_shape=(32, 32, 3))
    assert model.output_shape == (None, 128)
    assert model.get_layer("conv1").kernel_size == (3, 3)
    assert model.get_layer("conv1").strides == (1, 1)
    assert not any(
        isinstance(layer, keras.layers.MaxPooling2D) for layer in model.layers
    )
    assert nhwc_shape(model, "layer4_1_relu") == (None, 4, 4, 128)


def test_bn_splits_and_pluggable_norm():
    model = encoders.cifar_resnet18(width=2, bn_splits=4)
    norms = [
        layer
        for layer in model.layers
        if isinstance(layer, SplitBatchNormalization)
    ]
    assert norms and all(n.num_splits == 4 for n in norms)

    model = encoders.resnet18(
        width=4,
        norm_layer=lambda name, axis: keras.layers.LayerNormalization(
            axis=axis, name=name
        ),
    )
    assert isinstance(model.get_layer("bn1"), keras.layers.LayerNormalization)
    assert not any(
        isinstance(layer, keras.layers.BatchNormalization)
        for layer in model.layers
    )


def test_bad_arguments():
    with pytest.raises(ValueError, match="Unknown encoder arch 'resnet101'"):
        encoders.get_encoder("resnet101")
    with pytest.raises(ValueError, match="depth"):
        encoders.resnet(101)
    with pytest.raises(ValueError, match="not both"):
        encoders.resnet18(bn_splits=2, norm_layer=keras.layers.Identity)
    with pytest.raises(ValueError, match="data_format"):
        encoders.resnet18(data_format="NCHW")


def test_default_layout_is_the_backends():
    expected = {"torch": "channels_first"}.get(
        keras.backend.backend(), "channels_last"
    )
    assert encoders.default_data_format() == expected
    model = encoders.cifar_resnet18(width=2, input_shape=(8, 8, 3))
    assert model.get_layer("conv1").data_format == expected
    # NHWC images in, whatever the layout inside.
    assert model.input_shape == (None, 8, 8, 3)


def test_channels_first_is_nchw_in_memory():
    """The transposed images are NCHW values and, on torch, contiguous NCHW
    memory: a channels-last strided view would run the convolutions in
    oneDNN's channels-last kernels, whose 1x1 strided backward hangs with
    few channels on AVX2 CPUs (torch 2.13; see `encoders.ChannelsFirst`)."""
    x = random_images(2, (4, 5, 3))
    y = encoders.ChannelsFirst()(x)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(y), np.transpose(x, (0, 3, 1, 2))
    )
    if keras.backend.backend() == "torch":
        assert y.is_contiguous()
    model = encoders.cifar_resnet18(
        width=2, data_format="channels_first", input_shape=(8, 8, 3)
    )
    assert isinstance(
        model.get_layer("to_channels_first"), encoders.ChannelsFirst
    )


@pytest.mark.parametrize("arch", ["cifar_resnet18", "resnet50"])
def test_layouts_compute_the_same_with_the_same_weights(tmp_path, arch):
    """Channels-first and channels-last encoders hold the same weights
    under the same names: a weights file of one loads into the other, and
    both give the same features, in training (split BN) and inference."""
    # 64 px: ResNet-50's last stage keeps 2 x 2 pixels, enough samples per
    # BN group for statistics that float rounding does not swing.
    kwargs = dict(width=4, bn_splits=2, input_shape=(64, 64, 3))
    first = encoders.get_encoder(arch, data_format="channels_first", **kwargs)
    last = encoders.get_encoder(arch, data_format="channels_last", **kwargs)
    assert first.get_layer("bn1").axis == 1
    assert [w.path for w in first.weights] == [w.path for w in last.weights]
    path = str(tmp_path / "last.weights.h5")
    last.save_weights(path)
    first.load_weights(path)
    x = random_images(4, (64, 64, 3)) + 1.0
    # In training, 50 layers of batch statistics over groups of 2 images
    # carry the two layouts' rounding differences further.
    for training, tolerance in ((False, 1e-4), (True, 2e-3)):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(first(x, training=training)),
            keras.ops.convert_to_numpy(last(x, training=training)),
            rtol=tolerance,
            atol=tolerance,
        )
    # Training mode moved the moving statistics alike in both.
    for a, b in zip(first.weights, last.weights, strict=True):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(a),
            keras.ops.convert_to_numpy(b),
            rtol=1e-3,
            atol=1e-4,
        )


def test_initialisation_is_torchvisions():
    """Convolutions kaiming_normal_(mode="fan_out", nonlinearity="relu"):
    N(0, 2 / (k * k * out_channels)), not truncated; BN weight 1, bias 0."""
    model = encoders.resnet18(width=64, input_shape=(32, 32, 3))
    checked = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kernel = keras.ops.convert_to_numpy(layer.kernel)
            kh, kw, _, out = kernel.shape
            if kernel.size < 30_000:
                continue
            std = np.sqrt(2.0 / (kh * kw * out))
            assert kernel.std() == pytest.approx(std, rel=0.03), layer.name
            assert abs(kernel.mean()) < 0.03 * std, layer.name
            # A truncated normal would stop at 2 std.
            assert np.abs(kernel).max() > 3.5 * std, layer.name
            checked += 1
        if isinstance(layer, keras.layers.BatchNormalization):
            for name, value in (
                ("gamma", 1.0),
                ("beta", 0.0),
                ("moving_mean", 0.0),
                ("moving_variance", 1.0),
            ):
                array = keras.ops.convert_to_numpy(getattr(layer, name))
                np.testing.assert_array_equal(array, value, layer.name)
    assert checked >= 15


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_zero_init_residual_zeroes_each_blocks_last_bn_as_torchvision(arch):
    """torchvision's `zero_init_residual=True` (MoCo v3's ResNet): the last
    BN weight of every block is 0 (bn3 of a bottleneck, bn2 of a basic
    block), every other BN weight 1."""
    model = encoders.get_encoder(
        arch, width=4, input_shape=(32, 32, 3), zero_init_residual=True
    )
    last = "_bn3" if arch == "resnet50" else "_bn2"
    zeroed = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma = keras.ops.convert_to_numpy(layer.gamma)
            expected = 0.0 if layer.name.endswith(last) else 1.0
            np.testing.assert_array_equal(gamma, expected, layer.name)
            zeroed += expected == 0.0
    assert zeroed == (16 if arch == "resnet50" else 8)
