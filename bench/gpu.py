r"""The MoCo v2 step on one accelerator, per Keras backend, against PyTorch.

    python bench/gpu.py [--output=bench/results/gpu.md]   # make bench-gpu
    python bench/gpu.py --tiny --configs=jax-fp32,jax-bf16  # CPU, seconds

On one GPU (or, with `--tiny`, on the CPU at a toy size), for ResNet-50 at
224 px with the MoCo v2 head and K = 65536, it measures one whole training
step (query forward and backward, momentum update, shuffled key forward,
loss, SGD, enqueue) at the papers' per-GPU batch (32) and at the largest
batch that fits, up to 256 (halved until it fits: the sizes follow the
GPU's memory). Configurations, each in a fresh subprocess with its own
KERAS_BACKEND:

- `torch-plain-fp32` / `torch-plain-bf16`: the official step in plain
  PyTorch (`bench/torch_moco.py`), float32, and `torch.autocast(bfloat16)`
  with channels-last memory format, the fast setting PyTorch users run;
- `jax-*` (the step under `jit`), `torch-*`, `tensorflow-*` and
  `tensorflow-xla-*` (`jit_compile=True`): this package's `MoCo` through
  `model.fit`, in float32 and under Keras' `mixed_bfloat16` policy.

A backend that is not installed is skipped with a message; so the step
part runs on a host with only JAX and PyTorch (no TensorFlow): its batches
come from memory, resident on the device. The table gives pairs/s, step
time and peak memory (the GPU's allocator peak; the process's peak RSS on
the CPU) per configuration and batch, and the ratio to plain PyTorch in
the same precision at the same batch.

Then the input pipeline, where grain is installed (skipped with a message
elsewhere): pairs/s of MoCo v2 views from ImageNet-sized JPEGs, the
pipeline's CPU half (`views.two_view_batches`: PIL decode, crop, resize,
flip; uint8 out, the colour half runs in the model) in one grain worker
process per core, beside what the fastest step above consumes, and the
cores per accelerator it needs to keep up.

`--budget_s` (default 420) stops starting new configurations once spent,
so that the whole run stays inside a lease of a few minutes.
"""

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = (
    "torch-plain-fp32",
    "torch-plain-bf16",
    "jax-fp32",
    "jax-bf16",
    "torch-fp32",
    "torch-bf16",
    "tensorflow-fp32",
    "tensorflow-bf16",
    "tensorflow-xla-fp32",
    "tensorflow-xla-bf16",
)
# ResNet-50, MoCo v2 at the papers' size; `--tiny` for the CPU and the suite:
# a narrow CIFAR ResNet-18, whose 20 convolutions trace and compile in a
# fraction of ResNet-50's 53 (the script's mechanics, not its numbers).
FULL = dict(
    model="resnet50",
    size=224,
    width=64,
    queue=65536,
    splits=1,
    batches=(32, 256),
)
TINY = dict(
    model="cifar18", size=32, width=8, queue=256, splits=1, batches=(4, 8)
)
MODEL_NAMES = {"resnet50": "ResNet-50", "cifar18": "CIFAR ResNet-18"}
# What a framework raises when the device runs out of memory.
OOM_MARKERS = (
    "out of memory",
    "RESOURCE_EXHAUSTED",
    "OOM",
    "ResourceExhausted",
)


def backend_of(config):
    """The KERAS_BACKEND a configuration runs under."""
    if config.startswith("torch"):
        return "torch"
    return config.split("-")[0]


def installed(config):
    """Whether the configuration's frameworks are importable here."""
    needs = {"torch": ["torch"], "jax": ["jax"], "tensorflow": ["tensorflow"]}
    names = needs[backend_of(config)]
    if not config.startswith("torch-plain"):
        names = names + ["keras"]
    return all(importlib.util.find_spec(name) for name in names)


# --- One configuration, in its own process --------------------------------


