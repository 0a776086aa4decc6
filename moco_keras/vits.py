"""Vision Transformers as MoCo v3 builds them (`moco-v3` `vits.py`).

Chen, Xie and He, "An Empirical Study of Training Self-Supervised Vision
Transformers" (arXiv 2104.02057). The official code takes timm's
`VisionTransformer` and changes three things, which `vit` keeps:

- a fixed 2-D sin-cos position embedding (zeros for the class token), not
  learned;
- with `stop_grad_conv1`, a frozen random patch projection (the paper's
  fix for the training instability of ViT: "random patch projection");
- its initialisation: Xavier-uniform Linear weights, the fused `qkv`
  weight as three separate matrices, zero biases, the class token
  N(0, 1e-6), the patch projection Xavier-uniform over its 3 x p x p
  inputs.

The layer names follow timm's module names (`blocks_0_attn_qkv` is
`blocks.0.attn.qkv`), so that the official checkpoints map onto them one
to one. The model takes channels-last images and returns the class token
after the final LayerNorm (`N x embed_dim`), the features MoCo v3's
projector and the linear classifier read.
"""

import math

import keras
import numpy as np
from keras import layers
from keras import ops

# The two encoders of the paper's tables (`vits.py`): 12 blocks of 16 x 16
# patches; ViT-Small has 12 heads in MoCo v3 (timm's has 6).
PATCH_SIZE = 16
VIT_SMALL = {
    "patch_size": PATCH_SIZE,
    "embed_dim": 384,
    "depth": 12,
    "num_heads": 12,
}
VIT_BASE = {**VIT_SMALL, "embed_dim": 768}


def sincos_position_embedding(grid_size, embed_dim, temperature=10000.0):
    """The official `build_2d_sincos_position_embedding`, class token first.

    Returns a float32 array `1 x (1 + grid_size**2) x embed_dim`: zeros for
    the class token, then `[sin(w), cos(w), sin(h), cos(h)]` per patch,
    each over `embed_dim / 4` frequencies. As in the official code,
    `torch.meshgrid(grid_w, grid_h)` puts the first coordinate on the
    patch's row (for the square grids it builds the two are symmetric).

    Example:

    >>> sincos_position_embedding(2, 8).shape
    (1, 5, 8)
    """
    if embed_dim % 4:
        raise ValueError(
            "The 2-D sin-cos position embedding needs an embed_dim divisible "
            f"by 4. Received: embed_dim={embed_dim}"
        )
    grid = np.arange(grid_size, dtype=np.float32)
    grid_w, grid_h = np.meshgrid(grid, grid, indexing="ij")
    pos_dim = embed_dim // 4
    omega = np.arange(pos_dim, dtype=np.float32) / pos_dim
    omega = 1.0 / (temperature**omega)
    out_w = np.einsum("m,d->md", grid_w.reshape(-1), omega)
    out_h = np.einsum("m,d->md", grid_h.reshape(-1), omega)
    patches = np.concatenate(
        [np.sin(out_w), np.cos(out_w), np.sin(out_h), np.cos(out_h)], axis=1
    )
    token = np.zeros((1, embed_dim), np.float32)
    return np.concatenate([token, patches], axis=0)[None].astype(np.float32)


@keras.saving.register_keras_serializable(package="moco_keras")
class ClassTokenAndPosition(layers.Layer):
    """Prepends the class token and adds the fixed position embedding.

    Holds timm's `cls_token` (trainable) and `pos_embed` (fixed: not
    trainable, as in the official code).
    """

    def __init__(self, grid_size, embed_dim, **kwargs):
        super().__init__(**kwargs)
        self.grid_size = grid_size
        self.embed_dim = embed_dim

    def build(self, input_shape):
        self.cls_token = self.add_weight(
            shape=(1, 1, self.embed_dim),
            initializer=keras.initializers.RandomNormal(stddev=1e-6),
            name="cls_token",
        )
        table = sincos_position_embedding(self.grid_size, self.embed_dim)
        self.pos_embed = self.add_weight(
            shape=table.shape,
            initializer=lambda shape, dtype=None: ops.cast(table, dtype),
            trainable=False,
            name="pos_embed",
        )

    def call(self, tokens):
        n = ops.shape(tokens)[0]
        cls = ops.broadcast_to(
            ops.cast(self.cls_token, tokens.dtype), (n, 1, self.embed_dim)
        )  # N x 1 x D
        tokens = ops.concatenate([cls, tokens], axis=1)  # N x (1+P) x D
        return tokens + ops.cast(self.pos_embed, tokens.dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1] + 1, self.embed_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            {"grid_size": self.grid_size, "embed_dim": self.embed_dim}
        )
        return config


