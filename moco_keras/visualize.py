"""Pictures of what an encoder learned: nearest-neighbour grids.

The figures are `matplotlib.figure.Figure` objects made without pyplot, so
they leave the caller's matplotlib state alone: a script saves one with
`figure.savefig(path)`, a notebook shows it with `display(figure)` once
`%matplotlib inline` has registered the image formatter.
"""

import numpy as np


def _displayable(image):
    """uint8 or float `H x W x C` / `H x W` -> what `imshow` shows right."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.dtype != np.uint8:
        low, high = float(image.min()), float(image.max())
        image = (image - low) / max(high - low, 1e-12)
    return image


def neighbor_grid(
    query_images,
    bank_images,
    indices,
    query_labels=None,
    bank_labels=None,
    class_names=None,
    title=None,
    cell_size=1.2,
):
    """A figure of query images (first column) and their neighbours.

    With labels, each neighbour's frame is green when its label is the
    query's and red when not, and the label left of the query counts the
    matches ("3/5").

    Args:
        query_images: `Q` images (uint8 or float, `H x W`, `H x W x 1` or
            `H x W x 3`).
        bank_images: the images that `indices` point into.
        indices: `Q x k` int indices into `bank_images`, nearest first
            (`knn.nearest_neighbors`).
        query_labels: optional int labels of the query images.
        bank_labels: optional int labels of the bank images.
        class_names: optional names shown under the query images.
        title: optional figure title.
        cell_size: inches per image.

    Returns:
        A `matplotlib.figure.Figure`.

    Example:

    ```python
    indices = knn.nearest_neighbors(query_features, bank_features, k=5)
    figure = visualize.neighbor_grid(queries, bank, indices)
    figure.savefig("neighbours.png")
    ```
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    indices = np.asarray(indices)
    if indices.ndim != 2 or len(indices) != len(query_images):
        raise ValueError(
            f"indices must be Q x k with Q = {len(query_images)} (one row per "
            f"query image). Received shape {indices.shape}."
        )
    labelled = query_labels is not None and bank_labels is not None
    rows, k = indices.shape
    figure = Figure(figsize=(cell_size * (k + 1.3), cell_size * rows + 0.6))
    axes = figure.subplots(rows, k + 1, squeeze=False)
    for row in range(rows):
        query_axis = axes[row, 0]
        query_axis.imshow(_displayable(query_images[row]), cmap="gray")
        if labelled and class_names is not None:
            query_axis.set_xlabel(
                str(class_names[query_labels[row]]), fontsize=7
            )
        if labelled:
            matches = sum(
                int(bank_labels[j] == query_labels[row]) for j in indices[row]
            )
            query_axis.set_ylabel(f"{matches}/{k}", fontsize=8)
        for column, j in enumerate(indices[row], start=1):
            axis = axes[row, column]
            image = _displayable(bank_images[j])
            axis.imshow(image, cmap="gray")
            if labelled:
                color = (
                    "tab:green"
                    if bank_labels[j] == query_labels[row]
                    else "tab:red"
                )
                height, width = image.shape[:2]
                axis.add_patch(
                    Rectangle(
                        (-0.5, -0.5),
                        width,
                        height,
                        fill=False,
                        edgecolor=color,
                        linewidth=3,
                    )
                )
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
        for spine in axis.spines.values():
            spine.set_visible(False)
    axes[0, 0].set_title("query", fontsize=9)
    for column in range(1, k + 1):
        axes[0, column].set_title(f"#{column}", fontsize=9)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure
