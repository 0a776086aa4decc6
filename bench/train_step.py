r"""One MoCo v2 training step: each Keras backend against plain PyTorch.

    python bench/train_step.py [--model=resnet50|cifar18] [--runs=3]
        [--parts=step,supervised,keys] [--configs=...,tensorflow-bf16]

Images per second and peak resident memory of one whole training step
(query forward and backward, momentum update, shuffled key forward, loss,
SGD step, enqueue) for:

- this package's `MoCo` under KERAS_BACKEND=tensorflow (as TensorFlow
  starts on the CPU, with its oneDNN kernels on, and with XLA
  `jit_compile`), jax and torch, through `model.fit` on one in-memory
  batch repeated;
- the same step in plain PyTorch (`bench/torch_moco.py`, written as the
  official `moco/builder.py` and `main_moco.py` write it: same architecture,
  same batch, torch's SGD with weight decay), eager.

Opt-in configurations `tensorflow-bf16` and `torch-plain-bf16` run Keras'
`mixed_bfloat16` policy and `torch.autocast(bfloat16)`. `--parts` also
times the step's parts apart: "supervised" (the query side alone: forward,
backward, SGD) and "keys" (the key encoder's forward in training mode); the
step less both is MoCo's own work.

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
import tables

MODELS = {
    "resnet50": dict(size=112, batch=32, queue=65536, splits=1, width=64),
    "cifar18": dict(size=32, batch=256, queue=4096, splits=8, width=16),
}
CONFIGS = (
    "torch-plain",
    "tensorflow",
    "tensorflow-onednn",
    "tensorflow-xla",
    "jax",
    "torch",
)
# Opt-in: the torch backend with the encoders channels-last, the layout it
# ran in before the encoders followed the backend (`encoders.resnet`'s
# `data_format`), to measure what the layout is worth.
LAYOUT_CONFIGS = ("torch-nhwc",)
# Opt-in: bfloat16 autocast in plain PyTorch against Keras' mixed_bfloat16
# policy (on CPUs with AMX / AVX512-BF16 oneDNN runs these in bfloat16).
BF16_CONFIGS = ("torch-plain-bf16", "tensorflow-bf16")
# Where a step's time goes, measured apart with the same network and batch:
# "step" is the whole MoCo step; "supervised" the query side alone (forward,
# backward, SGD; a plain training step of encoder and head); "keys" the key
# encoder's forward in training mode (batch statistics), no gradient. What
# the step takes beyond supervised + keys is MoCo's own work (momentum
# update, shuffle, loss, queue) and framework overhead.
PARTS = ("step", "supervised", "keys")


# --- Plain PyTorch, as the official code ---------------------------------


def torch_step_fn(
    model_name,
    spec,
    threads,
    part="step",
    bf16=False,
    device="cpu",
    channels_last=False,
):
    """The official step in plain PyTorch; returns `steps(count, warmup)`.

    `channels_last` puts the model and the images in PyTorch's channels-last
    memory format, the fast layout for convolutions under autocast on GPUs.
    """
    import contextlib

    import torch
    import torch_moco
    from torch import nn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    arch = "resnet50" if model_name == "resnet50" else "cifar_resnet18"

    def encoder():
        return torch_moco.ResNet(arch, spec["width"], spec["splits"])

    model = torch_moco.MoCo(encoder, K=spec["queue"], m=0.999, T=0.2)
    memory_format = (
        torch.channels_last if channels_last else torch.contiguous_format
    )
    model = model.to(device=device, memory_format=memory_format)
    model.train()
    optimizer = torch.optim.SGD(
        model.encoder_q.parameters(), 0.03, momentum=0.9, weight_decay=1e-4
    )
    criterion = nn.CrossEntropyLoss()

    def step(im_q, im_k):
        logits, labels = model(im_q, im_k)
        loss = criterion(logits.float(), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def supervised(im_q, im_k):
        loss = model.encoder_q(im_q).float().square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def keys(im_q, im_k):
        with torch.no_grad():
            model.encoder_k(im_k)

    function = {"step": step, "supervised": supervised, "keys": keys}[part]
    rng = np.random.default_rng(0)
    shape = (spec["batch"], 3, spec["size"], spec["size"])
    im_q, im_k = (
        torch.from_numpy(rng.normal(size=shape).astype("float32"))
        .to(device)
        .contiguous(memory_format=memory_format)
        for _ in range(2)
    )

    def synchronize():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    def steps(count, warmup=0):
        """Runs warmup + count steps; returns the seconds of the last count."""
        autocast = (
            torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
            if bf16
            else contextlib.nullcontext()
        )
        with autocast:
            for _ in range(warmup):
                function(im_q, im_k)
            synchronize()
            start = time.perf_counter()
            for _ in range(count):
                function(im_q, im_k)
            synchronize()
        return time.perf_counter() - start

    return steps


# --- This package, through Keras ------------------------------------------


def keras_step_fn(
    model_name, spec, threads, jit, part="step", bf16=False, data_format=None
):
    if threads and os.environ["KERAS_BACKEND"] == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    import keras

    from moco_keras import MoCo
    from moco_keras import configs
    from moco_keras import encoders
    from moco_keras import optimizers

    class KeyForward(keras.Model):
        """The key encoder and head in training mode, run by `predict`."""

        def __init__(self, encoder, head):
            super().__init__()
            self.encoder, self.head = encoder, head

        def call(self, images, training=None):
            # Training mode whatever predict says: MoCo's keys use the batch
            # statistics (and update the key encoder's moving ones).
            return self.head(self.encoder(images, training=True), training=True)

    # Compiled as the recipes compile it: under JAX always (Keras' JAX
    # trainer runs an uncompiled step op by op).
    jit = configs.jit_compile({"run": {"jit_compile": jit}})
    keras.utils.set_random_seed(0)
    if bf16:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    size = spec["size"]
    if model_name == "resnet50":
        encoder = encoders.resnet50(
            width=spec["width"],
            bn_splits=spec["splits"],
            input_shape=(size, size, 3),
            data_format=data_format,
        )
    else:
        encoder = encoders.cifar_resnet18(
            width=spec["width"],
            bn_splits=spec["splits"],
            input_shape=(size, size, 3),
            data_format=data_format,
        )
    model = MoCo.from_preset(
        "mocov2", encoder, queue_size=spec["queue"], seed=0
    )
    rng = np.random.default_rng(0)
    shape = (spec["batch"], size, size, 3)
    x_q = rng.normal(size=shape).astype("float32")
    x_k = rng.normal(size=shape).astype("float32")
    optimizer = optimizers.SGD(0.03, momentum=0.9, weight_decay=1e-4)
    if part == "step":
        model.compile(optimizer=optimizer, jit_compile=jit)
        pairs = repeated((x_q, x_k))
    elif part == "supervised":
        inputs = keras.Input(shape[1:])
        model = keras.Model(
            inputs, model.head_q(model.encoder_q(inputs)), name="supervised"
        )
        model.compile(optimizer=optimizer, loss="mse", jit_compile=jit)
        target = np.zeros((spec["batch"], 128), "float32")
        pairs = repeated((x_q, target))
    else:
        model = KeyForward(model.encoder_k, model.head_k)
        model.compile(jit_compile=jit)
        # A tuple: Keras takes a generator's batches as (inputs,) tuples.
        pairs = repeated((x_k,))

    class Timer(keras.callbacks.Callback):
        """Seconds from the end of the warm-up batches to the last batch."""

        def __init__(self, warmup, total):
            super().__init__()
            self.warmup, self.total = warmup, total
            self.start = self.seconds = None

        def _batch_end(self, batch, logs):
            if batch + 1 not in (self.warmup, self.total):
                return
            # Wait for the step's results: JAX, TF and CUDA run
            # asynchronously.
            keras.tree.map_structure(keras.ops.convert_to_numpy, logs)
            now = time.perf_counter()
            if batch + 1 == self.warmup:
                self.start = now
            if batch + 1 == self.total:
                self.seconds = now - self.start

        def on_train_begin(self, logs=None):
            self.start = time.perf_counter()

        on_predict_begin = on_train_begin

        def on_train_batch_end(self, batch, logs=None):
            self._batch_end(batch, logs)

        def on_predict_batch_end(self, batch, logs=None):
            self._batch_end(batch, logs)

    def steps(count, warmup=0):
        """Runs warmup + count steps; returns the seconds of the last count.

        One `fit` (or `predict`) call for both: a second call can cost a
        fixed set-up (on JAX, variables move in and out of the compiled
        state at each call's start and end), which is not the step's speed.
        `fit`, not `train_on_batch`: on JAX, train_on_batch moves every
        variable back to Keras after each call.
        """
        timer = Timer(warmup, warmup + count)
        if part == "keys":
            model.predict(
                pairs, steps=warmup + count, verbose=0, callbacks=[timer]
            )
        else:
            model.fit(
                pairs,
                steps_per_epoch=warmup + count,
                epochs=1,
                verbose=0,
                shuffle=False,
                callbacks=[timer],
            )
        return timer.seconds

    steps.model = model
    return steps


def repeated(batch):
    """One in-memory batch over and over, for `fit` and `predict`.

    On TensorFlow a `tf.data` dataset; elsewhere a generator of the batch
    converted once to the backend's tensors, which sit on its default
    device (the GPU where there is one), so no step copies from the host
    and no TensorFlow is needed.
    """
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.data.Dataset.from_tensors(batch).repeat()
    batch = keras.tree.map_structure(keras.ops.convert_to_tensor, batch)

    def forever():
        while True:
            yield batch

    return forever()


def _rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args):
    spec = model_spec(args)
    # The frameworks alone, before any model: what the step adds is apart.
    if args.config.startswith("torch-plain"):
        import torch  # noqa: F401
    else:
        import keras  # noqa: F401

        import moco_keras  # noqa: F401

        if keras.backend.backend() == "tensorflow":
            import tensorflow  # noqa: F401
    import_mib = _rss_mib()
    bf16 = args.config.endswith("-bf16")
    if args.config.startswith("torch-plain"):
        step = torch_step_fn(args.model, spec, args.threads, args.part, bf16)
    else:
        step = keras_step_fn(
            args.model,
            spec,
            args.threads,
            args.config == "tensorflow-xla",
            args.part,
            bf16,
            "channels_last" if args.config == "torch-nhwc" else None,
        )
    seconds = step(args.steps, warmup=args.warmup)
    print(
        json.dumps(
            {
                "images_per_s": args.steps * spec["batch"] / seconds,
                "peak_mib": _rss_mib(),
                "import_mib": import_mib,
            }
        )
    )


def model_spec(args):
    """The model's settings, with `--batch` (smoke runs) applied."""
    return {
        **MODELS[args.model],
        **({"batch": args.batch} if args.batch else {}),
    }


def _backend(config):
    """The KERAS_BACKEND a configuration runs under."""
    if config.startswith("torch-plain"):
        return "torch"
    return config.split("-")[0]


def measure(args, cores, config, part):
    """One measurement in a fresh subprocess pinned to the same cores."""
    env = {
        **os.environ,
        "KERAS_BACKEND": _backend(config),
        "PYTHONPATH": os.path.dirname(
            os.path.dirname(os.path.abspath(__file__))
        ),
    }
    if config.startswith("tensorflow"):
        # TensorFlow's oneDNN kernels: its own default (on only where the
        # CPU has AVX-512), whatever the caller's environment says, except
        # for "tensorflow-onednn", which turns them on.
        env.pop("TF_ENABLE_ONEDNN_OPTS", None)
        if config.endswith("-onednn"):
            env["TF_ENABLE_ONEDNN_OPTS"] = "1"
    command = [
        "taskset",
        "-c",
        ",".join(map(str, cores[: args.threads])),
        sys.executable,
        os.path.abspath(__file__),
        f"--model={args.model}",
        f"--config={config}",
        f"--part={part}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--batch={args.batch}",
        f"--threads={args.threads}",
    ]
    out = subprocess.run(
        command, env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"{config} ({part}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(args, results):
    """The tables: speed and memory per config, then the step's parts."""
    spec = model_spec(args)
    lines = [
        f"MoCo v2 train step, {args.model}, batch {spec['batch']}, "
        f"{spec['size']} px, K {spec['queue']}, split BN {spec['splits']}, "
        f"{args.threads} threads, {args.runs} rounds of {args.steps} steps",
        "",
        "| config | img/s min | median | max | vs torch-plain "
        "| peak MiB | imports MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    median = {
        key: float(np.median([r["images_per_s"] for r in runs]))
        for key, runs in results.items()
    }
    base = median.get(("torch-plain", "step"))
    for (config, part), runs in results.items():
        if part != "step":
            continue
        speed = np.array([r["images_per_s"] for r in runs])
        ratio = f"{median[config, part] / base:.2f}" if base else "-"
        lines.append(
            f"| {config} | {speed.min():.1f} | {np.median(speed):.1f} "
            f"| {speed.max():.1f} | {ratio} "
            f"| {max(r['peak_mib'] for r in runs):.0f} "
            f"| {max(r['import_mib'] for r in runs):.0f} |"
        )
    parts = [part for part in args.parts.split(",") if part != "step"]
    if parts:
        # Milliseconds per batch from the medians; what is left of the step
        # after the query side and the key forward is MoCo's own work.
        lines += [
            "",
            "| config | step ms | supervised ms | keys ms | rest ms |",
            "|---|---|---|---|---|",
        ]
        for config in args.configs.split(","):
            ms = {
                part: 1000 * spec["batch"] / median[config, part]
                for part in PARTS
                if (config, part) in median
            }
            if len(ms) < len(PARTS):
                continue
            rest = ms["step"] - ms["supervised"] - ms["keys"]
            lines.append(
                f"| {config} | {ms['step']:.0f} | {ms['supervised']:.0f} "
                f"| {ms['keys']:.0f} | {rest:.0f} |"
            )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="cifar18")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma list of {CONFIGS + BF16_CONFIGS + LAYOUT_CONFIGS}",
    )
    parser.add_argument(
        "--parts",
        default="step",
        help=f"comma list of {PARTS}: also time the step's parts apart",
    )
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--batch", type=int, default=0, help="override the model's batch"
    )
    parser.add_argument("--output", help="also write the tables here (md)")
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--part", default="step", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    args.threads = args.threads or len(cores)
    if args.config:
        return worker(args)
    for name, given, known in (
        ("config", args.configs, CONFIGS + BF16_CONFIGS + LAYOUT_CONFIGS),
        ("part", args.parts, PARTS),
    ):
        unknown = set(given.split(",")) - set(known)
        if unknown:
            parser.error(f"unknown {name}(s) {sorted(unknown)}; known: {known}")
    if "step" not in args.parts.split(","):
        args.parts = "step," + args.parts
    results = {
        (config, part): []
        for config in args.configs.split(",")
        for part in args.parts.split(",")
    }
    for _ in range(args.runs):
        # Alternate every configuration within a round: a shared machine's
        # slow minutes then fall on all of them.
        for key in results:
            results[key].append(measure(args, cores, *key))
    text = report(args, results)
    print(text)
    tables.write(args.output, f"train_step_{args.model}", text)


if __name__ == "__main__":
    main()
