"""The quick start with MoCo v2 and with MoCo v3, one after the other in one
job: kNN, linear probe and time on Fashion-MNIST.

Each preset (`quickstart`, `quickstart_mocov3`) runs as `make demo` runs
the quick start, `python -m moco_keras.recipes.quickstart --preset=NAME`, in
a process of its own and a fresh workdir, and the table takes its
`results.json`: the kNN top-1 of the trained backbone and of its head, the
linear probe's top-1, the same for the random initialisation, and the
whole command's wall time.

    KERAS_BACKEND=torch python bench/quickstart_v3.py --output=BENCHMARKS.md
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ("quickstart", "quickstart_mocov3")


def run(preset, workdir, extra):
    started = time.time()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "moco_keras.recipes.quickstart",
            f"--preset={preset}",
            f"--workdir={workdir}",
            *extra,
        ],
        cwd=ROOT,
        check=True,
        stdin=subprocess.DEVNULL,
    )
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    return results, config, time.time() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=None)
    parser.add_argument(
        "--presets", default=",".join(PRESETS), help="comma-separated"
    )
    parser.add_argument(
        "extra", nargs="*", help="flags for both runs, after --"
    )
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for preset in args.presets.split(","):
            workdir = os.path.join(directory, preset)
            results, config, seconds = run(preset, workdir, args.extra)
            method = "MoCo v3" if "mlp_dim" in config["model"] else "MoCo v2"
            rows.append(
                f"| {preset} | {method} | {config['schedule']['epochs']} | "
                f"{results['knn_top1_trained']:.2f} % | "
                f"{results['knn_top1_head_trained']:.2f} % | "
                f"{results['linear_top1_trained']:.2f} % | "
                f"{results['knn_top1_random']:.2f} % / "
                f"{results['linear_top1_random']:.2f} % | "
                f"{seconds / 60:.1f} |"
            )
            print(rows[-1], flush=True)
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    text = "\n".join(
        [
            f"The quick start on the {backend} backend, each preset in its own "
            "process; kNN k 200, t 0.1, the 60k training images as the bank, "
            "the 10k test images; linear: the probe of the frozen backbone.",
            "",
            "| preset | method | epochs | kNN | kNN head | linear | random "
            "init: kNN / linear | minutes |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(text)
    if args.output:
        tables.write(args.output, "quickstart_v3", text)


if __name__ == "__main__":
    main()
