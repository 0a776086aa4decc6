"""Runs that survive being killed: checkpoints, resume, loss checks, curves.

A run is a directory. `Checkpointer` writes `ckpt-<global step>.keras`
files into it (every epoch, and every N steps if asked), each written under
a temporary name and renamed, so a file with a checkpoint's name is always
whole. `fit_resumable` trains epoch by epoch and, when the directory already
holds checkpoints, first loads the newest one: weights, key encoder, queue,
pointer, optimizer slots and step (hence the schedule's position) and the
model's random state; the data of epoch `e` is a function of `(seed, e)`,
and the batches already done in that epoch are skipped, so a resumed run
sees what the uninterrupted run would have seen.
"""

import contextlib
import csv
import math
import os
import re
import shutil
import tempfile

import keras
from absl import logging
from keras import ops

_CHECKPOINT = re.compile(r"^ckpt-(\d{9})\.keras$")


def checkpoint_path(directory, step):
    return os.path.join(directory, f"ckpt-{step:09d}.keras")


def list_checkpoints(directory):
    """`[(global step, path), ...]` of the whole checkpoints, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _CHECKPOINT.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(directory, name)))
    return sorted(found)


def latest_checkpoint(directory):
    """`(path, global step)` of the newest checkpoint, or `(None, 0)`."""
    found = list_checkpoints(directory)
    if not found:
        return None, 0
    step, path = found[-1]
    return path, step


def save_atomically(model, path):
    """`model.save(path)` under a temporary name, synced, then renamed.

    A run killed mid-save leaves at most a `.tmp-*` file, never a broken
    checkpoint under a checkpoint's name; a full disk raises with the
    earlier checkpoints intact.
    """
    directory, name = os.path.split(path)
    temporary = os.path.join(directory, f".tmp-{os.getpid()}-{name}")
    try:
        model.save(temporary)
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _global_step(model):
    return int(ops.convert_to_numpy(model.optimizer.iterations))


class Checkpointer(keras.callbacks.Callback):
    """Saves the whole training state to `directory` as it trains.

    Args:
        directory: where `ckpt-<global step>.keras` files go.
        steps_per_epoch: optimizer steps in one epoch.
        every_steps: also save every this many steps (0: epoch ends only).
        keep: how many of the newest checkpoints to keep.
        keep_every_epochs: also keep the end of every this-many-th epoch
            (0: none beyond `keep`).
        chief: whether this process writes the checkpoints. Under a
            multi-worker strategy every worker must save at the same steps
            (saving reads variables that the workers reduce together), so
            the others (`chief=False`) save into a temporary directory that
            is deleted at once, as TensorFlow's multi-worker guide does.
    """

    def __init__(
        self,
        directory,
        steps_per_epoch,
        every_steps=0,
        keep=3,
        keep_every_epochs=0,
        chief=True,
    ):
        super().__init__()
        if keep < 1:
            raise ValueError(f"keep must be >= 1. Received: keep={keep}")
        self.directory = directory
        self.steps_per_epoch = steps_per_epoch
        self.every_steps = every_steps
        self.keep = keep
        self.keep_every_epochs = keep_every_epochs
        self.chief = chief
        self._saved_step = None
        if not chief:
            return
        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(directory):
            if name.startswith(".tmp-"):  # left by a run killed mid-save
                os.remove(os.path.join(directory, name))

    def on_train_batch_end(self, batch, logs=None):
        if self.every_steps:
            step = _global_step(self.model)
            if step % self.every_steps == 0:
                self.save(step)

    def on_epoch_end(self, epoch, logs=None):
        self.save(_global_step(self.model))

    def save(self, step):
        # Every process must take the same decision: under JAX with several
        # processes a save is a collective (Keras creates variables in it),
        # so a process that skips one while the others save deadlocks them.
        # The step of an epoch's end is often saved already by
        # `every_steps`.
        if step == self._saved_step:
            return
        self._saved_step = step
        if not self.chief:
            scratch = tempfile.mkdtemp(prefix="moco-keras-worker-")
            try:
                self.model.save(checkpoint_path(scratch, step))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            return
        save_atomically(self.model, checkpoint_path(self.directory, step))
        self._prune()

    def _keeps_forever(self, step):
        if not self.keep_every_epochs or step % self.steps_per_epoch:
            return False
        return (step // self.steps_per_epoch) % self.keep_every_epochs == 0

    def _prune(self):
        found = list_checkpoints(self.directory)
        for step, path in found[: -self.keep]:
            if not self._keeps_forever(step):
                os.remove(path)


class LossWatch(keras.callbacks.Callback):
    """Stops a run whose loss is not finite; warns, once each, when the
    loss or the features say that the run is not learning.

    A NaN or infinite loss raises `FloatingPointError` naming the step (the
    checkpoints written before it stay: put this callback before the
    `Checkpointer`). At the end of each epoch, from its means:

    - the loss within 1 % of ln(K + 1), the loss of guessing among the
      K + 1 keys: nothing is being learned (lr, temperature, data);
    - collapse: `q_std` (`MoCo(health=True)`) below a tenth of
      1/sqrt(dim), the spread of features over the whole sphere: the
      queries map every image to nearly the same point;
    - a plateau: neither `alignment` nor `uniformity` improved by 0.01 over
      `patience` epochs while the lr is at least half its peak.

    Each warning is logged once per run, with what to try.

    Args:
        queue_size: K, for the ln(K + 1) check; None to skip it.
        patience: epochs without improvement before the plateau warning.
    """

    def __init__(self, queue_size=None, patience=5):
        super().__init__()
        self.queue_size = queue_size
        self.patience = patience
        self._epoch = 0
        self._warned = set()
        self._best = {}  # measure -> (best value, epoch it was reached)
        self._peak_lr = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"The loss became {loss} at global step "
                f"{_global_step(self.model)} (epoch {self._epoch + 1}, "
                f"batch {batch + 1}). Training stopped; the checkpoints "
                "written before it are kept. Lower the learning rate, or "
                "check the data for broken images."
            )

    def _warn_once(self, kind, message, *args):
        if kind in self._warned:
            return
        self._warned.add(kind)
        logging.warning(message, *args)

    def _learning_rate(self):
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            return None
        return float(ops.convert_to_numpy(optimizer.learning_rate))

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.queue_size is not None and "loss" in logs:
            chance = math.log(self.queue_size + 1)
            loss = float(logs["loss"])
            if abs(loss - chance) < 0.01 * chance:
                self._warn_once(
                    "chance",
                    "Epoch %d: the loss %.4f sits at ln(K+1) = %.4f, the loss "
                    "of guessing among the K+1 keys: nothing is being "
                    "learned. Check the learning rate, the temperature and "
                    "the data.",
                    epoch + 1,
                    loss,
                    chance,
                )
        dim = getattr(self.model, "dim", None)
        if "q_std" in logs and dim:
            spread = 1.0 / math.sqrt(dim)
            if float(logs["q_std"]) < 0.1 * spread:
                self._warn_once(
                    "collapse",
                    "Epoch %d: the features collapse: their standard "
                    "deviation per dimension is %.2g, under a tenth of "
                    "1/sqrt(dim) = %.3f (features spread over the sphere). "
                    "The encoder maps every image to nearly one point. Try "
                    "stronger augmentation (--aug_plus, a smaller crop "
                    "scale), a lower --lr, a temperature of 0.2, and check "
                    "that the views differ (views/pairs in TensorBoard).",
                    epoch + 1,
                    float(logs["q_std"]),
                    spread,
                )
        self._check_plateau(epoch, logs)

    def _check_plateau(self, epoch, logs):
        lr = self._learning_rate()
        if lr is None or not {"alignment", "uniformity"} <= set(logs):
            return
        self._peak_lr = max(self._peak_lr, lr)
        stalled = []
        for name in ("alignment", "uniformity"):
            value = float(logs[name])
            best, when = self._best.get(name, (math.inf, epoch))
            if value < best - 0.01:
                self._best[name] = (value, epoch)
            else:
                self._best[name] = (best, when)
            stalled.append(epoch - self._best[name][1] >= self.patience)
        if all(stalled) and lr >= 0.5 * self._peak_lr:
            self._warn_once(
                "plateau",
                "Epoch %d: neither alignment (%.3f) nor uniformity (%.3f) "
                "improved by 0.01 in %d epochs, and the lr (%.3g) is still "
                "at least half its peak: the run may be stuck. Try a lower "
                "--lr, a larger --batch_size, or check the augmentation; "
                "a run that learns sees both fall while its lr is high.",
                epoch + 1,
                float(logs["alignment"]),
                float(logs["uniformity"]),
                self.patience,
                lr,
            )


class ScoreLog(keras.callbacks.Callback):
    """Prints the validation top-1 / top-5 of each epoch, as main_lincls.py.

    ` * Epoch 3: Acc@1 61.234 Acc@5 83.456` (percent) on stdout and in the
    absl log, from the epoch's `val_acc1` / `val_acc5`; an epoch without
    them prints nothing.
    """

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if "val_acc1" not in logs:
            return
        line = (
            f" * Epoch {epoch + 1}: Acc@1 {100 * logs['val_acc1']:.3f} "
            f"Acc@5 {100 * logs.get('val_acc5', float('nan')):.3f}"
        )
        print(line)
        logging.info(line)


class StepLog(keras.callbacks.Callback):
    """TensorBoard scalars every N steps, and the first batch's view pairs.

    Keras' `TensorBoard` callback writes the epoch means; a user checking
    that a run learns looks at the loss, acc1 and the learning rate as they
    move within an epoch, and at the augmented views. This writes
    `step/loss`, `step/acc1` (and every other number in the step's logs)
    and `step/lr` every `every_steps` global steps into `log_dir/train`,
    and, once at the start, `views/pairs`: a grid with the query view of
    each of the first `pairs` images beside its key view (each image
    rescaled to its own min and max for display).

    Args:
        log_dir: the run's TensorBoard directory.
        every_steps: int, global steps between scalar writes.
        views: optional `(view_q, view_k)` batch to show, or None.
        pairs: int, how many pairs of the batch the grid shows.
    """

    def __init__(self, log_dir, every_steps=10, views=None, pairs=8):
        super().__init__()
        if every_steps < 1:
            raise ValueError(
                f"`every_steps` must be >= 1. Received: {every_steps!r}"
            )
        self.log_dir = log_dir
        self.every_steps = every_steps
        self.views = views
        self.pairs = pairs
        self._writer = None

    def _summary_writer(self):
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(
                os.path.join(self.log_dir, "train")
            )
        return self._writer

    def on_train_begin(self, logs=None):
        if self.views is None:
            return
        import tensorflow as tf

        grid = view_pair_grid(*self.views, pairs=self.pairs)  # H x W x C
        with self._summary_writer().as_default():
            tf.summary.image(
                "views/pairs", grid[None], step=_global_step(self.model)
            )
        self.views = None  # once per run, not after each resumed epoch

    def on_train_batch_end(self, batch, logs=None):
        step = _global_step(self.model)
        if step % self.every_steps:
            return
        import tensorflow as tf

        with self._summary_writer().as_default():
            for name, value in (logs or {}).items():
                tf.summary.scalar(f"step/{name}", float(value), step=step)
            optimizer = self.model.optimizer
            lr = ops.convert_to_numpy(optimizer.learning_rate)
            tf.summary.scalar("step/lr", float(lr), step=step)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()


def view_pair_grid(view_q, view_k, pairs=8):
    """`pairs` rows of (query view | key view), as one float32 image in
    [0, 1]: `pairs * H x 2 * W x C`."""
    import numpy as np

    rows = []
    for q, k in zip(view_q[:pairs], view_k[:pairs], strict=True):
        cells = []
        for image in (q, k):
            image = np.asarray(ops.convert_to_numpy(image), "float32")
            low, high = image.min(), image.max()
            cells.append((image - low) / max(high - low, 1e-6))
        rows.append(np.concatenate(cells, axis=1))
    return np.concatenate(rows, axis=0)


class CurvePlot(keras.callbacks.Callback):
    """Redraws a PNG of every metric in a CSV log at each epoch end.

    Put it after the `keras.callbacks.CSVLogger` that writes `csv_path`.
    """

    def __init__(self, csv_path, png_path, title=""):
        super().__init__()
        self.csv_path, self.png_path, self.title = csv_path, png_path, title

    def on_epoch_end(self, epoch, logs=None):
        plot_csv(self.csv_path, self.png_path, self.title)


def read_csv_log(path):
    """`{column: [float, ...]}` of a CSVLogger file ({} if there is none)."""
    if not os.path.exists(path):
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = {}
    for row in rows:
        for key, value in row.items():
            try:
                columns.setdefault(key, []).append(float(value))
            except (TypeError, ValueError):
                columns.setdefault(key, []).append(float("nan"))
    return columns


def truncate_csv_log(path, epochs):
    """Keeps the rows of the first `epochs` epochs (a resumed run rewrites
    the rest)."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    kept = [row for row in body if row and int(row[0]) < epochs]
    temporary = path + ".tmp"
    with open(temporary, "w", newline="") as f:
        csv.writer(f).writerows([header, *kept])
    os.replace(temporary, path)


def plot_csv(csv_path, png_path, title=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = read_csv_log(csv_path)
    epochs = [e + 1 for e in columns.pop("epoch", [])]
    if not epochs:
        return
    # Columns that hold a number (Keras' CSVLogger adds empty val_ ones).
    names = [
        n
        for n in columns
        if n != "learning_rate" and any(math.isfinite(v) for v in columns[n])
    ]
    if not names:
        return
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False
    )
    for ax, name in zip(axes.flat, names, strict=False):
        ax.plot(epochs, columns[name], marker="o")
        ax.set(xlabel="epoch", title=name)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    temporary = png_path + ".tmp.png"
    fig.savefig(temporary, dpi=90)
    plt.close(fig)
    os.replace(temporary, png_path)


def fit_resumable(
    model,
    epoch_dataset,
    epochs,
    steps_per_epoch,
    directory,
    callbacks=(),
    csv_path=None,
    verbose="auto",
    validation_data=None,
):
    """Trains to `epochs`, resuming from the newest checkpoint in `directory`.

    Args:
        model: a compiled model (a `Checkpointer` in `callbacks` saves it).
        epoch_dataset: `f(epoch, skip_batches)` -> the batches of `epoch`
            from batch `skip_batches` on (grain, or what `model.fit`
            takes), the same for the same arguments.
        epochs: total epochs of the run.
        steps_per_epoch: batches per epoch.
        directory: the checkpoint directory.
        callbacks: Keras callbacks, given to every `fit` call.
        csv_path: a CSVLogger file to cut back to the resumed epoch.
        verbose: `fit`'s verbosity.
        validation_data: evaluated after every epoch (`fit`'s argument):
            `val_*` metrics in the logs.

    Returns:
        The global step the run started from (0 for a fresh run).
    """
    path, step = latest_checkpoint(directory)
    if path is not None:
        # The optimizer's slots are variables of the model's tf.distribute
        # strategy, if any (only the TensorFlow trainer has one).
        strategy = getattr(model, "distribute_strategy", None)
        with strategy.scope() if strategy else contextlib.nullcontext():
            if not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
            model.load_weights(path)
        logging.info("Resumed from %s (global step %d).", path, step)
        print(f"Resuming from {path} (global step {step})")
    start_epoch, skip = divmod(step, steps_per_epoch)
    validation_steps = None
    if validation_data is not None and not isinstance(validation_data, tuple):
        # Keras counts a grain dataset's batches only by running out of
        # them, and warns then ("Your input ran out of data").
        try:
            validation_steps = len(validation_data)
        except TypeError:  # a dataset of unknown length
            pass
    if csv_path is not None:
        truncate_csv_log(csv_path, start_epoch)
    for epoch in range(start_epoch, epochs):
        if skip:
            print(
                f"Epoch {epoch + 1}/{epochs}: resuming at batch {skip + 1} "
                f"of {steps_per_epoch}"
            )
        # One `fit` per epoch, each on that epoch's own dataset (chaining
        # the epochs into one dataset costs minutes to build for hundreds
        # of epochs), told the run's epoch count for progress bars and
        # callbacks and stopped after its one epoch.
        stopper = _StopAfterOneEpoch()
        model.fit(
            epoch_dataset(epoch, skip),
            initial_epoch=epoch,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch - skip,
            callbacks=[*callbacks, stopper],
            verbose=verbose,
            shuffle=False,  # each epoch's dataset is already shuffled
            validation_data=validation_data,
            validation_steps=validation_steps,
        )
        skip = 0
        if stopper.asked_by_others:
            break
    return step


class _StopAfterOneEpoch(keras.callbacks.Callback):
    """Ends `fit` after one epoch; notes whether another callback (listed
    before it) had asked to stop the run."""

    def __init__(self):
        super().__init__()
        self.asked_by_others = False

    def on_epoch_end(self, epoch, logs=None):
        self.asked_by_others = bool(self.model.stop_training)
        self.model.stop_training = True
