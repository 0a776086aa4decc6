r"""One MoCo v2 training step: each Keras backend against plain PyTorch.

    python bench/train_step.py [--model=resnet50|cifar18] [--runs=3]

Images per second and peak resident memory of one whole training step
(query forward and backward, momentum update, shuffled key forward, loss,
SGD step, enqueue) for:

- this package's `MoCo` under KERAS_BACKEND=tensorflow (with and without
  XLA `jit_compile`), jax and torch, through `model.fit` on one in-memory
  batch repeated;
- the same step in plain PyTorch, written as the official
  `moco/builder.py` and `main_moco.py` write it (same architecture, same
  batch, torch's SGD with weight decay), eager.

Each measurement runs in a fresh subprocess pinned to the same cores
(so one backend per process, and the same thread count for all); the
configurations alternate within each round, and the table reports min /
median / max over the rounds and the ratio of medians to PyTorch.

Models: `resnet50` (torchvision ResNet-50, MoCo v2 head, K 65536, batch 32,
112 px by default) and `cifar18` (the quick start's width-16 CIFAR ResNet-18,
split BN with 8 groups, K 4096, batch 256, 32 px).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

MODELS = {
    "resnet50": dict(size=112, batch=32, queue=65536, splits=1, width=64),
    "cifar18": dict(size=32, batch=256, queue=4096, splits=8, width=16),
}
CONFIGS = ("torch-plain", "tensorflow", "tensorflow-xla", "jax", "torch")


# --- Plain PyTorch, as the official code ---------------------------------


def torch_step_fn(model_name, spec, threads):
    import torch
    from torch import nn
    from torch.nn import functional

    torch.set_num_threads(threads)
    torch.manual_seed(0)

    class SplitBatchNorm(nn.BatchNorm2d):
        """The official CIFAR demo's split BN (num_splits groups)."""

        def __init__(self, channels, num_splits):
            super().__init__(channels)
            self.num_splits = num_splits

        def forward(self, x):
            if not self.training or self.num_splits == 1:
                return super().forward(x)
            n, c, h, w = x.shape
            running_mean = self.running_mean.repeat(self.num_splits)
            running_var = self.running_var.repeat(self.num_splits)
            out = functional.batch_norm(
                x.view(-1, c * self.num_splits, h, w),
                running_mean,
                running_var,
                self.weight.repeat(self.num_splits),
                self.bias.repeat(self.num_splits),
                True,
                self.momentum,
                self.eps,
            ).view(n, c, h, w)
            self.running_mean.data.copy_(
                running_mean.view(self.num_splits, c).mean(dim=0)
            )
            self.running_var.data.copy_(
                running_var.view(self.num_splits, c).mean(dim=0)
            )
            return out

    def norm(channels):
        return SplitBatchNorm(channels, spec["splits"])

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, inplanes, planes, stride):
            super().__init__()
            width = planes
            self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
            self.bn1 = norm(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
            self.bn2 = norm(width)
            self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
            self.bn3 = norm(planes * 4)
            self.downsample = None
            if stride != 1 or inplanes != planes * 4:
                self.downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                    norm(planes * 4),
                )

        def forward(self, x):
            out = functional.relu(self.bn1(self.conv1(x)))
            out = functional.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            identity = x if self.downsample is None else self.downsample(x)
            return functional.relu(out + identity)

    class Basic(nn.Module):
        expansion = 1

        def __init__(self, inplanes, planes, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn1 = norm(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = norm(planes)
            self.downsample = None
            if stride != 1 or inplanes != planes:
                self.downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                    norm(planes),
                )

        def forward(self, x):
            out = functional.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            identity = x if self.downsample is None else self.downsample(x)
            return functional.relu(out + identity)

    class ResNet(nn.Module):
        def __init__(self, block, layers, width, cifar_stem, dim):
            super().__init__()
            if cifar_stem:
                self.stem = nn.Sequential(
                    nn.Conv2d(3, width, 3, 1, 1, bias=False),
                    norm(width),
                    nn.ReLU(),
                )
            else:
                self.stem = nn.Sequential(
                    nn.Conv2d(3, width, 7, 2, 3, bias=False),
                    norm(width),
                    nn.ReLU(),
                    nn.MaxPool2d(3, 2, 1),
                )
            blocks, inplanes = [], width
            for stage, count in enumerate(layers):
                planes = width * 2**stage
                for index in range(count):
                    stride = 2 if stage > 0 and index == 0 else 1
                    blocks.append(block(inplanes, planes, stride))
                    inplanes = planes * block.expansion
            self.layers = nn.Sequential(*blocks)
            # MoCo v2 head, as builder.py replaces fc with mlp=True.
            self.fc = nn.Sequential(
                nn.Linear(inplanes, inplanes),
                nn.ReLU(),
                nn.Linear(inplanes, dim),
            )

        def forward(self, x):
            x = self.layers(self.stem(x))
            return self.fc(
                torch.flatten(functional.adaptive_avg_pool2d(x, 1), 1)
            )

    def encoder():
        if model_name == "resnet50":
            return ResNet(Bottleneck, [3, 4, 6, 3], 64, False, 128)
        return ResNet(Basic, [2, 2, 2, 2], spec["width"], True, 128)

    encoder_q, encoder_k = encoder(), encoder()
    for param_q, param_k in zip(
        encoder_q.parameters(), encoder_k.parameters(), strict=True
    ):
        param_k.data.copy_(param_q.data)
        param_k.requires_grad = False
    queue = functional.normalize(torch.randn(128, spec["queue"]), dim=0)
    state = {"ptr": 0}
    optimizer = torch.optim.SGD(
        encoder_q.parameters(), 0.03, momentum=0.9, weight_decay=1e-4
    )
    criterion = nn.CrossEntropyLoss()
    m, t = 0.999, 0.2

    def step(im_q, im_k):
        nonlocal queue
        q = functional.normalize(encoder_q(im_q), dim=1)
        with torch.no_grad():
            for param_q, param_k in zip(
                encoder_q.parameters(), encoder_k.parameters(), strict=True
            ):
                param_k.data = param_k.data * m + param_q.data * (1.0 - m)
            idx_shuffle = torch.randperm(im_k.shape[0])
            idx_unshuffle = torch.argsort(idx_shuffle)
            k = functional.normalize(encoder_k(im_k[idx_shuffle]), dim=1)
            k = k[idx_unshuffle]
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, queue.clone().detach())
        logits = torch.cat([l_pos, l_neg], dim=1) / t
        labels = torch.zeros(logits.shape[0], dtype=torch.long)
        loss = criterion(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            ptr = state["ptr"]
            queue[:, ptr : ptr + k.shape[0]] = k.T
            state["ptr"] = (ptr + k.shape[0]) % spec["queue"]
        return float(loss)

    rng = np.random.default_rng(0)
    shape = (spec["batch"], 3, spec["size"], spec["size"])
    im_q = torch.from_numpy(rng.normal(size=shape).astype("float32"))
    im_k = torch.from_numpy(rng.normal(size=shape).astype("float32"))

    def steps(count):
        for _ in range(count):
            step(im_q, im_k)

    return steps


# --- This package, through Keras ------------------------------------------


def keras_step_fn(model_name, spec, threads, jit):
    if os.environ["KERAS_BACKEND"] == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    import keras

    from moco_keras import MoCo
    from moco_keras import encoders
    from moco_keras import optimizers

    keras.utils.set_random_seed(0)
    size = spec["size"]
    if model_name == "resnet50":
        encoder = encoders.resnet50(
            bn_splits=spec["splits"], input_shape=(size, size, 3)
        )
    else:
        encoder = encoders.cifar_resnet18(
            width=spec["width"],
            bn_splits=spec["splits"],
            input_shape=(size, size, 3),
        )
    model = MoCo.from_preset(
        "mocov2", encoder, queue_size=spec["queue"], seed=0
    )
    model.compile(
        optimizer=optimizers.SGD(0.03, momentum=0.9, weight_decay=1e-4),
        jit_compile=jit,
    )
    import tensorflow as tf

    rng = np.random.default_rng(0)
    shape = (spec["batch"], size, size, 3)
    x_q = rng.normal(size=shape).astype("float32")
    x_k = rng.normal(size=shape).astype("float32")
    pairs = tf.data.Dataset.from_tensors((x_q, x_k)).repeat()

    def steps(count):
        # `fit`, not `train_on_batch`: on JAX, train_on_batch copies every
        # variable back to Keras after each call, which fit does per epoch.
        model.fit(
            pairs, steps_per_epoch=count, epochs=1, verbose=0, shuffle=False
        )

    return steps


def _rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args):
    spec = MODELS[args.model]
    # The frameworks alone, before any model: what the step adds is apart.
    if args.config == "torch-plain":
        import torch  # noqa: F401
    else:
        import keras  # noqa: F401
        import tensorflow  # noqa: F401

        import moco_keras  # noqa: F401
    import_mib = _rss_mib()
    if args.config == "torch-plain":
        step = torch_step_fn(args.model, spec, args.threads)
    else:
        step = keras_step_fn(
            args.model, spec, args.threads, args.config == "tensorflow-xla"
        )
    step(args.warmup)
    start = time.perf_counter()
    step(args.steps)
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "images_per_s": args.steps * spec["batch"] / seconds,
                "peak_mib": _rss_mib(),
                "import_mib": import_mib,
            }
        )
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="cifar18")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    args.threads = args.threads or len(cores)
    if args.config:
        return worker(args)
    configs = args.configs.split(",")
    results = {config: [] for config in configs}
    here = os.path.dirname(os.path.abspath(__file__))
    for _ in range(args.runs):
        for config in configs:
            backend = "torch" if config == "torch-plain" else config
            env = {
                **os.environ,
                "KERAS_BACKEND": backend.replace("-xla", ""),
                "PYTHONPATH": os.path.dirname(here),
            }
            command = [
                "taskset",
                "-c",
                ",".join(map(str, cores[: args.threads])),
                sys.executable,
                os.path.abspath(__file__),
                f"--model={args.model}",
                f"--config={config}",
                f"--steps={args.steps}",
                f"--warmup={args.warmup}",
                f"--threads={args.threads}",
            ]
            out = subprocess.run(
                command, env=env, capture_output=True, text=True, check=False
            )
            if out.returncode != 0:
                raise RuntimeError(f"{config} failed:\n{out.stderr[-3000:]}")
            results[config].append(
                json.loads(out.stdout.strip().splitlines()[-1])
            )
    spec = MODELS[args.model]
    print(
        f"MoCo v2 train step, {args.model}, batch {spec['batch']}, "
        f"{spec['size']} px, K {spec['queue']}, split BN {spec['splits']}, "
        f"{args.threads} threads, {args.runs} rounds of {args.steps} steps"
    )
    base = np.median([r["images_per_s"] for r in results[configs[0]]])
    print(
        f"  {'config':16s} {'img/s min':>10s} {'median':>8s} {'max':>8s} "
        f"{'vs ' + configs[0]:>18s} {'peak MiB':>9s} {'imports':>8s}"
    )
    for config, runs in results.items():
        speed = np.array([r["images_per_s"] for r in runs])
        peak = max(r["peak_mib"] for r in runs)
        imports = max(r["import_mib"] for r in runs)
        print(
            f"  {config:16s} {speed.min():10.1f} {np.median(speed):8.1f} "
            f"{speed.max():8.1f} {np.median(speed) / base:18.2f} {peak:9.0f} "
            f"{imports:8.0f}"
        )


if __name__ == "__main__":
    main()
