"""Many devices and machines: strategies, and the collectives of the step.

`make_strategy` gives what `--strategy` names: a `tf.distribute` strategy
(TensorFlow backend: one replica per device, each with its slice of the
global batch) or a `keras.distribution.DataParallel` set for the process
(JAX backend: one program over the global batch, sharded over the devices).

Shuffle BN, across replicas or on one device, is written in one place,
`moco.shuffled_keys`; this module gives it the replica context, the gather
and the replica index, and gives `SplitBatchNormalization` the mean over
replicas. The tests hold each strategy to the one-device computation."""

import contextlib
import json
import os

import keras
from absl import logging

# `--strategy` values, by the backend that runs them.
STRATEGIES = {
    "none": ("tensorflow", "jax", "torch"),
    "mirrored": ("tensorflow",),
    "multi_worker": ("tensorflow",),
    "tpu": ("tensorflow",),
    "data_parallel": ("jax",),
}

# The Keras versions whose TensorFlow trainer `patch_keras_multi_worker`
# was tested against (tests/test_distribute.py runs two workers).
MULTI_WORKER_TESTED_KERAS = ("3.15.1",)


def replica_context():
    """The `tf.distribute` replica context of a multi-replica step, or None.

    None under the JAX and torch backends, outside a strategy, with one
    replica, and in the cross-replica context where Keras builds the model.
    """
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def num_replicas():
    """Replicas in sync of the current `tf.distribute` strategy (1 if none)."""
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


def all_gather(context, value):
    """`value` of every replica, concatenated on axis 0 (itself if no
    `context`): the gather of shuffle BN (`moco.shuffled_keys`)."""
    if context is None:
        return value
    import tensorflow as tf

    # all_gather of a dataset tensor fails under MultiWorkerMirroredStrategy
    # ("destinations can not be empty") unless it is first copied.
    return context.all_gather(tf.identity(value), axis=0)


def replica_id(context):
    """This replica's index in its `context` (0 without one)."""
    if context is None:
        return 0
    return context.replica_id_in_sync_group


def mean_over_replicas(context, value):
    """`value` averaged over the replicas (identical on every replica)."""
    return context.all_reduce("mean", value)


def check_strategy(name, backend=None):
    """Raises `ValueError` unless `name` runs on `backend` (default: now)."""
    backend = backend or keras.backend.backend()
    if name not in STRATEGIES:
        raise ValueError(
            f"Unknown strategy {name!r}: expected one of {sorted(STRATEGIES)}."
        )
    if backend not in STRATEGIES[name]:
        usable = [s for s, b in STRATEGIES.items() if backend in b]
        raise ValueError(
            f"Strategy {name!r} needs the {' or '.join(STRATEGIES[name])} "
            f"backend; this process runs {backend}, which offers {usable}. "
            f"Set KERAS_BACKEND={STRATEGIES[name][0]} or pick one of those."
        )


