r"""The test suite's time on a clean clone, as CI runs it, per backend.

    python bench/suite.py [--output=BENCHMARKS.md] [--log=suite.log]

Clones the repository's HEAD into a temporary folder and runs
`CI=true bash .ci/run` there with no standard input (the venv, the pip
installs and the lint included), timing the whole command; reads each
backend's pytest summary and its slowest tests from the output. Keep the
machine otherwise idle while it runs.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _minutes(seconds):
    return f"{int(seconds // 60)} min {round(seconds % 60):02d} s"


def parse(log):
    """{backend: {"summary", "seconds", "slowest": [(seconds, test)]}} of a
    `make test` output."""
    backends = {}
    current = None
    for line in log.splitlines():
        found = re.match(r"=== KERAS_BACKEND=(\w+)", line)
        if found:
            current = backends.setdefault(
                found.group(1), {"summary": "", "seconds": 0.0, "slowest": []}
            )
            continue
        if current is None:
            continue
        found = re.match(
            r"^=+ (.*(?:passed|failed|error).*) in ([\d.]+)s", line
        )
        if found:
            current["summary"] = found.group(1)
            current["seconds"] = float(found.group(2))
            continue
        found = re.match(r"^([\d.]+)s (?:call|setup|teardown)\s+(\S+)", line)
        if found:
            current["slowest"].append((float(found.group(1)), found.group(2)))
    return backends


def report(backends, total, code):
    lines = [
        "| stage | time | tests |",
        "|---|---|---|",
    ]
    tiers = sum(b["seconds"] for b in backends.values())
    lines.append(
        f"| venv, pip installs, lint, Fashion-MNIST | {_minutes(total - tiers)}"
        " | |"
    )
    for name, backend in backends.items():
        time_taken = _minutes(backend["seconds"])
        lines.append(f"| {name} | {time_taken} | {backend['summary']} |")
    lines.append(f"| total, exit code {code} | {_minutes(total)} | |")
    lines += ["", "The slowest tests of each backend:", ""]
    for name, backend in backends.items():
        slowest = ", ".join(
            f"`{test.split('::')[-1]}` {seconds:.0f} s"
            for seconds, test in backend["slowest"][:5]
        )
        lines.append(f"- {name}: {slowest}.")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", help="also write the table here (md)")
    parser.add_argument("--log", help="keep the run's whole output here")
    args = parser.parse_args()
    clone = tempfile.mkdtemp(prefix="moco-keras-suite-")
    try:
        subprocess.run(["git", "clone", "-q", ROOT, clone], check=True)
        environment = {**os.environ, "CI": "true"}
        environment.pop("KERAS_BACKEND", None)
        started = time.monotonic()
        run = subprocess.run(
            ["bash", ".ci/run"],
            cwd=clone,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
        )
        total = time.monotonic() - started
    finally:
        shutil.rmtree(clone, ignore_errors=True)
    if args.log:
        with open(args.log, "w") as f:
            f.write(run.stdout)
    text = report(parse(run.stdout), total, run.returncode)
    print(text)
    if run.returncode == 0:
        tables.write(args.output, "suite", text)
    else:
        print(run.stdout[-5000:])
    sys.exit(run.returncode)


if __name__ == "__main__":
    main()