@keras.saving.register_keras_serializable(package="moco_keras")
class Attention(layers.Layer):
    """timm's multi-head self-attention: one fused `qkv` Linear, `proj`."""

    def __init__(self, embed_dim, num_heads, **kwargs):
        super().__init__(**kwargs)
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads "
                f"({num_heads})."
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        # The official init treats Q, K and V as three matrices.
        bound = math.sqrt(6.0 / (embed_dim + embed_dim))
        self.qkv = layers.Dense(
            3 * embed_dim,
            kernel_initializer=keras.initializers.RandomUniform(-bound, bound),
            bias_initializer="zeros",
            name="qkv",
        )
        self.proj = layers.Dense(
            embed_dim,
            kernel_initializer="glorot_uniform",
            bias_initializer="zeros",
            name="proj",
        )

    def build(self, input_shape):
        self.qkv.build(input_shape)
        self.proj.build(input_shape)

    def call(self, x):
        n, t = ops.shape(x)[0], ops.shape(x)[1]
        head_dim = self.embed_dim // self.num_heads
        qkv = ops.reshape(
            self.qkv(x), (n, t, 3, self.num_heads, head_dim)
        )  # N x T x 3 x H x d
        qkv = ops.transpose(qkv, (2, 0, 3, 1, 4))  # 3 x N x H x T x d
        q, k, v = qkv[0], qkv[1], qkv[2]  # N x H x T x d each
        attn = ops.matmul(q, ops.swapaxes(k, -1, -2)) * head_dim**-0.5
        attn = ops.softmax(attn, axis=-1)  # N x H x T x T
        x = ops.swapaxes(ops.matmul(attn, v), 1, 2)  # N x T x H x d
        return self.proj(ops.reshape(x, (n, t, self.embed_dim)))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {"embed_dim": self.embed_dim, "num_heads": self.num_heads}
        )
        return config


@keras.saving.register_keras_serializable(package="moco_keras")
class ClassToken(layers.Layer):
    """The class token's row of the tokens (timm's `x[:, 0]`)."""

    def call(self, tokens):
        return tokens[:, 0]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])


def vit(
    image_size=224,
    patch_size=16,
    embed_dim=384,
    depth=12,
    num_heads=12,
    mlp_ratio=4,
    stop_grad_conv1=False,
    name="vit",
):
    """A ViT as MoCo v3's `VisionTransformerMoCo`: images to the class token.

    Args:
        image_size: int, the square input's side (224); a multiple of
            `patch_size`.
        patch_size: int, the patches' side (16).
        embed_dim: int, the token width (384 ViT-Small, 768 ViT-Base); a
            multiple of 4 and of `num_heads`.
        depth: int, transformer blocks (12).
        num_heads: int, attention heads (12).
        mlp_ratio: the blocks' MLP width over `embed_dim` (4).
        stop_grad_conv1: bool, freeze the random patch projection (the
            official `--stop-grad-conv1`, on in its ViT recipes).
        name: the model's name.

    Returns:
        A functional `keras.Model` from `N x image_size x image_size x 3` to
        `N x embed_dim`.

    Example:

    >>> encoder = vit(image_size=32, patch_size=8, embed_dim=16, depth=1,
    ...               num_heads=2)
    >>> tuple(encoder.output.shape)
    (None, 16)
    """
    if image_size % patch_size:
        raise ValueError(
            f"image_size ({image_size}) must be a multiple of patch_size "
            f"({patch_size})."
        )
    grid = image_size // patch_size
    inputs = keras.Input((image_size, image_size, 3), name="images")
    bound = math.sqrt(6.0 / float(3 * patch_size * patch_size + embed_dim))
    projection = layers.Conv2D(
        embed_dim,
        patch_size,
        strides=patch_size,
        kernel_initializer=keras.initializers.RandomUniform(-bound, bound),
        bias_initializer="zeros",
        name="patch_embed_proj",
    )
    x = projection(inputs)  # N x g x g x D
    x = layers.Reshape((grid * grid, embed_dim), name="patch_embed_flatten")(x)
    x = ClassTokenAndPosition(grid, embed_dim, name="embedding")(x)
    hidden = int(embed_dim * mlp_ratio)
    for i in range(depth):
        prefix = f"blocks_{i}_"
        y = layers.LayerNormalization(epsilon=1e-6, name=prefix + "norm1")(x)
        y = Attention(embed_dim, num_heads, name=prefix + "attn")(y)
        x = layers.Add(name=prefix + "add1")([x, y])
        y = layers.LayerNormalization(epsilon=1e-6, name=prefix + "norm2")(x)
        y = layers.Dense(
            hidden,
            kernel_initializer="glorot_uniform",
            name=prefix + "mlp_fc1",
        )(y)
        # Keras' "gelu" is the exact one (erf), as torch's nn.GELU.
        y = layers.Activation("gelu", name=prefix + "mlp_act")(y)
        y = layers.Dense(
            embed_dim,
            kernel_initializer="glorot_uniform",
            name=prefix + "mlp_fc2",
        )(y)
        x = layers.Add(name=prefix + "add2")([x, y])
    x = layers.LayerNormalization(epsilon=1e-6, name="norm")(x)
    features = ClassToken(name="cls")(x)  # N x D
    model = keras.Model(inputs, features, name=name)
    if stop_grad_conv1:
        projection.trainable = False
    return model


def vit_small(**kwargs):
    """ViT-Small/16 of MoCo v3 (`vits.vit_small`); arguments as `vit`."""
    return vit(**{**VIT_SMALL, "name": "vit_small", **kwargs})


def vit_base(**kwargs):
    """ViT-Base/16 of MoCo v3 (`vits.vit_base`); arguments as `vit`."""
    return vit(**{**VIT_BASE, "name": "vit_base", **kwargs})


# The ViTs by the official `--arch` names.
VITS = {"vit_small": vit_small, "vit_base": vit_base}
