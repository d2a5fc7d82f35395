"""Makes Keras 3's `fit` work under `MultiWorkerMirroredStrategy`.

Keras 3 (through 3.15 at least, keras-team/keras#20585, open) fails in
`fit` as soon as a `MultiWorkerMirroredStrategy` spans more than one
worker, in two places of its TensorFlow trainer:

- before the first step, `_maybe_symbolic_build` averages the first
  distributed batch with `strategy.reduce` on the whole `(x, y)`
  structure, which the cross-worker collective cannot convert
  (`ValueError: Attempt to convert a value (PerReplica:...)`). The build
  needs only the batch's shapes and dtypes, so this module builds from
  the local replica's batch instead, with no communication at all.
- after every step, `reduce_per_replica` averages the logged metrics
  with `strategy.reduce("MEAN", v, axis=0)`, which fails on their
  scalars (`Invalid reduction dimension 0 for input with 0
  dimensions`). The mean over replicas it means is `axis=None`; this
  module reduces with that, so every worker logs the same numbers.

`apply()` patches both for the process, once; `zoo.train.get_strategy`
calls it only when it creates a multi-worker strategy, so single-worker
runs use Keras untouched. Remove this module when Keras fixes the issue.
"""

import tensorflow as tf
from keras import tree
from keras.src.backend.tensorflow import trainer as tf_trainer

_applied = False


def _local_value(strategy, value):
    if isinstance(value, tf.distribute.DistributedValues):
        return strategy.experimental_local_results(value)[0]
    return value


def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    strategy = self.distribute_strategy
    if not tf_trainer._collective_all_reduce_multi_worker(strategy):
        return _original_symbolic_build(self, iterator, data_batch)
    if iterator is not None:
        for _, _, batches in iterator:
            data_batch = tree.map_structure(
                lambda v: _local_value(strategy, v), next(batches)
            )
            break
    with strategy.scope():
        self._symbolic_build(data_batch=data_batch)


def _reduce_per_replica(values, strategy, reduction):
    if reduction in (
        "auto",
        "mean",
    ) and tf_trainer._collective_all_reduce_multi_worker(strategy):
        return tree.map_structure(
            lambda v: strategy.reduce("MEAN", v, axis=None), values
        )
    return _original_reduce(values, strategy, reduction)


_original_symbolic_build = tf_trainer.TensorFlowTrainer._maybe_symbolic_build
_original_reduce = tf_trainer.reduce_per_replica


def apply():
    """Patches Keras's TensorFlow trainer for multi-worker `fit`; idempotent.

    The patched functions defer to Keras's own for every other strategy.
    """
    global _applied
    if _applied:
        return
    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    # `_make_function` looks the name up at call time, in this module.
    tf_trainer.reduce_per_replica = _reduce_per_replica
    _applied = True
