"""Loads an exported SavedModel with TensorFlow alone and saves its features
(tests/test_export.py): `load_export.py EXPORTED IMAGES.npy FEATURES.npy`."""

import json
import sys

import numpy as np
import tensorflow as tf


def main():
    extractor = tf.saved_model.load(sys.argv[1])
    images = tf.constant(np.load(sys.argv[2]))
    features = extractor.signatures["serving_default"](images=images)[
        "features"
    ]
    np.save(sys.argv[3], features.numpy())
    print(
        json.dumps(sorted(m for m in sys.modules if m.startswith("moco_keras")))
    )


if __name__ == "__main__":
    main()
