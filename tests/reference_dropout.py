"""float64 numpy references for the dropout tests.

Written from the formulas of the papers and `shared/REFERENCE.md`,
independently of the TensorFlow code they check.
"""

import numpy as np


def dropblock_coverage(size, block):
    """Number of seed positions whose block covers each index of an axis.

    Counted by brute force: every seed s in 0 .. size - block covers
    s .. s + block - 1.
    """
    counts = np.zeros(size)
    for s in range(size - block + 1):
        counts[s : s + block] += 1
    return counts


def dropblock_drop_fraction(gamma, height, width, block_h, block_w):
    """Expected dropped fraction for seed probability `gamma`.

    A position covered by n independent seeds survives with probability
    (1 - gamma)^n.
    """
    n = np.outer(
        dropblock_coverage(height, block_h),
        dropblock_coverage(width, block_w),
    )
    return 1.0 - np.mean((1.0 - gamma) ** n)


def dropblock_seed_rate(rate, height, width, block_h, block_w):
    """Seed probability with expected drop fraction `rate`, by bisection."""
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if dropblock_drop_fraction(mid, height, width, block_h, block_w) < rate:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def is_union_of_blocks(dropped, block_h, block_w):
    """Whether a 2D boolean map is a union of whole blocks inside the map.

    The union of every fully dropped block that fits must give back the
    dropped set: no dropped position may lie outside such a block.
    """
    height, width = dropped.shape
    rebuilt = np.zeros_like(dropped)
    for i in range(height - block_h + 1):
        for j in range(width - block_w + 1):
            if dropped[i : i + block_h, j : j + block_w].all():
                rebuilt[i : i + block_h, j : j + block_w] = True
    return bool(np.array_equal(rebuilt, dropped))


def concrete_keep_mean(rate, temperature, points=200001):
    """E[(1 - z) / (1 - rate)] of the Concrete relaxation, by quadrature.

    z = sigmoid((logit(rate) + logit(u)) / temperature), u ~ U(0, 1); the
    midpoint rule on u.
    """
    u = (np.arange(points) + 0.5) / points
    logit = np.log(rate) - np.log1p(-rate)
    z = 1.0 / (1.0 + np.exp(-(logit + np.log(u) - np.log1p(-u)) / temperature))
    return float(np.mean(1.0 - z) / (1.0 - rate))


def batch_norm_inference(x, mean, variance, gamma, beta, epsilon):
    """Batch Normalization with given statistics, last axis the channels."""
    return gamma * (x - mean) / np.sqrt(variance + epsilon) + beta
