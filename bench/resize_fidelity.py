r"""How far `antialias=False` moves the views from the official ones.

    python bench/resize_fidelity.py [--files=64] [--views=8]

On ImageNet-sized JPEGs cut from real photos (`pipeline.make_jpegs`), draws
MoCo v2 crop windows (`augment.random_resized_crop_window`, scale 0.2-1) and
resizes each crop to 224 px three ways: PIL's bilinear resize (what
torchvision's RandomResizedCrop does to the official code's PIL images),
`augment._resize` as the package does it by default (antialiased where the
crop shrinks), and with `antialias=False`. Prints the share of views that
shrink and, for both of ours, the mean and 99th-percentile absolute
difference to PIL in levels of 255 and the PSNR.
"""

import argparse
import os
import tempfile

import numpy as np
import tables
import tensorflow as tf
from PIL import Image
from pipeline import make_jpegs

from moco_keras import augment


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--output", help="also write the table here (md)")
    args = parser.parse_args()
    config = augment.get_augmentation("mocov2")
    size = config["size"]
    errors = {"antialiased (default)": [], "--noantialias": []}
    shrinks = 0
    with tempfile.TemporaryDirectory() as root:
        folder = os.path.join(make_jpegs(root, args.files), "n00000000")
        for index, name in enumerate(sorted(os.listdir(folder))):
            image = np.asarray(Image.open(os.path.join(folder, name)))
            for view in range(args.views):
                top, left, h, w = augment.random_resized_crop_window(
                    image.shape,
                    tf.constant([index, view]),
                    config["scale"],
                    config["ratio"],
                ).numpy()
                crop = image[top : top + h, left : left + w]
                shrinks += h > size or w > size
                pil = np.asarray(
                    Image.fromarray(crop).resize((size, size), Image.BILINEAR),
                    np.float32,
                )
                floats = tf.constant(crop, tf.float32)
                for key, antialias in zip(errors, (True, False), strict=True):
                    ours = augment._resize(floats, size, antialias).numpy()
                    ours = np.clip(np.round(ours), 0, 255)
                    errors[key].append(np.abs(ours - pil).ravel())
    views = args.files * args.views
    lines = [
        f"{views} MoCo v2 views ({args.files} JPEGs ~500x375, {size} px); "
        f"{100 * shrinks / views:.0f} % of the crops shrink.",
        "",
        "| resize | mean abs diff to PIL | 99th pct | PSNR dB |",
        "|---|---|---|---|",
    ]
    for key, values in errors.items():
        diff = np.concatenate(values)
        psnr = 10 * np.log10(255.0**2 / max(np.mean(diff**2), 1e-12))
        lines.append(
            f"| {key} | {diff.mean():.2f} | {np.percentile(diff, 99):.0f} "
            f"| {psnr:.1f} |"
        )
    print("\n".join(lines))
    tables.write(args.output, "resize_fidelity", "\n".join(lines))


if __name__ == "__main__":
    main()
