"""The Colab notebooks of `colab/`, executed headless with small parameters.

Each notebook runs top to bottom in a fresh Jupyter kernel (nbclient) under
the suite's Keras backend, with a cell of small parameters injected after
its `parameters` cell (papermill's convention, so `papermill -p` works on
them too); any error fails the test. Then a number the notebook printed is
checked: not only that it ran, but that it learned or reproduced something.
"""

import glob
import os
import re

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))


def run_notebook(name, tmp_path, **parameters):
    """Executes colab/`name` in `tmp_path`; returns (notebook, printed text)."""
    notebook = nbformat.read(os.path.join(ROOT, "colab", name), as_version=4)
    tagged = [
        i
        for i, cell in enumerate(notebook.cells)
        if "parameters" in cell.metadata.get("tags", [])
    ]
    assert len(tagged) == 1, f"{name}: expected one cell tagged 'parameters'"
    injected = nbformat.v4.new_code_cell(
        "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    )
    injected.metadata["tags"] = ["injected-parameters"]
    notebook.cells.insert(tagged[0] + 1, injected)
    # The kernel inherits this environment, KERAS_BACKEND included.
    NotebookClient(
        notebook,
        timeout=900,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()
    printed = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream"
    )
    return notebook, printed


def images_shown(notebook):
    return sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


def number(pattern, text):
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in the notebook's output:\n{text[-3000:]}"
    return found.groups()


def test_committed_notebooks_are_stripped_and_open_as_colab_asks():
    assert [os.path.basename(path) for path in NOTEBOOKS] == [
        "01_quickstart.ipynb",
        "02_linear_eval_and_export.ipynb",
        "03_your_own_images.ipynb",
    ]
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        cells = notebook.cells
        assert (
            cells[0].cell_type == "markdown" and "**Time.**" in cells[0].source
        )
        assert "google.colab" in cells[1].source  # the install cell
        assert "parameters" in cells[2].metadata.get("tags", [])
        for cell in cells:
            if cell.cell_type == "code":
                assert cell.outputs == [], f"{path}: outputs not stripped"
                assert cell.execution_count is None, path


@pytest.mark.slow
# At this size (64 steps) whether the trained encoder's kNN beats the random
# one's depends on the seed (the random one is measured with BN's initial
# moving statistics, which training alone moves), so "trained beats random"
# is not checked. What 64 steps do learn is MoCo's pretext task: the loss
# falls below ln(K+1) and the instance accuracy rises far above chance. That
# is checked, and that the kNN evaluation and the neighbour grids ran.
@pytest.mark.process
@pytest.mark.backends("tensorflow")
def test_quickstart_notebook_learns(tmp_path):
    notebook, printed = run_notebook(
        "01_quickstart.ipynb",
        tmp_path,
        EPOCHS=1,
        TRAIN_LIMIT=8192,
        WIDTH=8,
        BATCH_SIZE=128,
        LEARNING_RATE=0.12,
        QUEUE_SIZE=1024,
        KNN_BANK=5000,
        KNN_TEST=1000,
    )
    loss, chance_loss, acc1, chance = map(
        float,
        number(
            r"MoCo loss ([\d.]+) \(ln\(K\+1\) = ([\d.]+) before learning\), "
            r"acc1 ([\d.]+) % \(chance ([\d.]+) %\)",
            printed,
        ),
    )
    assert chance_loss == pytest.approx(np.log(1025), abs=1e-3)
    assert loss < chance_loss - 0.7, printed[-3000:]
    assert acc1 > 50 * chance, printed[-3000:]
    trained, random = map(
        float,
        number(
            r"kNN top-1: trained ([\d.]+) % \| random init ([\d.]+)", printed
        ),
    )
    # Far above chance (10 %): the bank, labels and features line up.
    assert trained > 40 and random > 40, printed[-3000:]
    # The curves and the two neighbour grids, shown and saved.
    assert images_shown(notebook) == 3
    for name in ("moco.keras", "curves.png", "neighbours_trained.png"):
        assert (tmp_path / "moco_quickstart" / name).stat().st_size > 0


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.backends("tensorflow")
def test_linear_eval_and_export_notebook(tmp_path):
    # No quick start checkpoint in tmp_path: the notebook pretrains one with
    # the pretraining recipe, then reads the newest checkpoint of its workdir.
    _, printed = run_notebook(
        "02_linear_eval_and_export.ipynb",
        tmp_path,
        PRETRAIN_FLAGS=[
            "--train_limit=512",
            "--epochs=1",
            "--batch_size=128",
            "--moco_k=512",
            "--width=4",
            "--knn_every=0",  # the notebook reads no kNN
        ],
        LINEAR_EPOCHS=3,
        LINEAR_TRAIN=4096,
    )
    assert "No checkpoint at moco_quickstart/moco.keras" in printed
    assert (tmp_path / "moco_pretrain" / "checkpoints").is_dir()
    top1, top5 = map(
        float, number(r"linear top-1 ([\d.]+) %, top-5 ([\d.]+) %", printed)
    )
    assert 10 < top1 <= top5 <= 100  # above chance; top-5 holds top-1
    rows, dim, difference = number(
        r"SavedModel features: \((\d+), (\d+)\), "
        r"max \|difference\| from Keras: (\S+)",
        printed,
    )
    assert (int(rows), int(dim)) == (64, 32)  # width 4 -> 32 features
    assert float(difference) < 1e-4


def official_v2_checkpoint(path):
    """A MoCo v2 checkpoint as `main_moco.py` writes it (narrow ResNet-50)."""
    from torch_checkpoints import TorchResNet
    from torch_checkpoints import official_state
    from torch_checkpoints import save_official
    from torch_checkpoints import v2_head

    q = TorchResNet(50, width=8, head=v2_head, seed=1)
    k = TorchResNet(50, width=8, head=v2_head, seed=2)
    queue = np.random.default_rng(0).normal(size=(128, 64)).astype("float32")
    save_official(str(path), official_state(q, k, queue, ptr=16))


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.backends("torch")
def test_own_images_notebook_converts_and_retrieves(tmp_path):
    official_v2_checkpoint(tmp_path / "moco_v2.pth.tar")
    notebook, printed = run_notebook(
        "03_your_own_images.ipynb",
        tmp_path,
        CHECKPOINT=str(tmp_path / "moco_v2.pth.tar"),
        SAMPLES_PER_CLASS=3,
        IMAGE_SIZE=64,
    )
    assert "Converted" in printed and "Offline" not in printed
    assert (tmp_path / "converted" / "mocov2_800ep" / "model.keras").is_file()
    assert "30 images in 10 folders of sample_images" in printed
    # The own_images preset's rules for the folder, and its command.
    assert "For 30 images of 64 px, batch 256:" in printed
    assert "moco_k 256: at most a quarter" in printed
    assert "pretrain --preset=own_images --data_dir=ROOT --image_size=64" in (
        printed
    )
    assert number(r"features: \((\d+), (\d+)\)", printed) == ("30", "256")
    precision, chance = map(
        float, number(r"own folder: ([\d.]+) % \(chance: ([\d.]+) %\)", printed)
    )
    assert 0 <= precision <= 100 and chance == 10.0
    assert images_shown(notebook) == 1
    assert (tmp_path / "retrieval.png").stat().st_size > 0


@pytest.mark.process
@pytest.mark.backends("tensorflow")
def test_own_images_notebook_offline_says_so_and_still_runs(tmp_path):
    # A refused connection, as a machine without internet gets, at once.
    _, printed = run_notebook(
        "03_your_own_images.ipynb",
        tmp_path,
        CHECKPOINT_URL="http://127.0.0.1:9/moco_v2_800ep_pretrain.pth.tar",
        SAMPLES_PER_CLASS=2,
        IMAGE_SIZE=32,
    )
    assert "Offline: the official checkpoint could not be downloaded" in printed
    assert "Set CHECKPOINT to a local copy" in printed
    assert number(r"features: \((\d+), (\d+)\)", printed) == ("20", "2048")
