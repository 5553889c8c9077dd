"""Several devices in one process: xcraft's hot loops under an active ``tf.distribute`` strategy.

Inside ``with strategy.scope():`` of a strategy with more than one replica (a
``MirroredStrategy`` over several GPUs, or over logical CPU devices), three loops split their
work across the replicas, each on its own device, with no change to the numbers beyond float
round-off (sums over shards are added in another order):

- forward passes of g (crops and images): each batch is cut into one shard per replica;
- the Sobol engine's chunks (and those of the other importance estimators): one chunk per
  replica at a time;
- the NMF's two large products A Wᵀ and Uᵀ A: the rows of A are split once across the devices,
  each device multiplies its rows, and Uᵀ A sums the partial products.

Outside a strategy (or with one replica) every function here calls straight through, so the
single-device path is the same code as before. :data:`STATS` counts the calls that were split,
so a test can tell that the devices were really used.
"""

import logging

import numpy as np
import tensorflow as tf

__all__ = ["STATS", "active_strategy", "replica_devices", "run_grouped", "run_sharded"]

#: Calls split across replicas, by kind ("sharded", "grouped"); read by the tests.
STATS = {"sharded": 0, "grouped": 0, "nmf": 0}


def active_strategy():
    """The ``tf.distribute`` strategy in scope when it has more than one replica, else None."""
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context() is False:
        return None
    strategy = tf.distribute.get_strategy()
    return strategy if strategy.num_replicas_in_sync > 1 else None


def replica_devices():
    """The devices of the active strategy's replicas, or None without a multi-replica one."""
    strategy = active_strategy()
    return None if strategy is None else tuple(strategy.extended.worker_devices)


def _local(strategy, outputs):
    """Per-replica outputs of ``strategy.run`` as a list (replica order) of structures."""
    flat = [strategy.experimental_local_results(value) for value in tf.nest.flatten(outputs)]
    return [tf.nest.pack_sequence_as(outputs, [values[i] for values in flat])
            for i in range(strategy.num_replicas_in_sync)]


class _EagerRunFilter(logging.Filter):
    """Drop TensorFlow's "Using MirroredStrategy eagerly has significant overhead" line.

    The replicas run eagerly on purpose: in a graph, every new shard or chunk shape retraces
    (measured 1.6x slower on the demo CNN), while the eager cost, a thread per replica per
    call, is small against batches of crops or Sobol chunks.
    """

    def filter(self, record):
        return "MirroredStrategy eagerly" not in record.getMessage()


logging.getLogger("tensorflow").addFilter(_EagerRunFilter())


def _runner(strategy, function):
    def run(*values):
        # A plain Python function: handed a tf.function with an input_signature, strategy.run
        # would bind the distributed values themselves to that signature, and fail.
        return strategy.run(lambda *shards: function(*shards), args=values)

    return run


def run_sharded(function, *arrays):
    """``function`` on shards of the leading axis, one per replica; a list of its outputs.

    Parameters
    ----------
    function : callable
        Takes one shard of each of ``arrays`` (the same rows of each).
    *arrays : array-like of the same length
        Split into contiguous, near-equal shards (a shard may be empty when there are fewer
        rows than replicas; empty shards are not run).

    Returns
    -------
    list
        The outputs of each shard in row order; ``[function(*arrays)]`` without a strategy.
    """
    strategy = active_strategy()
    if strategy is None:
        return [function(*arrays)]
    n_replicas = strategy.num_replicas_in_sync
    n_rows = int(np.shape(arrays[0])[0])
    bounds = np.linspace(0, n_rows, n_replicas + 1).round().astype(int)
    if np.count_nonzero(np.diff(bounds)) < 2:
        return [function(*arrays)]  # one row: nothing to share
    tensors = [tf.convert_to_tensor(a) for a in arrays]

    def shard(tensor):
        def value(context):
            i = context.replica_id_in_sync_group
            return tensor[int(bounds[i]):int(bounds[i + 1])]

        return strategy.experimental_distribute_values_from_function(value)

    outputs = _runner(strategy, function)(*(shard(t) for t in tensors))
    STATS["sharded"] += 1
    return [out for out, size in zip(_local(strategy, outputs), np.diff(bounds), strict=True)
            if size > 0]


def run_grouped(call, args_list):
    """``call(*args)`` for every tuple of ``args_list``, one per replica at a time; in order.

    Parameters
    ----------
    call : callable
        Independent calls (e.g. chunks of the Sobol grid), each taking scalar tensors.
    args_list : list of tuple of tf.Tensor

    Returns
    -------
    list
        ``[call(*args) for args in args_list]``.
    """
    strategy = active_strategy()
    if strategy is None:
        return [call(*args) for args in args_list]
    n_replicas = strategy.num_replicas_in_sync
    results = []
    for first in range(0, len(args_list), n_replicas):
        group = list(args_list[first:first + n_replicas])
        used = len(group)
        group += [group[-1]] * (n_replicas - used)  # idle replicas repeat the last call

        def distributed(position, group=group):
            return strategy.experimental_distribute_values_from_function(
                lambda context: group[context.replica_id_in_sync_group][position])

        args = tuple(distributed(k) for k in range(len(group[0])))
        outputs = _runner(strategy, call)(*args)
        STATS["grouped"] += 1
        results.extend(_local(strategy, outputs)[:used])
    return results