def _peak_mib(backend):
    """The device allocator's peak, or the process's peak RSS on a CPU."""
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20, "gpu"
    elif backend == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform != "cpu":
            return device.memory_stats()["peak_bytes_in_use"] / 2**20, "gpu"
    elif backend == "tensorflow":
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            info = tf.config.experimental.get_memory_info("GPU:0")
            return info["peak"] / 2**20, "gpu"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss"


def _reset_peak(backend):
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    elif backend == "tensorflow":
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            tf.config.experimental.reset_memory_stats("GPU:0")


def _device_name(backend):
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    elif backend == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform != "cpu":
            return device.device_kind
    elif backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            return tf.config.experimental.get_device_details(gpus[0]).get(
                "device_name", "GPU"
            )
    return "CPU"


def _step_fn(config, spec, batch, threads):
    import train_step

    bf16 = config.endswith("-bf16")
    model_spec = {**spec, "batch": batch}
    if config.startswith("torch-plain"):
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return train_step.torch_step_fn(
            spec["model"],
            model_spec,
            threads,
            bf16=bf16,
            device=device,
            channels_last=bf16,
        )
    import keras

    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy("float32")
    return train_step.keras_step_fn(
        spec["model"],
        model_spec,
        threads,
        jit=config.startswith("tensorflow-xla"),
        bf16=bf16,
    )


def worker(args):
    """Measures one configuration at each batch; prints one JSON line."""
    backend = backend_of(args.config)
    if backend == "tensorflow":
        import tensorflow as tf

        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    spec = TINY if args.tiny else FULL
    threads = len(os.sched_getaffinity(0))
    results = []
    small, large = spec["batches"]
    for target in (small, large):
        batch = target
        while True:
            _reset_peak(backend)
            try:
                steps = _step_fn(args.config, spec, batch, threads)
                seconds = steps(args.steps, warmup=args.warmup)
                break
            # Each framework raises its own error type for out-of-memory.
            except Exception as error:  # noqa: BLE001
                if not any(m in str(error) for m in OOM_MARKERS) or (
                    batch <= small
                ):
                    raise
                batch //= 2  # too large for this device: halve, try again
            finally:
                steps = None
        peak, kind = _peak_mib(backend)
        results.append(
            {
                "batch": batch,
                "pairs_per_s": args.steps * batch / seconds,
                "step_ms": 1000 * seconds / args.steps,
                "peak_mib": peak,
                "memory": kind,
            }
        )
    print(json.dumps({"device": _device_name(backend), "results": results}))


# --- The input pipeline ---------------------------------------------------


def pipeline_rates(seconds, files, tiny):
    """Pairs/s of the pipeline's CPU half, one grain worker per core.

    The JPEGs are cut from scikit-image's real photos; `tiny` (the suite,
    which does not install scikit-image) makes do with a synthetic one, and
    reads in this process (grain's workers take longer to start than the
    suite's second of reading).
    """
    import pipeline

    photos = None
    if tiny and not importlib.util.find_spec("skimage"):
        ramp = np.linspace(0, 255, 600, dtype="float32")
        photos = [
            np.stack([ramp[None, :] + 0 * ramp[:450, None]] * 3, -1).astype(
                "uint8"
            )
        ]
    with tempfile.TemporaryDirectory() as root:
        pipeline.make_jpegs(root, files, photos=photos)
        workers = 0 if tiny else len(os.sched_getaffinity(0))
        half = pipeline.run_grain(root, seconds, workers)
    return {"half": half, "workers": workers}


# --- The driver -----------------------------------------------------------


