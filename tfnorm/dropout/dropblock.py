"""DropBlock: dropout of contiguous blocks of a feature map."""

import numbers

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tfnorm.dropout.base import DropoutLayer

_DATA_FORMATS = ("channels_last", "channels_first")

# Newton iterations of the seed-rate solve. From the paper's approximation,
# ten steps reach float32 precision (|error| < 1e-6 in the expected drop
# fraction) for rates up to 0.99 and maps up to 512 x 512.
_NEWTON_STEPS = 10


def _coverage(size, block):
    """How many seed positions cover each index of one spatial axis.

    Seeds sit at 0 .. size - block, and the seed at s covers s .. s + block -
    1, so index i is covered by the seeds max(0, i - block + 1) .. min(i,
    size - block). Near the borders fewer seeds cover an index, which is why
    the paper's seed rate under-drops on small maps.
    """
    i = ops.arange(size, dtype="int32")
    last_seed = size - block
    return ops.cast(
        ops.minimum(i, last_seed) - ops.maximum(0, i - block + 1) + 1,
        "float32",
    )


def dropblock_seed_rate(rate, height, width, block_height, block_width):
    """The seed probability that makes DropBlock drop `rate` in expectation.

    A position covered by n seed positions, each active with probability
    `g`, is dropped with probability `1 - (1 - g)^n`. With n(i, j) = n_h(i) *
    n_w(j) from `_coverage`, the expected dropped fraction is
    `1 - mean((1 - g)^n)`, and this solves `mean(q^n) = 1 - rate` for
    `q = 1 - g` by Newton's method. The left side is increasing and convex
    in q, so Newton's iterates from q = 1 fall monotonically onto the root;
    the first one is the paper's approximation
    `g = rate * H * W / (b_h * b_w * (H - b_h + 1) * (W - b_w + 1))`,
    which ignores overlapping blocks and the thinner coverage near borders.

    Args:
        rate: float32 scalar tensor, the target drop fraction in [0, 1).
        height: int32 scalar, the map height H.
        width: int32 scalar, the map width W.
        block_height: int32 scalar in [1, H], the block height b_h.
        block_width: int32 scalar in [1, W], the block width b_w.

    Returns:
        A float32 scalar tensor `g`, the probability that a position where a
        whole block fits starts a block.
    """
    counts = ops.multiply(
        ops.expand_dims(_coverage(height, block_height), 1),
        ops.expand_dims(_coverage(width, block_width), 0),
    )
    target = 1.0 - rate
    q = ops.ones((), "float32")
    for _ in range(_NEWTON_STEPS):
        # q^n as exp(n log q): n >= 1 everywhere and q stays above the root,
        # which is positive, so the log is finite.
        q_pow = ops.exp(counts * ops.log(q))
        value = ops.mean(q_pow) - target
        slope = ops.mean(counts * q_pow) / q
        q = ops.clip(q - value / slope, 1e-12, 1.0)
    return 1.0 - q


def _validate_block_size(block_size, rank):
    if isinstance(block_size, (list, tuple)) and rank > 1:
        sizes = tuple(block_size)
    else:
        sizes = (block_size,) * rank
    ok = len(sizes) == rank and all(
        isinstance(s, numbers.Integral)
        and not isinstance(s, (bool, np.bool_))
        and s >= 1
        for s in sizes
    )
    if not ok:
        expected = "a positive int"
        if rank > 1:
            expected += f" or a tuple of {rank} positive ints"
        raise ValueError(
            f"`block_size` must be {expected}. "
            f"Received: block_size={block_size!r}"
        )
    return tuple(int(s) for s in sizes)


def _validate_data_format(data_format):
    if data_format is None:
        data_format = keras.config.image_data_format()
    if data_format not in _DATA_FORMATS:
        raise ValueError(
            "`data_format` must be 'channels_last' or 'channels_first'. "
            f"Received: data_format={data_format!r}"
        )
    return data_format


