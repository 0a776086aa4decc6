"""MoCo v1 and v2 as plain dicts of `MoCo` constructor arguments.

The values are those of the papers and the official code
(facebookresearch/moco `main_moco.py`): v1 (arXiv 1911.05722) has a linear
head and temperature 0.07; v2 (arXiv 2003.04297) a 2-layer MLP head and
temperature 0.2. Both use 128-d features, a queue of 65536 keys and key
encoder momentum 0.999.
"""

MOCOV1 = {
    "dim": 128,
    "mlp": False,
    "queue_size": 65536,
    "momentum": 0.999,
    "temperature": 0.07,
}

MOCOV2 = {**MOCOV1, "mlp": True, "temperature": 0.2}

PRESETS = {"mocov1": MOCOV1, "mocov2": MOCOV2}
