"""MoCo.fit on arrays, a PyDataset and a torch DataLoader with TensorFlow's
import blocked (tests/test_moco.py): prints the steps and the queue pointer.
Then the grain path (`moco_keras.views`): an image folder of JPEGs and
Fashion-MNIST as sources, their uint8 two-view batches into `fit` with the
colour half in the model; prints its steps.
"""

import os
import sys

# Before anything imports it: `import tensorflow` raises ImportError.
sys.modules["tensorflow"] = None

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import moco_keras  # noqa: E402, F401 - the whole package imports
from moco_keras import MoCo  # noqa: E402
from moco_keras import color  # noqa: E402
from moco_keras import datasets  # noqa: E402
from moco_keras import encoders  # noqa: E402
from moco_keras import views  # noqa: E402

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
    print("grain steps", fit_through_grain())


def fit_through_grain():
    """Two epochs of 2 batches of 8 from a JPEG folder, one of Fashion-MNIST."""
    import tempfile

    from PIL import Image

    rng = np.random.default_rng(0)
    config = views.get_augmentation("mocov2", size=8)
    with tempfile.TemporaryDirectory() as root:
        for name in ("a", "b"):
            os.makedirs(os.path.join(root, name))
            for index in range(8):
                pixels = rng.integers(0, 256, (20, 24, 3), np.uint8)
                Image.fromarray(pixels).save(f"{root}/{name}/{index}.jpg")
        folder = datasets.image_folder(root)
        model = MoCo(
            encoders.cifar_resnet18(
                width=2, bn_splits=2, input_shape=(8, 8, 3)
            ),
            dim=8,
            queue_size=32,
            augmentation=color.ColorAugmentation.from_augmentation(config),
            seed=0,
        )
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        for epoch in range(2):
            batches = views.two_view_batches(folder, config, 8, epoch=epoch)
            model.fit(batches, verbose=0)
    fmnist = datasets.fashion_mnist("train", limit=16)
    model.fit(views.two_view_batches(fmnist, config, 8), verbose=0)
    return int(model.optimizer.iterations.numpy())


if __name__ == "__main__":
    main()
