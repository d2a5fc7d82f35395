"""float64 numpy references for the diagnostics tests.

A chain of affine layers `a_j = a_{j-1} K_j + b_j` with the mean squared
error `L = mean((a_L - t)^2)` has gradients in closed form, so covariate
shift and the landscape probe follow from the definitions of Santurkar et
al. (2018) without any TensorFlow code.
"""

import numpy as np


def chain_loss_and_grads(x, t, params):
    """Loss and gradients of the affine chain.

    `params` is a list of `(K_j, b_j)`. With `D_L = 2 (a_L - t) / (n o)`
    and `D_{j-1} = D_j K_j^T`: `dL/dK_j = a_{j-1}^T D_j` and
    `dL/db_j = sum over rows of D_j`.
    """
    activations = [x]
    for kernel, bias in params:
        activations.append(activations[-1] @ kernel + bias)
    residual = activations[-1] - t
    loss = np.mean(residual**2)
    delta = 2.0 * residual / residual.size
    grads = [None] * len(params)
    for j in reversed(range(len(params))):
        kernel, _ = params[j]
        grads[j] = (activations[j].T @ delta, delta.sum(axis=0))
        delta = delta @ kernel.T
    return loss, grads


def chain_ics(x, t, params, learning_rate):
    """(||G - G'||, relative, cosine) per layer, Definition 2.1."""
    _, grads = chain_loss_and_grads(x, t, params)
    rows = []
    for i in range(len(params)):
        shifted = [
            (k - learning_rate * gk, b - learning_rate * gb)
            if j < i
            else (k, b)
            for j, ((k, b), (gk, gb)) in enumerate(
                zip(params, grads, strict=True)
            )
        ]
        g = grads[i][0]
        g_shifted = chain_loss_and_grads(x, t, shifted)[1][i][0]
        diff = np.linalg.norm(g - g_shifted)
        cosine = np.sum(g * g_shifted) / (
            np.linalg.norm(g) * np.linalg.norm(g_shifted)
        )
        rows.append((diff, diff / np.linalg.norm(g), cosine))
    return rows


def _flat(grads):
    return np.concatenate([np.ravel(a) for pair in grads for a in pair])


def chain_landscape(x, t, params, step_sizes):
    """Losses, gradient changes and beta ratios along the gradient."""
    loss, grads = chain_loss_and_grads(x, t, params)
    g = _flat(grads)
    losses, changes, ratios = [], [], []
    for eta in step_sizes:
        moved = [
            (k - eta * gk, b - eta * gb)
            for (k, b), (gk, gb) in zip(params, grads, strict=True)
        ]
        moved_loss, moved_grads = chain_loss_and_grads(x, t, moved)
        change = np.linalg.norm(_flat(moved_grads) - g)
        losses.append(moved_loss)
        changes.append(change)
        ratios.append(change / (eta * np.linalg.norm(g)))
    return loss, np.linalg.norm(g), losses, changes, ratios


def unit_moments(a, axis=-1):
    """Per-unit mean and biased std along `axis`."""
    a = np.moveaxis(np.asarray(a, np.float64), axis, -1).reshape(
        -1, np.shape(a)[axis]
    )
    return a.mean(axis=0), a.std(axis=0)


def bn_train(h, gamma, beta, epsilon, r=None, d=None):
    """Training-mode BN (renorm when r and d are given) of a 2D batch."""
    mean, std = unit_moments(h)
    normalized = (h - mean) / np.sqrt(std**2 + epsilon)
    if r is not None:
        normalized = normalized * r + d
    return gamma * normalized + beta


def renorm_r_d(mean, std, renorm_mean, renorm_stddev, epsilon, clipping):
    """Clipped r and d of Batch Renormalization and the unclipped ones."""
    s_r = np.maximum(renorm_stddev, np.sqrt(epsilon))
    r_raw = np.sqrt(std**2 + epsilon) / s_r
    d_raw = (mean - renorm_mean) / s_r
    r = np.clip(r_raw, clipping["rmin"], clipping["rmax"])
    d = np.clip(d_raw, -clipping["dmax"], clipping["dmax"])
    return r, d, r_raw, d_raw