def measure(args, config):
    env = {
        **os.environ,
        "KERAS_BACKEND": backend_of(config),
        "PYTHONPATH": ROOT,
        # The peak JAX reports is what the step uses, not a preallocation.
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    }
    command = [
        sys.executable,
        os.path.abspath(__file__),
        f"--config={config}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
    ] + (["--tiny"] if args.tiny else [])
    out = subprocess.run(
        command, env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"{config} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(args, results, skipped, rates):
    spec = TINY if args.tiny else FULL
    devices = sorted({r["device"] for r in results.values()})
    lines = [
        f"MoCo v2 step, {MODEL_NAMES[spec['model']]} (width {spec['width']}), "
        f"{spec['size']} px, "
        f"K {spec['queue']}, on {', '.join(devices) or '-'}; "
        f"{args.steps} steps after {args.warmup} of warm-up",
        "",
        "| config | batch | pairs/s | step ms | vs plain PyTorch | peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    for config, result in results.items():
        precision = config.rsplit("-", 1)[1]
        base = results.get(f"torch-plain-{precision}")
        for index, row in enumerate(result["results"]):
            ratio = "-"
            reference = base["results"][index] if base else None
            if reference and reference["batch"] == row["batch"]:
                ratio = f"{row['pairs_per_s'] / reference['pairs_per_s']:.2f}"
            memory = "" if row["memory"] == "gpu" else " (RSS)"
            lines.append(
                f"| {config} | {row['batch']} | {row['pairs_per_s']:.1f} "
                f"| {row['step_ms']:.1f} | {ratio} "
                f"| {row['peak_mib']:.0f}{memory} |"
            )
    for config, why in skipped.items():
        lines.append(f"| {config} | - | - | - | - | skipped: {why} |")
    lines.append("")
    if rates is None:
        lines.append(
            "Input pipeline: skipped, grain is not installed here (the "
            "pipeline needs it)."
        )
    else:
        # The cores that read: one per grain worker, or the training
        # process's one.
        cores = rates["workers"] or 1
        where = (
            f"one grain worker per core ({cores})"
            if rates["workers"]
            else "in the training process (1 core)"
        )
        fastest = max(
            (
                row["pairs_per_s"]
                for r in results.values()
                for row in r["results"]
            ),
            default=0.0,
        )
        lines += [
            f"Input pipeline, MoCo v2 views of 500 x 375 JPEGs at 224 px, "
            f"{where}:",
            "",
            "| path | pairs/s | per core | cores to feed the fastest step "
            f"({fastest:.0f} pairs/s) |",
            "|---|---|---|---|",
        ]
        per_core = rates["half"] / cores
        need = f"{fastest / per_core:.1f}" if fastest else "-"
        lines.append(
            f"| CPU half | {rates['half']:.1f} | {per_core:.1f} | {need} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"comma list of {CONFIGS}"
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--tiny", action="store_true", help="a toy size for the CPU (the suite)"
    )
    parser.add_argument("--budget_s", type=float, default=420.0)
    parser.add_argument(
        "--pipeline_seconds",
        type=float,
        default=15.0,
        help="seconds per pipeline path; 0 skips the pipeline part",
    )
    parser.add_argument("--pipeline_files", type=int, default=256)
    parser.add_argument("--output", help="also write the table here (md)")
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.config:
        return worker(args)
    configs = args.configs.split(",")
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown config(s) {sorted(unknown)}; known: {CONFIGS}")
    start = time.monotonic()
    results, skipped = {}, {}
    for config in configs:
        if not installed(config):
            skipped[config] = f"{backend_of(config)} is not installed"
        elif time.monotonic() - start > args.budget_s:
            skipped[config] = f"over the {args.budget_s:.0f} s budget"
        else:
            results[config] = measure(args, config)
            row = results[config]["results"][-1]
            print(
                f"[{time.monotonic() - start:5.0f} s] {config}: "
                f"{row['pairs_per_s']:.1f} pairs/s at batch {row['batch']}",
                flush=True,
            )
    rates = None
    if args.pipeline_seconds > 0 and importlib.util.find_spec("grain"):
        rates = pipeline_rates(
            args.pipeline_seconds, args.pipeline_files, args.tiny
        )
    text = report(args, results, skipped, rates)
    print(text)
    devices = {r["device"] for r in results.values() if r.get("device")}
    tables.write(
        args.output, "gpu", text, gpu=", ".join(sorted(devices)) or None
    )


if __name__ == "__main__":
    main()
