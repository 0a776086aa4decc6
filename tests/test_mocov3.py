"""MoCo v3 against the official step, run in plain PyTorch.

The references below are written from facebookresearch/moco-v3
(`moco/builder.py`: `_build_mlp`, `contrastive_loss`, `forward`;
`moco/optimizer.py`: `LARS`; `vits.py`: the position embedding and timm's
blocks) with torch's own layers; the Keras weights are copied into them
through `export_pytorch`'s state dicts, one step runs on both sides, and
every weight is compared afterwards.
"""

import contextlib
import math

import keras
import numpy as np
import pytest
import torch
from support import conv_bn_encoder
from support import snapshot
from support import to_numpy
from torch import nn
from torch_checkpoints import TorchResNet

from moco_keras import color
from moco_keras import encoders
from moco_keras import export_pytorch
from moco_keras import moco
from moco_keras import optimizers
from moco_keras import views
from moco_keras import vits
from moco_keras.mocov3 import MOCOV3_RESNET
from moco_keras.mocov3 import MOCOV3_VIT
from moco_keras.mocov3 import MoCoV3
from moco_keras.mocov3 import contrastive_loss

# ---------------------------------------------------------------- references


def torch_mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
    """The official `MoCo._build_mlp`."""
    mlp = []
    for layer in range(num_layers):
        dim1 = input_dim if layer == 0 else mlp_dim
        dim2 = output_dim if layer == num_layers - 1 else mlp_dim
        mlp.append(nn.Linear(dim1, dim2, bias=False))
        if layer < num_layers - 1:
            mlp.append(nn.BatchNorm1d(dim2))
            mlp.append(nn.ReLU(inplace=True))
        elif last_bn:
            mlp.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*mlp)


class TorchLARS(torch.optim.Optimizer):
    """The official `moco/optimizer.py`."""

    def __init__(
        self,
        params,
        lr=0,
        weight_decay=0,
        momentum=0.9,
        trust_coefficient=0.001,
    ):
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            trust_coefficient=trust_coefficient,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(
                        param_norm > 0.0,
                        torch.where(
                            update_norm > 0,
                            (g["trust_coefficient"] * param_norm / update_norm),
                            one,
                        ),
                        one,
                    )
                    dp = dp.mul(q)
                param_state = self.state[p]
                if "mu" not in param_state:
                    param_state["mu"] = torch.zeros_like(p)
                mu = param_state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def torch_contrastive_loss(q, k, temperature):
    """The official `contrastive_loss` on one GPU (rank 0, no gather)."""
    q = nn.functional.normalize(q, dim=1)
    k = nn.functional.normalize(k, dim=1)
    logits = torch.einsum("nc,mc->nm", [q, k]) / temperature
    labels = torch.arange(logits.shape[0], dtype=torch.long)
    return nn.CrossEntropyLoss()(logits, labels) * (2 * temperature)


def torch_step(base, momentum_encoder, predictor, optimizer, x1, x2, m, t):
    """The official `MoCo.forward` and `main_moco.py`'s step."""
    q1 = predictor(base(x1))
    q2 = predictor(base(x2))
    with torch.no_grad():
        for param_b, param_m in zip(
            base.parameters(), momentum_encoder.parameters(), strict=True
        ):
            param_m.data = param_m.data * m + param_b.data * (1.0 - m)
        k1 = momentum_encoder(x1)
        k2 = momentum_encoder(x2)
    loss = torch_contrastive_loss(q1, k2, t) + torch_contrastive_loss(q2, k1, t)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def official_sincos(grid_size, embed_dim, temperature=10000.0):
    """`VisionTransformerMoCo.build_2d_sincos_position_embedding`."""
    grid_w = torch.arange(grid_size, dtype=torch.float32)
    grid_h = torch.arange(grid_size, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing="ij")
    pos_dim = embed_dim // 4
    omega = torch.arange(pos_dim, dtype=torch.float32) / pos_dim
    omega = 1.0 / (temperature**omega)
    out_w = torch.einsum("m,d->md", [grid_w.flatten(), omega])
    out_h = torch.einsum("m,d->md", [grid_h.flatten(), omega])
    pos_emb = torch.cat(
        [
            torch.sin(out_w),
            torch.cos(out_w),
            torch.sin(out_h),
            torch.cos(out_h),
        ],
        dim=1,
    )[None, :, :]
    pe_token = torch.zeros([1, 1, embed_dim], dtype=torch.float32)
    return torch.cat([pe_token, pos_emb], dim=1)


