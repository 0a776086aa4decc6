"""`python -m MODULE ARGS...` with `import tensorflow` blocked, as on a host
without TensorFlow (tests/test_recipes.py):

    python tests/scripts/without_tensorflow.py moco_keras.recipes.pretrain \
        --flagfile=recipes/smoke.flags --workdir=/tmp/smoke
"""

import runpy
import sys

# Before anything imports it: `import tensorflow` raises ImportError, and
# `importlib.util.find_spec("tensorflow")` finds nothing.
sys.modules["tensorflow"] = None

if __name__ == "__main__":
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
