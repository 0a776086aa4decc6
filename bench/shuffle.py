"""Data order at ImageNet's size: classes per batch, and what an order costs.

    KERAS_BACKEND=tensorflow python bench/shuffle.py --output=shuffle.md

ImageNet's training folders are sorted by class (1000 classes, 1,281,167
images). For a class-sorted path list of that size, and of the 100 x 400
folder the issue was found on, this measures the distinct classes in the
batches of 256 of one epoch's order:

- "buffer": `shuffle(10_000)` over the sorted list, the usual tf.data
  recipe;
- "permutation": `datasets.permutation`, a uniform permutation of all
  indices per epoch, what the pipeline (`views.epoch_indices`) reads;
- "uniform": the exact expectation for batches drawn at random without
  replacement.

and the time and peak memory (RSS) of building the Source of the paths and
of one epoch's order (the pipeline's batches of indices). Nothing is read
from disk: the paths are names only.
"""

import argparse
import resource
import time

import numpy as np
import tables


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def uniform_classes(sizes, batch):
    sizes = np.asarray(sizes, np.float64)
    total, steps = sizes.sum(), np.arange(batch)
    absent = np.log((total - sizes[:, None] - steps) / (total - steps))
    return float(np.sum(1 - np.exp(absent.sum(1))))


def classes_per_batch(labels, order, batch):
    usable = len(order) // batch * batch
    batches = labels[np.asarray(order[:usable])].reshape(-1, batch)
    counts = np.array([len(np.unique(row)) for row in batches])
    return counts[:100].mean(), counts.mean()


def measure(name, sizes, batch, buffer):
    import tensorflow as tf

    from moco_keras import datasets
    from moco_keras import views

    labels = np.repeat(np.arange(len(sizes)), sizes)
    paths = [
        f"/data/train/n{label:08d}/n{label:08d}_{i}.JPEG"
        for i, label in enumerate(labels)
    ]
    rss, start = peak_mib(), time.perf_counter()
    source = datasets.Source(paths, labels, range(len(sizes)), encoded=True)
    source_cost = (time.perf_counter() - start, peak_mib() - rss)
    rss, start = peak_mib(), time.perf_counter()
    permutation = views.epoch_indices(
        source.num_examples, batch, seed=0, epoch=0
    )
    order_cost = (time.perf_counter() - start, peak_mib() - rss)
    permutation = permutation.ravel()
    rows = []
    rows.append(("permutation", *classes_per_batch(labels, permutation, batch)))
    buffered = tf.data.Dataset.range(len(labels)).shuffle(
        buffer, seed=0, reshuffle_each_iteration=False
    )
    buffered = next(iter(buffered.batch(len(labels)))).numpy()
    rows.append(
        (f"buffer {buffer}", *classes_per_batch(labels, buffered, batch))
    )
    expected = uniform_classes(sizes, batch)
    rows.append(("uniform", expected, expected))
    return {
        "name": name,
        "images": len(labels),
        "classes": len(sizes),
        "rows": rows,
        "source": source_cost,
        "order": order_cost,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--buffer", type=int, default=10_000)
    parser.add_argument("--output", help="also write the table here (md)")
    args = parser.parse_args()
    imagenet = np.full(1000, 1281)
    imagenet[:167] += 1
    results = [
        measure("folder 100 x 400", [400] * 100, args.batch, args.buffer),
        measure("ImageNet train", imagenet, args.batch, args.buffer),
    ]
    lines = [
        f"Distinct classes per batch of {args.batch}, class-sorted lists",
        "",
        "| list | order | first 100 batches | whole epoch |",
        "|---|---|---|---|",
    ]
    for result in results:
        for order, first, whole in result["rows"]:
            lines.append(
                f"| {result['name']} ({result['images']:,} images) "
                f"| {order} | {first:.1f} | {whole:.1f} |"
            )
    lines += [
        "",
        "| list | Source of the paths: s, peak RSS + MiB "
        "| an epoch's order: s, peak RSS + MiB |",
        "|---|---|---|",
    ]
    for result in results:
        lines.append(
            f"| {result['name']} | {result['source'][0]:.2f} s, "
            f"+{result['source'][1]:.0f} MiB | {result['order'][0]:.3f} s, "
            f"+{result['order'][1]:.0f} MiB |"
        )
    text = "\n".join(lines)
    print(text)
    tables.write(args.output, "shuffle", text)


if __name__ == "__main__":
    main()