class TorchAttention(nn.Module):
    """timm's `Attention`."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class TorchMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TorchBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TorchAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = TorchMlp(dim, dim * mlp_ratio)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TorchPatchEmbed(nn.Module):
    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)


class TorchViT(nn.Module):
    """timm's `VisionTransformer` as MoCo v3 uses it, `head` given."""

    def __init__(
        self,
        image_size,
        patch_size,
        dim,
        depth,
        num_heads,
        head,
        stop_grad_conv1=True,
        mlp_ratio=4,
    ):
        super().__init__()
        grid = image_size // patch_size
        self.patch_embed = TorchPatchEmbed(patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(official_sincos(grid, dim))
        self.pos_embed.requires_grad = False
        self.blocks = nn.Sequential(
            *[TorchBlock(dim, num_heads, mlp_ratio) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = head
        if stop_grad_conv1:
            self.patch_embed.proj.weight.requires_grad = False
            self.patch_embed.proj.bias.requires_grad = False

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm(self.blocks(x + self.pos_embed))
        return self.head(x[:, 0])


# ------------------------------------------------------------------- helpers

DIM, MLP_DIM = 8, 16


def resnet_head(features):
    """The official ResNet projector of the tests' sizes."""
    return torch_mlp(2, features, MLP_DIM, DIM)


def state_of(model, side):
    """The Keras model's query or key side in the official names."""
    encoder = model.encoder_q if side == "q" else model.encoder_k
    projector = model.projector_q if side == "q" else model.projector_k
    if any(layer.name == "embedding" for layer in encoder.layers):
        state = export_pytorch.timm_vit_state(encoder)
        state.update(export_pytorch.mlp_state(projector, "head"))
    else:
        state = export_pytorch.backbone_state(encoder)
        state.update(export_pytorch.mlp_state(projector, "fc"))
    return state


def predictor_state(model):
    state = export_pytorch.mlp_state(model.predictor, "p")
    return {key[2:]: value for key, value in state.items()}


def load(module, state):
    module.load_state_dict(
        {key: torch.from_numpy(np.array(value)) for key, value in state.items()}
    )


@contextlib.contextmanager
def float64():
    """The step in float64 on both sides: Keras' floatx, JAX's 64-bit
    types. In float32 the ResNet's BN over a few values per group amplifies
    rounding, which differs from CPU to CPU (an AVX-512 one took JAX's
    conv1 change 0.5 % away from torch's, 222 of 588 elements over the
    0.1 % bound an AVX2 one passes); in float64 the rounding is 1e-9 of it,
    so a gap left is the step's logic."""
    previous = keras.config.floatx()
    keras.config.set_floatx("float64")
    x64 = contextlib.nullcontext()
    if keras.backend.backend() == "jax":
        import jax

        x64 = jax.enable_x64(True)
    try:
        with x64:
            yield
    finally:
        keras.config.set_floatx(previous)


def compare(keras_state, torch_module, before, what):
    """After the step (float64), each weight's change alike within 0.1 % of
    the largest change of that weight, BN moving statistics included; a
    wrong decay, trust ratio, momentum, gradient or moving-variance rule is
    off by its whole size. Keras computes `ops.mean` (global pooling,
    LayerNorm) in float32 on JAX and torch even for float64 inputs; from
    those few float32 steps the largest gap seen was 7e-5 of the change
    (torch backend), 1e-6 on JAX, 1e-9 on TensorFlow, and 4e-8 on a weight
    whose gradient is rounding noise (the ViT's last norm bias)."""
    torch_state = torch_module.state_dict()
    for key, value in keras_state.items():
        if key.endswith("num_batches_tracked"):
            continue
        expected = torch_state[key].detach().numpy()
        change = expected - before[key]
        scale = max(float(np.abs(change).max()), 1e-12)
        np.testing.assert_allclose(
            value - before[key],
            change,
            rtol=0,
            atol=1e-3 * scale + 1e-7,
            err_msg=f"{what}: {key}",
        )


def images(n, size, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, size, size, 3)).astype(keras.config.floatx())


def move_key_side(model):
    """A key side unlike the query side, as after some training: else the
    momentum update is the identity on the first step, and its place in
    the step would not show."""
    rng = np.random.default_rng(5)
    for k_var in model.encoder_k.weights + model.projector_k.weights:
        if "moving" not in k_var.path:
            noise = rng.normal(0, 0.05, k_var.shape).astype(k_var.dtype)
            k_var.assign(to_numpy(k_var) + noise)


def load_official(model, base, momentum_encoder, predictor, dtype):
    """The official modules in `dtype` with the model's weights, training."""
    for module in (base, momentum_encoder, predictor):
        module.to(dtype)
    load(base, state_of(model, "q"))
    load(momentum_encoder, state_of(model, "k"))
    load(predictor, predictor_state(model))
    for module in (base, momentum_encoder, predictor):
        module.train()


def nchw(images):
    """NCHW in contiguous memory: a transposed view has channels-last
    strides, on which torch 2.13's CPU backward of the 1 x 1 stride-2
    convolution of layer2's shortcut gave a different weight gradient from
    run to run (the loss the same to the last digit)."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def one_step_against_torch(
    model,
    base,
    momentum_encoder,
    predictor,
    keras_optimizer,
    torch_optimizer,
    size,
    m,
):
    move_key_side(model)
    load_official(model, base, momentum_encoder, predictor, torch.float64)
    before_q, before_k = state_of(model, "q"), state_of(model, "k")
    before_p = predictor_state(model)
    x1, x2 = images(8, size, 1), images(8, size, 2)
    model.compile(optimizer=keras_optimizer)
    keras_loss = model.train_on_batch(x1, x2)
    keras_loss = float(np.asarray(keras_loss).reshape(-1)[0])
    torch_loss = torch_step(
        base,
        momentum_encoder,
        predictor,
        torch_optimizer,
        nchw(x1),
        nchw(x2),
        m,
        model.temperature,
    )
    # The loss as Keras reports it: its float32 metric.
    assert keras_loss == pytest.approx(torch_loss, rel=1e-6)
    compare(state_of(model, "q"), base, before_q, "query side")
    compare(predictor_state(model), predictor, before_p, "predictor")
    compare(state_of(model, "k"), momentum_encoder, before_k, "momentum side")
    return before_q


# --------------------------------------------------------------------- tests


def test_resnet_step_equals_the_official_step_with_lars():
    with float64():
        keras.utils.set_random_seed(0)
        encoder = encoders.resnet18(width=4, input_shape=(64, 64, 3))
        model = MoCoV3.from_preset(
            "mocov3_resnet",
            encoder,
            dim=DIM,
            mlp_dim=MLP_DIM,
            momentum=0.9,
            health=False,
        )
        base = TorchResNet(depth=18, width=4, head=resnet_head)
        momentum_encoder = TorchResNet(depth=18, width=4, head=resnet_head)
        predictor = torch_mlp(2, DIM, MLP_DIM, DIM, last_bn=False)
        lars = dict(momentum=0.9, weight_decay=1e-3, trust_coefficient=0.01)
        torch_optimizer = TorchLARS(
            list(base.parameters()) + list(predictor.parameters()),
            lr=1.0,
            **lars,
        )
        one_step_against_torch(
            model,
            base,
            momentum_encoder,
            predictor,
            optimizers.LARS(1.0, **lars),
            torch_optimizer,
            64,
            0.9,
        )


def test_vit_step_equals_the_official_step():
    """SGD rather than the recipes' AdamW (`test_adamw_is_torch_adamw`
    holds that to torch's): weights before a BN (the k part of qkv's bias,
    the last norm's bias) have gradients that are rounding noise (1e-8
    here, from Keras' float32 means on JAX and torch), which Adam's
    division by the gradient's size would turn into steps of either
    sign."""
    with float64():
        keras.utils.set_random_seed(0)
        vit = dict(
            image_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2
        )
        encoder = vits.vit(**vit, stop_grad_conv1=True)
        model = MoCoV3.from_preset(
            "mocov3_vit",
            encoder,
            dim=DIM,
            mlp_dim=MLP_DIM,
            momentum=0.9,
            health=False,
        )
        ref = dict(image_size=16, patch_size=8, dim=16, depth=2, num_heads=2)
        base = TorchViT(**ref, head=torch_mlp(3, 16, MLP_DIM, DIM))
        momentum_encoder = TorchViT(**ref, head=torch_mlp(3, 16, MLP_DIM, DIM))
        predictor = torch_mlp(2, DIM, MLP_DIM, DIM, last_bn=True)
        torch_optimizer = torch.optim.SGD(
            [
                p
                for p in list(base.parameters()) + list(predictor.parameters())
                if p.requires_grad
            ],
            lr=0.5,
            momentum=0.9,
            weight_decay=1e-2,
        )
        keras_optimizer = optimizers.SGD(0.5, momentum=0.9, weight_decay=1e-2)
        before = one_step_against_torch(
            model,
            base,
            momentum_encoder,
            predictor,
            keras_optimizer,
            torch_optimizer,
            16,
            0.9,
        )
        # --stop-grad-conv1: the random patch projection did not move.
        after = state_of(model, "q")
    for key in (
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "pos_embed",
    ):
        np.testing.assert_array_equal(after[key], before[key])
    assert not np.array_equal(after["cls_token"], before["cls_token"])


def test_sincos_position_embedding_equals_the_official():
    np.testing.assert_allclose(
        vits.sincos_position_embedding(4, 32),
        official_sincos(4, 32).numpy(),
        rtol=1e-6,
        atol=1e-6,
    )


def test_vit_initialisation_follows_the_official_code():
    encoder = vits.vit(
        image_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4
    )
    state = export_pytorch.timm_vit_state(encoder)
    qkv = state["blocks.0.attn.qkv.weight"]  # 192 x 64
    assert np.abs(qkv).max() <= math.sqrt(6.0 / (64 + 64))
    assert np.abs(qkv).max() > 0.9 * math.sqrt(6.0 / (64 + 64))
    fc1 = state["blocks.0.mlp.fc1.weight"]  # 256 x 64, Xavier
    assert np.abs(fc1).max() <= math.sqrt(6.0 / (64 + 256))
    patch = state["patch_embed.proj.weight"]
    assert np.abs(patch).max() <= math.sqrt(6.0 / (3 * 8 * 8 + 64))
    for key, value in state.items():
        if key.endswith(".bias"):
            assert not value.any(), key
    assert np.abs(state["cls_token"]).max() < 1e-5


def test_loss_is_symmetric_in_the_views():
    def build():
        keras.utils.set_random_seed(3)
        encoder = conv_bn_encoder(size=16)
        model = MoCoV3(encoder, dim=DIM, mlp_dim=MLP_DIM, health=False)
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        return model

    x1, x2 = images(8, 16, 1), images(8, 16, 2)
    forward = build().train_on_batch(x1, x2)
    backward = build().train_on_batch(x2, x1)
    assert float(np.ravel(forward)[0]) == pytest.approx(
        float(np.ravel(backward)[0]), rel=1e-5
    )


def test_momentum_follows_the_cosine_schedule_to_one():
    encoder = conv_bn_encoder(size=16)
    model = MoCoV3(
        encoder,
        dim=DIM,
        mlp_dim=MLP_DIM,
        momentum=optimizers.CosineMomentum(0.5, steps_per_epoch=2, epochs=1),
        health=False,
    )
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    pairs = [
        (q, k)
        for q, k in zip(
            model.encoder_q.weights, model.encoder_k.weights, strict=True
        )
        if q.trainable
    ]
    q0 = snapshot([q for q, _ in pairs])
    model.train_on_batch(images(8, 16, 1), images(8, 16, 2))
    # Step 0: m = 0.5 and the key side started equal to the query side.
    for (_, k), before in zip(pairs, q0, strict=True):
        np.testing.assert_allclose(to_numpy(k), before, rtol=1e-6, atol=1e-7)
    q1, k1 = snapshot([q for q, _ in pairs]), snapshot([k for _, k in pairs])
    model.train_on_batch(images(8, 16, 3), images(8, 16, 4))
    # Step 1 of 2: m = 1 - 0.5 * (1 + cos(pi / 2)) * 0.5 = 0.75.
    for (_, k), q_before, k_before in zip(pairs, q1, k1, strict=True):
        np.testing.assert_allclose(
            to_numpy(k),
            0.75 * k_before + 0.25 * q_before,
            rtol=1e-5,
            atol=1e-6,
        )
    assert float(model.current_momentum()) == pytest.approx(1.0)


def test_contrastive_loss_equals_numpy_and_ranks_its_own_key():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(6, 4)).astype("float32")
    k = rng.normal(size=(6, 4)).astype("float32")
    loss, similarity = contrastive_loss(q, k, 0.2)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    kn = k / np.linalg.norm(k, axis=1, keepdims=True)
    logits = qn @ kn.T / 0.2
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected = -np.mean(np.diag(log_softmax)) * 2 * 0.2
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(similarity), qn @ kn.T, atol=1e-6
    )


def test_fit_logs_the_metrics_and_health_of_v3():
    encoder = vits.vit(
        image_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2
    )
    model = MoCoV3.from_preset("mocov3_vit", encoder, dim=DIM, mlp_dim=MLP_DIM)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    history = model.fit(
        images(16, 16, 1), images(16, 16, 2), batch_size=8, verbose=0
    )
    logs = history.history
    for name in ("loss", "acc1", "alignment", "uniformity", "l_neg_max"):
        assert np.isfinite(logs[name][0]), name
    # A batch of 8 keys: 7 negatives; l_neg_max <= 1 and >= l_neg.
    assert logs["l_neg"][0] <= logs["l_neg_max"][0] <= 1.0


def test_in_model_views_pair_each_view_with_its_own_layer(tmp_path):
    """With the colour half in the model (uint8 crops in), a pair of
    layers gives each view its own, and the first view's keys come from its
    augmented images: one step equals the step of a plain model on the
    views augmented beforehand."""
    plain = views.get_augmentation(
        "mocov2",
        size=16,
        jitter_p=0.0,
        grayscale_p=0.0,
        blur_p=0.0,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )
    pair = [
        color.ColorAugmentation.from_augmentation(config)
        for config in (plain, {**plain, "solarize_p": 1.0})
    ]
    rng = np.random.default_rng(0)
    x1, x2 = rng.integers(0, 256, (2, 8, 16, 16, 3)).astype("uint8")

    def step(augmentation, view_1, view_2):
        keras.utils.set_random_seed(3)
        encoder = conv_bn_encoder(size=16)
        model = MoCoV3(
            encoder, dim=DIM, mlp_dim=MLP_DIM, augmentation=augmentation
        )
        model.compile(optimizer=keras.optimizers.SGD(0.5))
        logs = model.train_on_batch(view_1, view_2, return_dict=True)
        return model, logs

    model, logs = step(pair, x1, x2)
    # As the layer computes them, so that the two steps see the same bits.
    y1, y2 = x1.astype("float32") / 255.0, x2.astype("float32") / 255.0
    plain_model, expected = step(None, y1, np.where(y2 >= 0.5, 1 - y2, y2))
    assert logs["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    # Inference: the first layer, which only normalizes.
    np.testing.assert_allclose(
        model.predict(x1, verbose=0),
        plain_model.predict(y1, verbose=0),
        atol=1e-5,
    )
    model.save(tmp_path / "v3.keras")
    loaded = keras.saving.load_model(tmp_path / "v3.keras")
    assert [layer.solarize_p for layer in loaded.augmentation] == [0.0, 1.0]
    with pytest.raises(ValueError, match="neither"):
        MoCoV3(conv_bn_encoder(size=16), augmentation=[pair[0], None])


def test_presets_follow_the_official_code():
    assert MOCOV3_RESNET == {
        "dim": 256,
        "mlp_dim": 4096,
        "projector_layers": 2,
        "predictor_last_bn": False,
        "momentum": 0.99,
        "temperature": 1.0,
    }
    assert MOCOV3_VIT["projector_layers"] == 3
    assert MOCOV3_VIT["predictor_last_bn"] is True
    assert MOCOV3_VIT["temperature"] == 0.2
    assert vits.VIT_SMALL == {
        "patch_size": 16,
        "embed_dim": 384,
        "depth": 12,
        "num_heads": 12,
    }


def test_config_round_trip_and_keras_file(tmp_path):
    encoder = conv_bn_encoder(size=16)
    model = MoCoV3(
        encoder,
        dim=DIM,
        mlp_dim=MLP_DIM,
        momentum=optimizers.CosineMomentum(0.99, steps_per_epoch=5, epochs=10),
    )
    model.compile(optimizer=optimizers.LARS(0.1))
    model.train_on_batch(images(8, 16, 1), images(8, 16, 2))
    path = tmp_path / "v3.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    config, loaded_config = model.get_config(), loaded.get_config()
    del config["encoder"], loaded_config["encoder"]
    assert loaded_config == config
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    assert loaded.momentum == model.momentum
    assert float(loaded.current_momentum()) == pytest.approx(
        float(model.current_momentum())
    )
    # A config written when the schedule was two arguments of the model.
    legacy = {**model.get_config(), "momentum": 0.99}
    legacy.update(momentum_epochs=10, steps_per_epoch=5)
    assert MoCoV3.from_config(legacy).momentum == model.momentum
    legacy.update(momentum_epochs=None, steps_per_epoch=None)
    assert MoCoV3.from_config(legacy).momentum == 0.99


def test_bad_arguments_say_what_to_fix():
    encoder = conv_bn_encoder(size=16)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        optimizers.CosineMomentum(0.99, steps_per_epoch=None, epochs=100)
    with pytest.raises(ValueError, match="a schedule of m is MoCo v3's"):
        moco.MoCo(encoder, momentum=optimizers.CosineMomentum(0.99, 5, 10))
    with pytest.raises(ValueError, match="mlp_dim"):
        MoCoV3(encoder, mlp_dim=0)
    with pytest.raises(ValueError, match="second view"):
        model = MoCoV3(encoder, dim=DIM, mlp_dim=MLP_DIM)
        model.compile(optimizer="sgd")
        model.fit(images(8, 16, 1), batch_size=8, verbose=0)


def randomize_bn(*modules, seed=0):
    """Random BN statistics and affine weights, so that a mix-up shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for layer in module.modules():
                if isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d):
                    layer.running_mean.normal_(0, 0.1, generator=generator)
                    layer.running_var.uniform_(0.5, 1.5, generator=generator)
                    if layer.affine:
                        layer.weight.uniform_(0.5, 1.5, generator=generator)
                        layer.bias.normal_(0, 0.1, generator=generator)


def save_official_v3(path, base, momentum_encoder, predictor, arch):
    """A checkpoint as moco-v3's `main_moco.py` writes it (DDP names)."""
    state = {}
    for prefix, module in (
        ("module.base_encoder.", base),
        ("module.momentum_encoder.", momentum_encoder),
        ("module.predictor.", predictor),
    ):
        for name, value in module.state_dict().items():
            state[prefix + name] = value
    torch.save(
        {"epoch": 100, "arch": arch, "state_dict": state, "optimizer": {}},
        path,
    )


def check_converted(path, base, momentum_encoder, predictor, size):
    from moco_keras import convert

    converted = convert.convert(str(path))
    model = converted.model
    assert converted.kind == "mocov3" and isinstance(model, MoCoV3)
    for what, keras_state, module in (
        ("q", state_of(model, "q"), base),
        ("k", state_of(model, "k"), momentum_encoder),
        ("predictor", predictor_state(model), predictor),
    ):
        expected = {
            key: value.numpy()
            for key, value in module.state_dict().items()
            if not key.endswith("num_batches_tracked")
        }
        got = {
            key: value
            for key, value in keras_state.items()
            if not key.endswith("num_batches_tracked")
        }
        assert sorted(got) == sorted(expected), what
        for key, value in expected.items():
            np.testing.assert_array_equal(got[key], value, err_msg=key)
    # The same function: inference-mode predictions of both.
    for module in (base, predictor):
        module.eval()
    x = images(4, size, 7)
    with torch.no_grad():
        expected = predictor(base(torch.from_numpy(x.transpose(0, 3, 1, 2))))
    expected = nn.functional.normalize(expected, dim=1).numpy()
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(x)), expected, rtol=1e-4, atol=1e-5
    )
    return converted


