r"""The quick start's hyper-parameter search: kNN top-1 against minutes.

    python bench/quickstart_search.py \
        --trials=s28-e3n16,r18-s28-e5n60-crop50-t20 \
        --out=bench/results/quickstart_search.csv

Each trial is the `fmnist_moco_v2` preset (`learning.QUICKSTART`;
`make demo` runs the winner, the `quickstart` preset) with a few values
changed (`TRIALS`),
run in a process of its own: `pretraining.pretrain` into a fresh workdir, then
the kNN top-1 of its trained backbone as `make demo` scores it (k 200, t 0.1,
the 60k training images as the bank, the 10k test images). One row a trial
is appended to `--out`: the values, the pretraining seconds (kNN monitor
included), the evaluation seconds and the kNN. Raw pixels score 78.85 % on
the same protocol. The random encoder and the linear probe are left to
`make demo`: they do not depend on the trial's training values.
"""

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time

# name: values over the old quickstart preset (a width-16 CIFAR ResNet-18
# at 32 px, 4 epochs of 20k images, crop_min 0.2, T 0.1). "s28": views of
# 28 px (crops of the 32 x 32 zero-padded image, resized); "e3n16": 3 epochs
# of 16k images; "r18": torchvision's stem; "crop50": crop_min 0.5.
_S28 = {"image_size": 28}
_E3N16 = {"epochs": 3, "train_limit": 16000}
_E5N30 = {"epochs": 5, "train_limit": 30000}
_E5N60 = {"epochs": 5, "train_limit": 60000}
_R18S28 = {"arch": "resnet18", **_S28}
TRIALS = {
    "preset": {},
    "s28": _S28,
    "s28-e3n16": {**_S28, **_E3N16},
    "s28-e3n16-crop50": {**_S28, **_E3N16, "crop_min": 0.5},
    "s28-e3n16-crop50-t20": {
        **_S28,
        **_E3N16,
        "crop_min": 0.5,
        "moco_t": 0.2,
    },
    "s28-e3n16-crop50-b128": {
        **_S28,
        **_E3N16,
        "crop_min": 0.5,
        "batch_size": 128,
    },
    "s28-e3n16-crop50-lr2x": {
        **_S28,
        **_E3N16,
        "crop_min": 0.5,
        "lr": 0.12,
    },
    "s28-e3n16-crop35": {**_S28, **_E3N16, "crop_min": 0.35},
    # torchvision's stem (7x7 stride 2, max pool): 1/16 of the CIFAR stem's
    # compute at one size, so several times the pairs in the same time.
    "r18-s56-e5n30": {"arch": "resnet18", "image_size": 56, **_E5N30},
    "r18-s56-e5n30-crop50": {
        "arch": "resnet18",
        "image_size": 56,
        **_E5N30,
        "crop_min": 0.5,
    },
    "r18-s28-e5n60-crop50": {**_R18S28, **_E5N60, "crop_min": 0.5},
    "r18-s28-e5n60-crop50-t20": {
        **_R18S28,
        **_E5N60,
        "crop_min": 0.5,
        "moco_t": 0.2,
    },
    "r18-s28-e5n60-crop35": {**_R18S28, **_E5N60, "crop_min": 0.35},
    "r18-s28-e5n60-crop50-lr2x": {
        **_R18S28,
        **_E5N60,
        "crop_min": 0.5,
        "lr": 0.12,
    },
    "r18-s28-e5n60-crop50-k16k": {
        **_R18S28,
        **_E5N60,
        "crop_min": 0.5,
        "moco_k": 16384,
    },
    "r18-s28-e5n60-crop50-t20-lr2x": {
        **_R18S28,
        **_E5N60,
        "crop_min": 0.5,
        "moco_t": 0.2,
        "lr": 0.12,
    },
    "r18-s56-e5n30-crop50-t20": {
        "arch": "resnet18",
        "image_size": 56,
        **_E5N30,
        "crop_min": 0.5,
        "moco_t": 0.2,
    },
    "r18-s28-e3n60-crop50-t20-w32": {
        **_R18S28,
        "epochs": 3,
        "train_limit": 60000,
        "crop_min": 0.5,
        "moco_t": 0.2,
        "width": 32,
    },
    "r18-s28-e5n60-crop50-w32": {
        **_R18S28,
        **_E5N60,
        "crop_min": 0.5,
        "width": 32,
    },
    "s28-e3n16-crop70": {**_S28, **_E3N16, "crop_min": 0.7},
}


def run_trial(name, workdir):
    """Pretrains and scores one trial in this process; its row as a dict."""
    import keras
    import learning

    from moco_keras import evaluation
    from moco_keras import pretraining
    from moco_keras.recipes import common

    overrides = TRIALS[name]
    values = common.with_flags(
        learning.QUICKSTART, workdir=workdir, verbose="2", **overrides
    )
    started = time.time()
    run = pretraining.pretrain(values)
    pretrain_seconds = time.time() - started
    started = time.time()
    trained = keras.saving.load_model(run["checkpoint"])
    scores = evaluation.knn_evaluation(values, {"trained": trained.encoder_q})
    return {
        "trial": name,
        "values": json.dumps(overrides, sort_keys=True),
        "pairs": values["epochs"] * values["train_limit"],
        "pretrain_s": round(pretrain_seconds, 1),
        "eval_s": round(time.time() - started, 1),
        "knn_top1": round(scores["trained"], 2),
        "backend": keras.backend.backend(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", default=",".join(TRIALS))
    parser.add_argument("--out", default="bench/results/quickstart_search.csv")
    parser.add_argument("--workdir", default="/tmp/quickstart_search")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:  # the child process of one trial
        print(json.dumps(run_trial(args.run, args.workdir)), flush=True)
        return
    names = args.trials.split(",")
    unknown = sorted(set(names) - set(TRIALS))
    if unknown:
        sys.exit(
            f"Unknown trials {unknown}; expected some of {sorted(TRIALS)}."
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for name in names:
        workdir = os.path.join(args.workdir, name)
        shutil.rmtree(workdir, ignore_errors=True)
        child = subprocess.run(
            [sys.executable, __file__, "--run", name, "--workdir", workdir],
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )
        row = json.loads(child.stdout.strip().splitlines()[-1])
        row["date"] = time.strftime("%Y-%m-%d %H:%M")
        new = not os.path.exists(args.out)
        with open(args.out, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
        print(row, flush=True)


if __name__ == "__main__":
    main()
