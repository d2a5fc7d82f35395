"""The statistics core shared by every BN variant.

Every variant (plain, ghost, renorm, masked, synchronized) gathers the same
three numbers per channel: the count of elements, their mean and their
centered sum of squares `m2`. Keeping `m2` centered (two passes over the
data, never `E[x^2] - E[x]^2`) keeps the variance accurate for inputs with
a large mean, and lets groups and replicas be combined exactly with Chan's
parallel formula `m2 = sum(m2_i + n_i * (mean_i - mean)^2)`.
"""

import collections

import tensorflow as tf

Moments = collections.namedtuple("Moments", ["count", "mean", "m2"])

# TPU strategies, which have no float64. The TF1-era classes are not
# subclasses of `tf.distribute.TPUStrategy` and are still public.
_TPU_STRATEGIES = tuple(
    cls
    for cls in (
        tf.distribute.TPUStrategy,
        getattr(tf.distribute.experimental, "TPUStrategy", None),
        getattr(tf.compat.v1.distribute.experimental, "TPUStrategy", None),
    )
    if cls is not None
)


def combines_in_float64(strategy):
    """Whether `all_reduce_moments` may use float64 under `strategy`."""
    return not isinstance(strategy, _TPU_STRATEGIES)


def variance(moments):
    """Biased variance; zero where there is no data."""
    return tf.math.divide_no_nan(moments.m2, moments.count)


def expand_to_rank(values, rank, axis):
    """(batch, channels) -> shape broadcastable against the input."""
    shape = [1] * rank
    shape[0] = -1
    shape[axis] = values.shape[-1]
    return tf.reshape(values, shape)


def local_moments(x, weights, reduction_axes, axis):
    """Count, mean and m2 per channel over this replica's elements.

    `weights` is None or a 0/1 mask with the input's shape and size 1 on
    the channel axis. An empty selection gives count 0, mean 0, m2 0.
    """
    channels = x.shape[axis]
    x = _masked_out_zeroed(x, weights)
    if weights is None:
        count = tf.cast(tf.size(x), x.dtype) / channels
        total = tf.reduce_sum(x, reduction_axes)
    else:
        count = tf.reduce_sum(weights, reduction_axes)
        total = tf.reduce_sum(weights * x, reduction_axes)
    count = tf.broadcast_to(count, [channels])
    mean = tf.math.divide_no_nan(total, count)
    # d(m2)/d(mean) = -2 * sum(x - mean) = 0: stopping it is exact and
    # spares the backward pass a reduction over the whole input.
    centered = x - _per_channel(tf.stop_gradient(mean), len(x.shape), axis)
    squares = tf.square(centered)
    if weights is not None:
        squares = weights * squares
    return Moments(count, mean, tf.reduce_sum(squares, reduction_axes))


def _masked_out_zeroed(x, weights):
    """`x` with its masked-out elements replaced by zeros.

    Padding may hold NaN or inf, and `0 * nan` is NaN: multiplying by the
    mask alone would let it into every statistic. Selecting instead also
    keeps the gradient at those elements exactly zero.
    """
    if weights is None:
        return x
    return tf.where(weights > 0, x, tf.zeros_like(x))


def _per_channel(vector, rank, axis):
    """Reshapes a per-channel vector to broadcast against the input."""
    shape = [1] * rank
    shape[axis] = -1
    return tf.reshape(vector, shape)


def all_reduce_moments(ctx, moments, float64=None):
    """Combines per-replica moments into global ones.

    Replicas may launch independent collectives (and their gradients, which
    are collectives too) in different orders, which TensorFlow reports as
    a shape mismatch or a hang; one collective per call leaves nothing to
    reorder. So each replica contributes count, sum and its sum of squares
    about zero, `m2 + n * mean^2`, and the global m2 is recovered as
    `sum_sq - n * mean^2` in float64, where that cancellation stays far
    below float32 precision (for means of 1e4 and unit variance, about
    1e-8 relative). Uneven replica batches weigh by their counts.

    TPUs have no float64, and in float32 that cancellation would lose the
    variance of large-mean inputs entirely. There the combination takes two
    float32 all-reduces instead: count and sum give the global mean, then
    each replica adds its m2 and its mean's spread about the global mean,
    `m2 + n * (mean - global_mean)^2`, a sum of non-negative terms with
    nothing to cancel. The second collective depends on the first's
    result, and a TPU program runs its collectives in one compiled order
    on every replica, so the reordering above cannot happen there.

    Args:
        ctx: The replica context.
        moments: This replica's `Moments`.
        float64: Whether to combine in one float64 all-reduce. `None`
            chooses float64 everywhere but under `TPUStrategy`.
    """
    if float64 is None:
        float64 = combines_in_float64(ctx.strategy)
    if not float64:
        return _all_reduce_moments_float32(ctx, moments)
    dtype = moments.mean.dtype
    count, mean, m2 = (tf.cast(v, tf.float64) for v in moments)
    total = ctx.all_reduce(
        tf.distribute.ReduceOp.SUM,
        tf.stack([count, count * mean, m2 + count * tf.square(mean)]),
    )
    total_count = total[0]
    global_mean = tf.math.divide_no_nan(total[1], total_count)
    total_m2 = tf.maximum(total[2] - total_count * tf.square(global_mean), 0.0)
    return Moments(
        tf.cast(total_count, dtype),
        tf.cast(global_mean, dtype),
        tf.cast(total_m2, dtype),
    )