def _block_keep_scale(shape, block, rate, seed, uniform):
    """The mask-times-rescale factor of DropBlock for an (N, H, W, C) tensor.

    Returns a float32 tensor of that shape holding 0 where a block is dropped
    and `count / count_kept` elsewhere. `block` is the static block size
    (b_h, b_w); each side is clipped to the map at run time.
    """
    height, width = shape[1], shape[2]
    # At least 1: XLA compiles both branches of `_drop`'s cond, so an empty
    # map (H or W of 0) reaches here and must not ask for a negative padding.
    block_h = ops.maximum(ops.minimum(block[0], height), 1)
    block_w = ops.maximum(ops.minimum(block[1], width), 1)
    gamma = dropblock_seed_rate(rate, height, width, block_h, block_w)

    # Seeds only where a whole (clipped) block fits.
    seed_shape = ops.stack(
        [shape[0], height - block_h + 1, width - block_w + 1, shape[3]]
    )
    seeds = ops.cast(uniform(seed_shape, seed) < gamma, "float32")

    # Max-pooling spreads each seed over its block. Padding by the static
    # block size before and by the clipped one after keeps the pool window
    # static (XLA and unknown map sizes need that) while the output index i
    # still collects exactly the seeds max(0, i - b + 1) .. min(i, H - b).
    # The two one-axis pools cost b_h + b_w comparisons instead of b_h * b_w.
    seeds = tf.pad(
        seeds,
        [
            [0, 0],
            [block[0] - 1, block_h - 1],
            [block[1] - 1, block_w - 1],
            [0, 0],
        ],
    )
    dropped = seeds
    if block[0] > 1:
        dropped = tf.nn.max_pool2d(dropped, (block[0], 1), 1, "VALID")
    if block[1] > 1:
        dropped = tf.nn.max_pool2d(dropped, (1, block[1]), 1, "VALID")

    keep = 1.0 - dropped
    # Rescale by the realized kept fraction, as the paper does. An all-dropped
    # batch (possible when one block covers the map) returns zeros, not NaN.
    kept_fraction = ops.maximum(ops.mean(keep), 1e-12)
    return keep * (1.0 / kept_fraction)


class _DropBlock(DropoutLayer):
    """Shared code of DropBlock1D and DropBlock2D."""

    _rank = None

    def __init__(
        self,
        rate,
        block_size,
        data_format=None,
        seed=None,
        **kwargs,
    ):
        super().__init__(rate=rate, seed=seed, **kwargs)
        self._block = _validate_block_size(block_size, self._rank)
        # Plain ints in the config, whatever integer type was passed.
        self.block_size = (
            tuple(int(b) for b in block_size)
            if isinstance(block_size, (list, tuple))
            else int(block_size)
        )
        self.data_format = _validate_data_format(data_format)
        self.input_spec = keras.layers.InputSpec(ndim=self._rank + 2)

    def _drop(self, inputs, rate, seed):
        # An empty map has nothing to drop, and TensorFlow's max-pool
        # kernel dies with SIGFPE when its output is empty (a map of width
        # 0), so such inputs skip the mask: statically when a dimension is
        # known to be 0 (the batch may still be unknown: the branch that
        # builds the mask would not even trace) or the shape is known, as
        # under XLA, and through a cond otherwise.
        if 0 in inputs.shape:
            return inputs
        if inputs.shape.is_fully_defined():
            return self._drop_blocks(inputs, rate, seed)
        return tf.cond(
            tf.size(inputs) > 0,
            lambda: self._drop_blocks(inputs, rate, seed),
            lambda: inputs,
        )

    def _drop_blocks(self, inputs, rate, seed):
        dims = ops.shape(inputs)
        # The mask is built as (N, H, W, C) for max-pooling, which TensorFlow
        # runs channels-last only. Channels-first maps become N * C maps of
        # one channel and 1D maps become H x 1 maps: reshapes, no transposes.
        if self.data_format == "channels_first":
            spatial = list(dims[2:]) + [1] * (2 - self._rank)
            shape4 = [dims[0] * dims[1], *spatial, 1]
        else:
            spatial = list(dims[1:-1]) + [1] * (2 - self._rank)
            shape4 = [dims[0], *spatial, dims[-1]]
        block = tuple(self._block) + (1,) * (2 - self._rank)
        factor = _block_keep_scale(shape4, block, rate, seed, self._uniform)
        factor = ops.reshape(factor, dims)
        return inputs * ops.cast(factor, inputs.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "block_size": self.block_size,
                "data_format": self.data_format,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="tfnorm")
