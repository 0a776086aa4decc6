r"""How far one float32 MoCo v3 step lands from the same step in float64:
the official step in torch, and this package on the current backend.

    KERAS_BACKEND=jax python bench/float32_step.py --output=BENCHMARKS.md

The step of `tests/test_mocov3.py`'s parity test (ResNet-18 of width 4,
64 px, batch 8, the official projector and predictor, LARS), from the
weights Keras draws with `--seeds` on this backend and a key side moved
off the query side. The reference is the official step (`torch_step`,
`TorchLARS`) in float64. Each row gives, over the query encoder's weights,
the largest gap of a weight's change from the reference's, as a share of
that change's largest element (the measure the parity test bounds): for
the official step in float32, and for this package in float32, compiled
as `fit` compiles it and eagerly (`--modes`). BN over few values per
group amplifies float32 rounding, by an amount that depends on the weights
and on the CPU's kernels; that is why the parity test compares in float64.
"""

import argparse
import os
import sys

import keras
import numpy as np
import tables
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import test_mocov3 as parity  # noqa: E402

from moco_keras import encoders  # noqa: E402
from moco_keras import optimizers  # noqa: E402
from moco_keras.mocov3 import MoCoV3  # noqa: E402

LARS = dict(momentum=0.9, weight_decay=1e-3, trust_coefficient=0.01)


def keras_model(seed):
    keras.utils.set_random_seed(seed)
    encoder = encoders.resnet18(width=4, input_shape=(64, 64, 3))
    model = MoCoV3.from_preset(
        "mocov3_resnet",
        encoder,
        dim=parity.DIM,
        mlp_dim=parity.MLP_DIM,
        momentum=0.9,
        health=False,
    )
    parity.move_key_side(model)
    return model


def official_step(model, dtype, views):
    """The query side after the official step from `model`'s weights."""
    base = parity.TorchResNet(depth=18, width=4, head=parity.resnet_head)
    momentum_encoder = parity.TorchResNet(
        depth=18, width=4, head=parity.resnet_head
    )
    predictor = parity.torch_mlp(
        2, parity.DIM, parity.MLP_DIM, parity.DIM, last_bn=False
    )
    parity.load_official(model, base, momentum_encoder, predictor, dtype)
    optimizer = parity.TorchLARS(
        list(base.parameters()) + list(predictor.parameters()), lr=1.0, **LARS
    )
    x1, x2 = (parity.nchw(view).to(dtype) for view in views)
    parity.torch_step(
        base,
        momentum_encoder,
        predictor,
        optimizer,
        x1,
        x2,
        0.9,
        model.temperature,
    )
    return {
        key: value.detach().double().numpy()
        for key, value in base.state_dict().items()
    }


def worst_gap(state, reference, before):
    """The largest gap of a weight's change, as a share of the change."""
    gaps = []
    for key, value in reference.items():
        if key.endswith("num_batches_tracked") or key not in state:
            continue
        change = value - before[key]
        scale = np.abs(change).max()
        if scale > 0:
            gap = np.abs((state[key] - before[key]) - change).max() / scale
            gaps.append((float(gap), key))
    return max(gaps)


def row(seed, modes):
    views = [parity.images(8, 64, 1), parity.images(8, 64, 2)]
    model = keras_model(seed)
    before = parity.state_of(model, "q")
    reference = official_step(model, torch.float64, views)
    official32 = official_step(model, torch.float32, views)
    cells = [worst_gap(official32, reference, before)]
    for mode in modes:
        model = keras_model(seed)
        model.compile(
            optimizer=optimizers.LARS(1.0, **LARS),
            jit_compile=mode == "compiled",
        )
        model.train_on_batch(*views)
        cells.append(worst_gap(parity.state_of(model, "q"), reference, before))
    return cells


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument(
        "--modes",
        default="compiled,eager",
        help="this package's steps to measure: compiled (as `fit` compiles "
        "it), eager, or both",
    )
    parser.add_argument("--output", help="also write the table here (md)")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if not modes or set(modes) - {"compiled", "eager"}:
        parser.error(f"--modes takes compiled and/or eager: {args.modes!r}")
    backend = keras.backend.backend()
    lines = [
        f"Keras backend: {backend}. Gap from the official float64 step, as "
        "a share of the change (the weight where it is largest):",
        "",
        "| seed | official, float32 | "
        + " | ".join(f"moco-keras, float32, {mode}" for mode in modes)
        + " |",
        "|---" * (2 + len(modes)) + "|",
    ]
    for seed in (int(s) for s in args.seeds.split(",")):
        cells = row(seed, modes)
        lines.append(
            f"| {seed} | "
            + " | ".join(f"{gap:.1e} (`{key}`)" for gap, key in cells)
            + " |"
        )
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    tables.write(args.output, f"float32_step_{backend}", text)


if __name__ == "__main__":
    main()