def _all_reduce_moments_float32(ctx, moments):
    """`all_reduce_moments` in two float32 collectives, for TPUs."""
    # TODO(#5): run on a real TPU; tested only forced on CPU replicas.
    count, mean, m2 = moments
    total = ctx.all_reduce(
        tf.distribute.ReduceOp.SUM, tf.stack([count, count * mean])
    )
    total_count = total[0]
    global_mean = tf.math.divide_no_nan(total[1], total_count)
    total_m2 = ctx.all_reduce(
        tf.distribute.ReduceOp.SUM,
        m2 + count * tf.square(mean - global_mean),
    )
    return Moments(total_count, global_mean, total_m2)


def combine(parts):
    """Pools the moments of disjoint parts with Chan's formula."""
    if len(parts) == 1:
        return parts[0]
    count = tf.add_n([p.count for p in parts])
    mean = tf.math.divide_no_nan(
        tf.add_n([p.count * p.mean for p in parts]), count
    )
    m2 = tf.add_n([p.m2 + p.count * tf.square(p.mean - mean) for p in parts])
    return Moments(count, mean, m2)


def ghost_moments(x, weights, inner_axes, axis, group_size):
    """Moments of contiguous groups of `group_size` examples.

    Returns the per-group moments broadcast back to each example, shaped
    (batch, channels), and the pooled moments of the whole batch. The
    batch may be unknown and need not divide evenly: the last group is
    smaller. Segment sums over per-example partial sums keep the cost at
    two passes over `x`, like plain BN.
    """
    x = _masked_out_zeroed(x, weights)
    batch = tf.shape(x)[0]
    num_groups = (batch + group_size - 1) // group_size
    group_of = tf.range(batch) // group_size

    def per_group(values):
        return tf.math.unsorted_segment_sum(values, group_of, num_groups)

    if weights is None:
        per_example = tf.cast(tf.size(x), x.dtype) / tf.cast(
            tf.maximum(batch, 1) * x.shape[axis], x.dtype
        )
        example_count = tf.fill([batch, 1], per_example)
        weighted = x
    else:
        example_count = tf.reshape(
            _reduce_inner(weights, inner_axes), [batch, 1]
        )
        weighted = weights * x
    group_count = per_group(example_count)
    group_sum = per_group(_reduce_inner(weighted, inner_axes))
    group_mean = tf.math.divide_no_nan(group_sum, group_count)

    example_mean = tf.gather(group_mean, group_of)
    centered = x - expand_to_rank(example_mean, len(x.shape), axis)
    squares = tf.square(centered)
    if weights is not None:
        squares = weights * squares
    group_m2 = per_group(_reduce_inner(squares, inner_axes))

    channels = x.shape[axis]
    group_count = tf.broadcast_to(group_count, [num_groups, channels])
    per_example = Moments(
        tf.gather(group_count, group_of),
        example_mean,
        tf.gather(group_m2, group_of),
    )

    # Chan's formula pools the groups into the whole batch's moments.
    count = tf.reduce_sum(group_count, 0)
    mean = tf.math.divide_no_nan(tf.reduce_sum(group_sum, 0), count)
    m2 = tf.reduce_sum(group_m2 + group_count * tf.square(group_mean - mean), 0)
    return per_example, Moments(count, mean, m2)


def _reduce_inner(values, inner_axes):
    """Sums over all axes but batch and channel: (batch, channels)."""
    return tf.reduce_sum(values, inner_axes) if inner_axes else values