class DropBlock2D(_DropBlock):
    """Drops contiguous square blocks of 2D feature maps (DropBlock).

    Plain dropout on convolutional features removes single pixels whose
    information neighbouring pixels still carry. DropBlock drops whole
    `block_size x block_size` regions instead, independently per sample and
    channel.

    In training, block seeds are drawn with probability `g` at every position
    where a whole block fits inside the map; each seed zeroes the block it
    starts; the kept values are rescaled by the realized kept fraction:

        y = x * m * count(m) / count_ones(m)

    where `m` is the 0/1 keep mask and the counts run over the whole batch.
    At inference, and whenever the rate is 0, `y = x` exactly.

    **The expected dropped fraction equals `rate` exactly**, on any map
    size. The paper's seed rate
    `g = rate / b^2 * H * W / ((H - b + 1) * (W - b + 1))` counts overlapping
    blocks twice and ignores that fewer seeds cover border positions, so it
    drops less than `rate` on large maps and far off on small ones. tfnorm
    solves the exact equation for `g` at every call (see
    `tfnorm.dropout.dropblock.dropblock_seed_rate`); the cost is a few
    operations on an H x W grid.

    **A block larger than the map is clipped to the map**, per side: on a
    5x5 map with `block_size=7` one seed position remains and a seed drops
    the whole map, with probability `rate`. The rescaling by the realized
    kept fraction returns zeros, not NaN, in the rare batch where every
    position is dropped.

    The rate lives in a non-trainable variable (see `tfnorm.dropout.base`),
    so `tfnorm.callbacks.DropRateSchedule` can ramp it as the paper does
    (keep probability from 1 to 0.9 over training).

    Args:
        rate: float in [0, 1), the expected fraction of dropped positions.
        block_size: int, or a tuple of 2 ints (height, width), the side of a
            dropped block. The paper uses 7 on ResNet-50.
        data_format: `"channels_last"` (inputs `(batch, height, width,
            channels)`) or `"channels_first"` (inputs `(batch, channels,
            height, width)`). Defaults to `keras.config.image_data_format()`.
        seed: int or None, the seed of the mask sequence.
        **kwargs: base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: 4D tensor. The spatial dimensions may be unknown until call.
        training: Python bool or boolean tensor, whether to drop.
            Defaults to `False`.

    Input shape and output shape are the same.

    Reference:
    - [Ghiasi et al., 2018](https://arxiv.org/abs/1810.12890)

    Example:

    >>> layer = DropBlock2D(rate=0.1, block_size=3, seed=0)
    >>> x = np.ones((2, 8, 8, 4), "float32")
    >>> y = layer(x, training=True)
    >>> bool(np.all(layer(x) == x))
    True
    """

    _rank = 2


@keras.saving.register_keras_serializable(package="tfnorm")
class DropBlock1D(_DropBlock):
    """Drops contiguous segments of sequences (DropBlock in one dimension).

    The 1D counterpart of `DropBlock2D`: seeds are drawn where a whole
    segment of `block_size` steps fits, each seed zeroes its segment, and the
    kept values are rescaled by the realized kept fraction,

        y = x * m * count(m) / count_ones(m).

    At inference, and whenever the rate is 0, `y = x` exactly. The seed rate
    is solved so that the expected dropped fraction equals `rate` exactly,
    and a block longer than the sequence is clipped to it; see
    `DropBlock2D`.

    Args:
        rate: float in [0, 1), the expected fraction of dropped steps.
        block_size: positive int, the length of a dropped segment.
        data_format: `"channels_last"` (inputs `(batch, steps, channels)`) or
            `"channels_first"` (inputs `(batch, channels, steps)`). Defaults
            to `keras.config.image_data_format()`.
        seed: int or None, the seed of the mask sequence.
        **kwargs: base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: 3D tensor. The steps dimension may be unknown until call.
        training: Python bool or boolean tensor, whether to drop.
            Defaults to `False`.

    Input shape and output shape are the same.

    Reference:
    - [Ghiasi et al., 2018](https://arxiv.org/abs/1810.12890)

    Example:

    >>> layer = DropBlock1D(rate=0.2, block_size=5, seed=0)
    >>> x = np.ones((4, 50, 8), "float32")
    >>> y = layer(x, training=True)
    >>> y.shape
    TensorShape([4, 50, 8])
    """

    _rank = 1
