"""MoCo v1 and v2 (Momentum Contrast) for Keras 3."""

from moco_keras import encoders

# Registers the optimizer and schedules that the recipes' checkpoints hold,
# so that `keras.saving.load_model` reads them after `import moco_keras`.
from moco_keras import optimizers
from moco_keras.batch_norm import SplitBatchNormalization
from moco_keras.moco import MoCo
from moco_keras.presets import MOCOV1
from moco_keras.presets import MOCOV2
from moco_keras.presets import PRESETS

__version__ = "0.1.0"

__all__ = [
    "MOCOV1",
    "MOCOV2",
    "PRESETS",
    "MoCo",
    "SplitBatchNormalization",
    "encoders",
    "optimizers",
]