def test_official_v3_resnet_checkpoint_converts(tmp_path):
    base = TorchResNet(depth=18, width=4, head=resnet_head, seed=1)
    momentum_encoder = TorchResNet(depth=18, width=4, head=resnet_head, seed=2)
    predictor = torch_mlp(2, DIM, MLP_DIM, DIM, last_bn=False)
    randomize_bn(base.fc, momentum_encoder.fc, predictor, seed=3)
    path = tmp_path / "r-50-100ep.pth.tar"
    save_official_v3(path, base, momentum_encoder, predictor, "resnet18")
    converted = check_converted(path, base, momentum_encoder, predictor, 32)
    assert converted.info["arch"] == "resnet18"
    assert converted.model.projector_layers == 2
    assert not converted.model.predictor_last_bn
    assert converted.model.temperature == 1.0


def test_official_v3_vit_checkpoint_converts(tmp_path):
    # 12 heads, as the official ViT-S: the checkpoint does not hold them.
    ref = dict(image_size=16, patch_size=8, dim=24, depth=2, num_heads=12)
    torch.manual_seed(0)
    base = TorchViT(**ref, head=torch_mlp(3, 24, MLP_DIM, DIM))
    momentum_encoder = TorchViT(**ref, head=torch_mlp(3, 24, MLP_DIM, DIM))
    predictor = torch_mlp(2, DIM, MLP_DIM, DIM, last_bn=True)
    with torch.no_grad():
        for module in (base, momentum_encoder):
            module.cls_token.normal_()
            for block in module.blocks:
                block.norm1.bias.normal_()
    randomize_bn(base.head, momentum_encoder.head, predictor, seed=3)
    path = tmp_path / "vit-s-300ep.pth.tar"
    save_official_v3(path, base, momentum_encoder, predictor, "vit_small")
    converted = check_converted(path, base, momentum_encoder, predictor, 16)
    assert converted.info["arch"] == "vit_small"
    assert converted.model.projector_layers == 3
    assert converted.model.predictor_last_bn
    assert converted.model.temperature == 0.2


