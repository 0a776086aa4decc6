r"""Where one MoCo v2 training step spends its time, per op type.

    KERAS_BACKEND=tensorflow python bench/profile_step.py --model=resnet50
    python bench/profile_step.py --model=resnet50 --config=torch-plain

Profiles a few steps of `bench/train_step.py`'s step after a warm-up and
prints the op types by total self time: under TensorFlow with the TF
profiler (reading its trace needs `pip install xprof`), for the plain
PyTorch reference with `torch.profiler`. TensorFlow's times are summed over
the threads that ran ops (its inter-op pool runs independent ops at once),
torch's are wall time of its one eager stream: compare shares, not sums.
"""

import argparse
import collections
import glob
import json
import os
import tempfile

import train_step  # noqa: E402


def profile_tensorflow(args, spec):
    try:
        from xprof.convert import raw_to_tool_data
    except ImportError as error:
        raise SystemExit(
            "Reading the TensorFlow profile needs xprof: pip install xprof"
        ) from error
    import tensorflow as tf

    steps = train_step.keras_step_fn(args.model, spec, args.threads, False)
    steps(args.warmup)
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        steps(args.steps)
        tf.profiler.experimental.stop()
        (path,) = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
        data, _ = raw_to_tool_data.xspace_to_tool_data(
            [path], "framework_op_stats", {}
        )
    table = json.loads(data)
    table = table[0] if isinstance(table, list) else table
    columns = [column["id"] for column in table["cols"]]
    totals = collections.Counter()
    for row in table["rows"]:
        values = dict(zip(columns, [c.get("v") for c in row["c"]], strict=True))
        if values["type"] != "IDLE":
            totals[values["type"]] += values["total_self_time"] / 1000
    return totals


def profile_torch(args, spec):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile

    steps = train_step.torch_step_fn(args.model, spec, args.threads)
    steps(args.warmup)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        steps(args.steps)
    totals = collections.Counter()
    for event in prof.key_averages():
        totals[event.key] += event.self_cpu_time_total / 1000
    return totals


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", choices=sorted(train_step.MODELS), default="resnet50"
    )
    parser.add_argument(
        "--config", choices=("tensorflow", "torch-plain"), default="tensorflow"
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    args.threads = len(os.sched_getaffinity(0))
    spec = train_step.MODELS[args.model]
    if args.config == "tensorflow":
        if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
            raise SystemExit(
                "--config=tensorflow needs KERAS_BACKEND=tensorflow"
            )
        totals = profile_tensorflow(args, spec)
    else:
        totals = profile_torch(args, spec)
    total = sum(totals.values())
    print(
        f"{args.config}, {args.model}, {args.steps} steps, {args.threads} "
        f"threads: {total:.0f} ms of op self time"
    )
    print("| op type | ms | share |")
    print("|---|---|---|")
    for name, ms in totals.most_common(args.top):
        print(f"| {name} | {ms:.0f} | {100 * ms / total:.1f} % |")


if __name__ == "__main__":
    main()
