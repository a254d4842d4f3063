"""Shared helpers of the tf.distribute test modules (MirroredStrategy on logical CPUs)."""

import itertools

import numpy as np
import tensorflow as tf

_STRATEGIES = itertools.count(1)


def mirrored(replicas: int) -> tf.distribute.MirroredStrategy:
    # Strategies of one process number their collective groups from the same
    # start; one process rarely holds several, tests do: give each its own keys.
    tf.distribute.MirroredStrategy._collective_key_base = 1000 * next(_STRATEGIES)
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])


def per_replica(strategy, shards):
    """A distributed value: replica r gets `shards[r]` (a structure of arrays)."""
    return strategy.experimental_distribute_values_from_function(
        lambda context: tf.nest.map_structure(tf.constant, shards[context.replica_id_in_sync_group])
    )


def local(strategy, value) -> list[np.ndarray]:
    return [np.asarray(v) for v in strategy.experimental_local_results(value)]