def test_v3_checkpoint_with_a_missing_weight_loads_nothing(tmp_path):
    base = TorchResNet(depth=18, width=4, head=resnet_head)
    predictor = torch_mlp(2, DIM, MLP_DIM, DIM, last_bn=False)
    path = tmp_path / "broken.pth.tar"
    save_official_v3(path, base, base, predictor, "resnet18")
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["state_dict"][
        "module.momentum_encoder.layer1.0.conv1.weight"
    ]
    torch.save(checkpoint, path)
    from moco_keras import convert

    with pytest.raises(ValueError, match="momentum_encoder.layer1.0.conv1"):
        convert.convert(str(path))


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.backends("tensorflow")
def test_four_replicas_equal_one_device_with_the_whole_batch():
    """SyncBN, the keys gathered over the replicas and each replica's labels
    offset by its rank: two steps on 4 logical CPU devices (4 images each)
    equal two steps on one device with the batch of 16."""
    from test_distribute import run_script

    result = run_script("mirrored_v3_step.py", KERAS_BACKEND="tensorflow")
    assert result["replicas"] == 4
    single, mirrored = result["loss"]
    assert mirrored == pytest.approx(single, rel=1e-5)
    assert result["acc1"][0] == pytest.approx(result["acc1"][1], abs=1e-6)
    # Every weight, BN statistics and the momentum side included, within
    # 0.1 % of its change in the two steps, or 2e-5 (float32 sums in
    # another order; seen: 4e-4 of the change on the MLPs' BN scales, 1e-5
    # on a moving mean that barely moved).
    for path, (gap, change) in result["weights"].items():
        assert gap < 1e-3 * change + 2e-5, (path, gap, change)
    assert any("moving_mean" in path for path in result["weights"])
    assert any(path.startswith("projector_k") for path in result["weights"])
    assert "sync_bn=True" in result["refused"]
    # SyncBN's moving statistics over 4 replicas of 4 images: one torch
    # BatchNorm2d over the 16, the unbiased variance of 16 x 36 values.
    sync = result["sync_bn"]
    reference = torch.nn.BatchNorm2d(3).train()
    batches = np.array(sync["batches"], "float32").reshape(3, 16, 6, 6, 3)
    with torch.no_grad():
        for batch in batches:
            reference(torch.from_numpy(batch).permute(0, 3, 1, 2))
    np.testing.assert_allclose(
        sync["moving_mean"], reference.running_mean.numpy(), rtol=1e-5
    )
    np.testing.assert_allclose(
        sync["moving_variance"], reference.running_var.numpy(), rtol=1e-5
    )


