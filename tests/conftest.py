"""The suite's tiers and set-up; the shared helpers are in `support.py`.

The suite is backend-agnostic: run it with KERAS_BACKEND=tensorflow, jax or
torch (`make test` runs all three). Two tiers:

- in-process tests (tiny, fast) run under every backend, except a test of
  one backend's own machinery (tf.distribute, JAX's data parallel), which
  carries `@pytest.mark.backends(...)`, and a test of the data code alone,
  where no backend enters (`support.data_only`: the torch suite's);
- process tests (`@pytest.mark.process`: a recipe, notebook, benchmark or
  command in a fresh Python, seconds to minutes each) must name the
  backend(s) where they run with `backends(...)`: each runs once, under the
  backend whose code path it is there to check.

A test deselected under a backend is not skipped: `make test` runs it under
its own. Tests that share a module-scoped fixture (one smoke run, one
generated folder) carry `@pytest.mark.xdist_group(NAME)`, so that `make
test`'s `--dist loadgroup` runs them in one process and builds it once.
"""

import atexit
import os
import shutil
import tempfile

# XLA's CPU compiler at LLVM -O0 under the JAX backend: the suite's programs
# are tiny and run for a few steps, so compiling is most of their time, and
# -O0 halves it (the smoke pretraining recipe: 128 s -> 64 s, same loss).
# Set before JAX starts its backend; subprocesses inherit it.
os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0"
).strip()

# Each test process's share of the cores as its thread count (1 for
# `make test`'s 2 processes on 2 cores), in it and the programs it starts:
# torch's OpenMP threads spin while they wait, so two processes of 2
# threads each on 2 cores spend much of their time spinning.
_threads = str(
    max(
        1,
        len(os.sched_getaffinity(0))
        // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")),
    )
)
for _name in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
    os.environ.setdefault(_name, _threads)

# One persistent JAX compilation cache for the suite's run: its workers and
# the processes they start inherit the folder, so a train step that several
# tests build alike (the same tiny model) is compiled once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
        prefix="moco-keras-jax-cache-"
    )
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    atexit.register(
        shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True
    )

# TensorFlow's oneDNN kernels, as `import moco_keras` turns them on: here
# `import keras` imports TensorFlow first, and TensorFlow's own default
# depends on the CPU (off on an AVX2 AMD EPYC, where the channels-first
# encoders' NCHW convolutions then have no CPU kernel).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import keras  # noqa: E402
import pytest  # noqa: E402

# Programs the process tests start (`python tests/scripts/NAME.py`), not
# modules for pytest to import: one blocks TensorFlow's import at its top.
collect_ignore = ["scripts"]


def pytest_collection_modifyitems(config, items):
    backend = keras.backend.backend()
    selected, deselected = [], []
    for item in items:
        marker = item.get_closest_marker("backends")
        if item.get_closest_marker("process") and marker is None:
            raise pytest.UsageError(
                f"{item.nodeid} is marked `process` (it starts a fresh "
                "Python) but names no backend: add "
                "@pytest.mark.backends(...) with the backend(s) whose code "
                "path it checks, so that `make test` runs it once, not "
                "under all three backends."
            )
        if marker is None or backend in marker.args:
            selected.append(item)
        else:
            deselected.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    # The process tests first: each takes seconds to minutes, the
    # in-process ones about a second, so under `--dist loadgroup` the two
    # test processes start on the long ones and even out on the short ones
    # (the same order in every process, as pytest-xdist requires).
    selected.sort(key=lambda item: item.get_closest_marker("process") is None)
    items[:] = selected


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)
    yield
    keras.backend.clear_session()
