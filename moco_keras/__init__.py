"""MoCo v1, v2 and v3 (Momentum Contrast) for Keras 3."""

import os

# TensorFlow turns its oneDNN CPU kernels on by itself only on CPUs with
# AVX-512 and newer; on others (an AMD EPYC with AVX2) its training step is
# slower without them (BENCHMARKS.md, the training step's "tensorflow" and
# "tensorflow-onednn" rows). Where the user has not
# chosen, turn them on; TensorFlow reads the variable when it is imported,
# so this only acts if `import moco_keras` comes first (the recipes, the
# notebooks, the benchmarks). TF_ENABLE_ONEDNN_OPTS=0 turns them off.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from moco_keras import color  # noqa: E402
from moco_keras import encoders  # noqa: E402

# Registers the optimizer and schedules that the recipes' checkpoints hold,
# so that `keras.saving.load_model` reads them after `import moco_keras`.
from moco_keras import optimizers  # noqa: E402
from moco_keras import vits  # noqa: E402
from moco_keras.batch_norm import SplitBatchNormalization  # noqa: E402
from moco_keras.moco import MoCo  # noqa: E402
from moco_keras.mocov3 import MOCOV3_RESNET  # noqa: E402
from moco_keras.mocov3 import MOCOV3_VIT  # noqa: E402
from moco_keras.mocov3 import MoCoV3  # noqa: E402
from moco_keras.presets import MOCOV1  # noqa: E402
from moco_keras.presets import MOCOV2  # noqa: E402
from moco_keras.presets import PRESETS  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "MOCOV1",
    "MOCOV2",
    "MOCOV3_RESNET",
    "MOCOV3_VIT",
    "PRESETS",
    "MoCo",
    "MoCoV3",
    "SplitBatchNormalization",
    "color",
    "encoders",
    "optimizers",
    "vits",
]