@pytest.mark.process
@pytest.mark.backends("torch")
def test_convert_recipe_reads_an_official_v3_checkpoint(tmp_path):
    from support import run_module

    base = TorchResNet(depth=18, width=4, head=resnet_head)
    predictor = torch_mlp(2, DIM, MLP_DIM, DIM, last_bn=False)
    source = tmp_path / "r-50-100ep.pth.tar"
    save_official_v3(source, base, base, predictor, "resnet18")
    output = tmp_path / "converted"
    result = run_module(
        "moco_keras.recipes.convert", f"--source={source}", f"--output={output}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MoCo v3 pretraining (2-layer projector" in result.stdout
    from moco_keras import convert

    model, metadata = convert.load_converted(str(output))
    assert isinstance(model, MoCoV3) and metadata["kind"] == "mocov3"
    # What recipes/lincls trains on: the query encoder, the official
    # normalization.
    from moco_keras import linear_classification

    backbone, normalization = linear_classification.load_backbone(str(output))
    assert backbone.output.shape[-1] == 32 and normalization is not None


@pytest.mark.process
@pytest.mark.backends("torch")
def test_export_recipe_writes_v3_weights_for_torchvision_and_timm(tmp_path):
    from support import run_module

    def convert_and_export(base, predictor, arch, fmt):
        source = tmp_path / f"{arch}.pth.tar"
        save_official_v3(source, base, base, predictor, arch)
        converted = tmp_path / f"converted_{arch}"
        result = run_module(
            "moco_keras.recipes.convert",
            f"--source={source}",
            f"--output={converted}",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        output = tmp_path / f"{arch}_{fmt}.pth"
        return output, run_module(
            "moco_keras.recipes.export",
            f"--format={fmt}",
            f"--pretrained={converted}",
            f"--output={output}",
        )

    resnet = TorchResNet(depth=18, width=64, head=resnet_head)
    output, result = convert_and_export(
        resnet,
        torch_mlp(2, DIM, MLP_DIM, DIM, last_bn=False),
        "resnet18",
        "torchvision",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    plain = TorchResNet(depth=18, width=64)
    missing = plain.load_state_dict(
        torch.load(output, weights_only=True), strict=False
    ).missing_keys
    assert sorted(missing) == ["fc.bias", "fc.weight"]
    for key, value in plain.state_dict().items():
        if not key.startswith("fc."):
            np.testing.assert_array_equal(
                value.numpy(), resnet.state_dict()[key].numpy(), err_msg=key
            )

    ref = dict(image_size=16, patch_size=8, dim=24, depth=2, num_heads=12)
    vit = TorchViT(**ref, head=torch_mlp(3, 24, MLP_DIM, DIM))
    output, result = convert_and_export(
        vit, torch_mlp(2, DIM, MLP_DIM, DIM), "vit_small", "timm"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(output, weights_only=True)
    expected = {
        k: v for k, v in vit.state_dict().items() if not k.startswith("head.")
    }
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(state[key].numpy(), value.numpy())
    result = run_module(
        "moco_keras.recipes.export",
        "--format=torchvision",
        f"--pretrained={tmp_path / 'converted_vit_small'}",
        f"--output={tmp_path / 'no.pth'}",
    )
    assert result.returncode != 0
    assert "use --format=timm" in result.stderr