def use_cpu_devices(count, check=True):
    """Splits this machine's CPU into `count` devices (to test on a CPU).

    TensorFlow: `count` logical CPU devices, before its runtime starts. JAX:
    `--xla_force_host_platform_device_count`, before its backend starts
    (`check=False` leaves the check of the count to the caller, for a
    process that must call `jax.distributed.initialize` first).
    Call it before anything runs on a device.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        (cpu,) = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * count
        )
    elif backend == "jax":
        flag = f"--xla_force_host_platform_device_count={count}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}"
        import jax

        jax.config.update("jax_platforms", "cpu")
        if check:
            _check_local_devices(count)
    else:
        raise ValueError(f"No CPU devices to split under {backend}.")


def _check_local_devices(count):
    import jax

    if len(jax.local_devices()) != count:
        flag = f"--xla_force_host_platform_device_count={count}"
        raise RuntimeError(
            f"Asked for {count} CPU devices, JAX has {jax.local_devices()}: "
            "its backend had started before. Set XLA_FLAGS="
            f"{flag} in the environment instead."
        )


def is_multi_process():
    """Whether `KERAS_DISTRIBUTION_*` describe a job of several processes
    (one per host) for `--strategy=data_parallel`."""
    addresses = os.environ.get("KERAS_DISTRIBUTION_JOB_ADDRESSES", "")
    processes = os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES")
    if processes is not None:
        return int(processes) > 1
    return "," in addresses


def process_shard():
    """`(index, count)` of this process among the JAX job's processes, the
    `shard` of `views.two_view_batches`; None with one process."""
    if keras.backend.backend() != "jax":
        return None
    import jax

    if jax.process_count() == 1:
        return None
    return jax.process_index(), jax.process_count()


def _start_jax_processes(cpu_devices):
    """`jax.distributed` over the processes of `KERAS_DISTRIBUTION_*`."""
    missing = [
        name
        for name in (
            "KERAS_DISTRIBUTION_JOB_ADDRESSES",
            "KERAS_DISTRIBUTION_NUM_PROCESSES",
            "KERAS_DISTRIBUTION_PROCESS_ID",
        )
        if name not in os.environ
    ]
    if missing:
        raise ValueError(
            f"--strategy=data_parallel over several processes needs "
            f"{', '.join(missing)} in the environment of every process: "
            "the coordinator's host:port (process 0's), the number of "
            "processes and this one's index, e.g. "
            "KERAS_DISTRIBUTION_JOB_ADDRESSES=10.0.0.1:1234 "
            "KERAS_DISTRIBUTION_NUM_PROCESSES=2 "
            "KERAS_DISTRIBUTION_PROCESS_ID=0."
        )
    import jax

    if cpu_devices:
        use_cpu_devices(cpu_devices, check=False)
    # Collectives across processes on CPU devices (tests, CPU clusters);
    # GPUs and TPUs bring their own (NCCL, ICI) and ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    keras.distribution.initialize()
    if cpu_devices:
        _check_local_devices(cpu_devices)


def make_strategy(name, cpu_devices=0):
    """The `tf.distribute` strategy of `name`, or None.

    Args:
        name: a key of `STRATEGIES`. `"mirrored"`: all local GPUs (or the
            `cpu_devices`); `"multi_worker"`: `MultiWorkerMirroredStrategy`,
            the cluster from `TF_CONFIG`, with `patch_keras_multi_worker`;
            `"tpu"`: `TPUStrategy` on the TPU of `TPU_NAME` (or the local
            one); `"data_parallel"` (JAX): sets
            `keras.distribution.DataParallel` over all devices of all
            processes and returns None. Several processes (hosts) when
            `KERAS_DISTRIBUTION_*` name more than one
            (`keras.distribution.initialize`): each process then feeds its
            share of every global batch (`process_shard`); `"none"`: None.
        cpu_devices: split the CPU into this many devices first (0: no);
            per process.

    Returns:
        A `tf.distribute.Strategy`, or None (build and fit as usual).
    """
    check_strategy(name)
    if name == "data_parallel":
        if is_multi_process():
            _start_jax_processes(cpu_devices)
        elif cpu_devices:
            use_cpu_devices(cpu_devices)
        # Each process reads its own share of every batch (`process_shard`,
        # `distribute_dataset`): Keras' auto-sharding would have every
        # process read and decode the whole global batch and drop the rest.
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(auto_shard_dataset=False)
        )
        return None
    if cpu_devices:
        use_cpu_devices(cpu_devices)
    if name == "none":
        return None
    import tensorflow as tf

    if name == "mirrored":
        devices = None
        if cpu_devices:
            devices = [f"/cpu:{i}" for i in range(cpu_devices)]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError(
                "--strategy=multi_worker reads the cluster from the TF_CONFIG "
                "environment variable, which is not set. Set it on every "
                'machine, e.g. {"cluster": {"worker": ["host1:12345", '
                '"host2:12345"]}, "task": {"type": "worker", "index": 0}} '
                "(index 1 on host2)."
            )
        patch_keras_multi_worker()
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
        os.environ.get("TPU_NAME", "")
    )
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def device_count(strategy=None):
    """Devices the global batch is split over: replicas, or JAX devices."""
    if strategy is not None:
        return strategy.num_replicas_in_sync
    distribution = keras.distribution.distribution()
    if distribution is not None:
        return len(distribution.device_mesh.devices.flatten())
    return 1


def scope(strategy):
    """`strategy.scope()`, or a context that does nothing for None."""
    if strategy is None:
        return contextlib.nullcontext()
    return strategy.scope()


def is_chief(strategy=None):
    """Whether this process writes the run's files (checkpoints, logs).

    One process per job does: the `chief` task if the cluster has one, else
    worker 0; every process of a job without a cluster (one machine) does.
    """
    if keras.backend.backend() == "jax":
        import jax

        return jax.process_index() == 0
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    if strategy is None or not config.get("cluster"):
        return True
    task = config.get("task", {})
    if "chief" in config["cluster"]:
        return task.get("type") == "chief"
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0


def distribute_dataset(strategy, dataset_fn):
    """The input of `fit` under `strategy`, each worker reading its share.

    Args:
        strategy: a `tf.distribute.Strategy`, or None.
        dataset_fn: `f(shard)` -> grain batches: the global batches for
            `shard=None`; for `shard=(index, count)`, worker `index`'s
            share of each global batch, one of `count` equal parts (as
            `views.two_view_batches(..., shard=shard)` gives). Under a
            `tf.distribute` strategy they reach it through
            `grain_to_tf_data`.

    Returns:
        What `model.fit` takes: the global batches on one worker (a local
        strategy splits each batch over its devices), or a distributed
        dataset in which each worker decodes its own images only; under
        JAX with several processes, this process's share (Keras assembles
        the global batch from the processes' shares in process order).
    """
    if strategy is None:
        return dataset_fn(process_shard())
    multi_worker = strategy is not None and (
        strategy.extended._in_multi_worker_mode()
    )
    if not multi_worker:
        return grain_to_tf_data(dataset_fn(None))

    import tensorflow as tf

    def worker_dataset(context):
        options = tf.data.Options()
        # Each worker's dataset is its share already: no sharding on top.
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.OFF
        )
        shard = (context.input_pipeline_id, context.num_input_pipelines)
        return grain_to_tf_data(dataset_fn(shard)).with_options(options)

    return strategy.distribute_datasets_from_function(worker_dataset)


def grain_to_tf_data(batches):
    """`batches` as a `tf.data.Dataset` that only hands them over.

    A `tf.distribute` strategy takes its input as tf.data: grain's batches
    (`views.two_view_batches`, finished numpy arrays in their order) are
    yielded as they are, with no transformation of their own, so that the
    pipeline's order, draws and resume are grain's.

    Each pass over the dataset reads `batches` from its start, as a tf.data
    pipeline would (Keras reads the first batch once to build the model,
    then the epoch); the first pass goes on from the batch read here for
    the batches' shapes.
    """
    import tensorflow as tf

    iterator = iter(batches)
    try:
        first = next(iterator)
    except StopIteration:
        raise ValueError(
            "The input pipeline gave no batch: fewer images than one global "
            "batch, or a resumed epoch's skip past its end."
        ) from None
    signature = tf.nest.map_structure(
        lambda x: tf.TensorSpec(x.shape, tf.as_dtype(x.dtype)), first
    )
    started = [(first, iterator)]

    def handed_over():
        if started:
            head, rest = started.pop()
            yield head
            yield from rest
        else:
            yield from batches

    return tf.data.Dataset.from_generator(
        handed_over, output_signature=signature
    ).prefetch(tf.data.AUTOTUNE)


def patch_keras_multi_worker():
    """Makes Keras 3's `fit` work under `MultiWorkerMirroredStrategy`.

    Keras 3.15.1's TensorFlow trainer fails there for any model, in two
    places (found by trying, tests/test_distribute.py):
    `_maybe_symbolic_build` reduces the first data batch with
    `strategy.reduce("MEAN", per_replica_batch)`, which the collective
    strategy refuses for a `PerReplica` value (it only needs the batch's
    shapes: this takes the first local replica's); and `reduce_per_replica`
    averages each scalar metric with `strategy.reduce("MEAN", v, axis=0)`,
    "Invalid reduction dimension 0 for input with 0 dimensions" (this
    averages scalars over the replicas with `axis=None`). Idempotent; only
    `make_strategy("multi_worker")` calls it.
    """
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer, "_moco_keras_patched", False):
        return
    if keras.version() not in MULTI_WORKER_TESTED_KERAS:
        logging.warning(
            "moco_keras patches Keras %s's TensorFlow trainer for "
            "MultiWorkerMirroredStrategy; the patch was tested with Keras "
            "%s only.",
            keras.version(),
            ", ".join(MULTI_WORKER_TESTED_KERAS),
        )
    import tensorflow as tf

    original_reduce = trainer.reduce_per_replica
    is_multi_worker = trainer._collective_all_reduce_multi_worker

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and is_multi_worker(strategy):

            def mean(value):
                local = strategy.experimental_local_results(value)[0]
                axis = None if local.shape.rank == 0 else 0
                return strategy.reduce("MEAN", value, axis=axis)

            return tf.nest.map_structure(mean, values)
        return original_reduce(values, strategy, reduction)

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        if self._distribute_strategy is None:
            return
        strategy = self.distribute_strategy
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0],
                    next(batches),
                )
                break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    trainer.reduce_per_replica = reduce_per_replica
    trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    trainer._moco_keras_patched = True
