"""A run in its workdir, as every protocol keeps it: the set-up of devices
and backend options, the workdir's files, the callbacks and `fit`.

A run lives in its workdir (`run.workdir`): `config.json` (the config it
started with, which `lincls` and `export` read back), `epochs.csv`,
`curves.png`, `tensorboard/`, `checkpoints/ckpt-<step>.keras` and
`results.json`. Calling the protocol again after the run died resumes it
from its newest checkpoint, mid-epoch included, provided the config differs
only in `configs.RESUMABLE` (`configs.check_resume`); a finished run only
reports. The config and its checks are `moco_keras.configs`, the data it
reads `moco_keras.sources`; a run of it is `moco_keras.pretraining`.
"""

import json
import logging
import os
import warnings

import keras

from moco_keras import distribute
from moco_keras import sources
from moco_keras import training
from moco_keras.configs import CONFIG_FILE
from moco_keras.configs import check
from moco_keras.configs import check_resume


def write_json_atomically(path, payload):
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    os.replace(temporary, path)


def set_up(config):
    """Devices and backend options of the config; the workdir's paths.

    Returns:
        `(paths, strategy)`: the workdir's subpaths, and the
        `tf.distribute` strategy to build the model in (None: none).
    """
    run = config["run"]
    check_resume(config)
    try:
        strategy = distribute.make_strategy(
            run["strategy"], cpu_devices=run["cpu_devices"]
        )
    except ValueError as error:
        check(False, str(error))
    if strategy is not None:
        # tf.distribute logs every collective it builds at INFO: hundreds
        # of lines per traced step, which would bury the progress bars.
        logging.getLogger("tensorflow").setLevel(logging.WARNING)
    if run["mixed_precision"]:
        keras.mixed_precision.set_dtype_policy(run["mixed_precision"])
    if run["deterministic"] and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
        if os.environ.get("TF_ENABLE_ONEDNN_OPTS") != "0":
            warnings.warn(
                "--deterministic with TensorFlow's oneDNN kernels on: runs "
                "can still differ in the last bits (seen on AVX2 CPUs). For "
                "bitwise-repeatable runs set TF_ENABLE_ONEDNN_OPTS=0 before "
                "starting.",
                stacklevel=2,
            )
    keras.utils.set_random_seed(run["seed"])
    workdir = run["workdir"]
    chief = distribute.is_chief(strategy)
    if chief:
        os.makedirs(workdir, exist_ok=True)
        write_json_atomically(os.path.join(workdir, CONFIG_FILE), config)
    paths = {
        "checkpoints": os.path.join(workdir, "checkpoints"),
        "csv": os.path.join(workdir, "epochs.csv"),
        "png": os.path.join(workdir, "curves.png"),
        "tensorboard": os.path.join(workdir, "tensorboard"),
        "results": os.path.join(workdir, "results.json"),
        # Under several workers only the chief writes files; the workdir
        # must be one storage that every worker reads (they all resume
        # from its checkpoints).
        "chief": chief,
    }
    return paths, strategy


def callbacks(
    paths,
    steps_per_epoch,
    config,
    title,
    extra=(),
    queue_size=None,
    views=None,
):
    """Loss watch, extra (e.g. kNN), CSV, curves, TensorBoard, checkpoints.

    TensorBoard gets the epoch means (Keras' callback, the kNN top-1
    included), every `run.log_every_steps` steps the step's numbers and
    the learning rate, and `views` (a `(view_q, view_k)` batch, optional)
    as an image grid (`training.StepLog`).

    The order matters: the loss check runs first so nothing is saved after
    a NaN; the CSV row is written before the checkpoint that ends the epoch.
    Workers other than the chief keep the loss check, `extra` and the
    checkpointer (which they must run in step with the chief) and write
    nothing.
    """
    run = config["run"]
    checkpointer = training.Checkpointer(
        paths["checkpoints"],
        steps_per_epoch,
        every_steps=run["checkpoint_steps"],
        keep=run["keep_checkpoints"],
        keep_every_epochs=run["keep_every_epochs"],
        chief=paths["chief"],
    )
    if not paths["chief"]:
        return [training.LossWatch(queue_size), *extra, checkpointer]
    logs = [
        keras.callbacks.CSVLogger(paths["csv"], append=True),
        training.CurvePlot(paths["csv"], paths["png"], title),
    ]
    if sources.tensorflow_available():
        logs += [
            keras.callbacks.TensorBoard(paths["tensorboard"]),
            training.StepLog(
                paths["tensorboard"], run["log_every_steps"], views=views
            ),
        ]
    else:
        # Keras' TensorBoard callback writes through tf.summary.
        print(
            "No TensorBoard logs: they are written through TensorFlow, "
            "which is not installed; epochs.csv and curves.png hold the "
            "curves."
        )
    return [training.LossWatch(queue_size), *extra, *logs, checkpointer]


def fit(
    model,
    epoch_dataset,
    config,
    steps_per_epoch,
    paths,
    callbacks,
    validation_data=None,
):
    """`training.fit_resumable` in the workdir; the start step back."""
    verbose = config["run"]["verbose"]
    return training.fit_resumable(
        model,
        epoch_dataset,
        config["schedule"]["epochs"],
        steps_per_epoch,
        paths["checkpoints"],
        callbacks=callbacks,
        csv_path=paths["csv"] if paths["chief"] else None,
        verbose=verbose if verbose == "auto" else int(verbose),
        validation_data=validation_data,
    )
