"""MoCo.fit on arrays, a PyDataset and a torch DataLoader with TensorFlow's
import blocked (tests/test_moco.py): prints the steps and the queue pointer.
"""

import sys

# Before anything imports it: `import tensorflow` raises ImportError.
sys.modules["tensorflow"] = None

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import moco_keras  # noqa: E402, F401 - the whole package imports
from moco_keras import MoCo  # noqa: E402
from moco_keras import encoders  # noqa: E402

VIEWS = np.random.default_rng(0).random((2, 16, 8, 8, 3), "float32")


class Pairs(keras.utils.PyDataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        rows = slice(8 * index, 8 * index + 8)
        return VIEWS[0, rows], VIEWS[1, rows]


def main():
    tensors = [torch.from_numpy(view) for view in VIEWS]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*tensors), batch_size=8
    )
    encoder = encoders.cifar_resnet18(
        width=2, bn_splits=2, input_shape=(8, 8, 3)
    )
    model = MoCo(encoder, dim=8, queue_size=40, seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    for data in ((VIEWS[0], VIEWS[1]), (Pairs(),), (loader,)):
        model.fit(*data, batch_size=8 if len(data) == 2 else None, verbose=0)
    steps = int(model.optimizer.iterations.numpy())
    print("steps", steps, "ptr", int(model.queue_ptr.numpy()))


if __name__ == "__main__":
    main()
