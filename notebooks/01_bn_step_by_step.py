# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 1. Batch Normalization, step by step
#
# **Purpose:** compute by hand, in numpy, what a Batch Normalization layer
# does to a small batch of real digits, and check it number for number
# against `tfnorm.BatchNormalization`. Then the test phase (moving
# statistics), why `momentum` and `epsilon` matter, and what
# `trainable=False` does.
#
# **Runtime:** about 14 s of CPU time (user + sys, run as a script;
# 31 s wall-clock on 2 cores shared with other jobs).

# %%
import time

import keras
import matplotlib.pyplot as plt
import numpy as np

import tfnorm
from zoo import data

started = time.perf_counter()
digits = data.load("digits")


def quadrant_ink(images):
    """Mean brightness, in percent, of the four 14x14 quadrants."""
    grid = images.reshape(-1, 2, 14, 2, 14)
    return 100 * grid.mean(axis=(2, 4)).reshape(-1, 4).astype("float32")


features = quadrant_ink(digits.x_train)
x = features[:8]
print("a batch of 8 digits, 4 features each (ink per quadrant):")
print(np.round(x, 1))

# %% [markdown]
# ## The training-phase formula
#
# For every feature (a *channel*), BN looks only at the current batch:
#
# 1. the batch mean `mu = mean(x)` and the **biased** variance
#    `var = mean((x - mu)^2)` (divide by n, not n - 1);
# 2. normalize: `x_hat = (x - mu) / sqrt(var + epsilon)`;
# 3. scale and shift with two learned vectors: `y = gamma * x_hat + beta`.
#
# Step 3 matters: with `gamma = sqrt(var + epsilon)` and `beta = mu` the
# layer could undo the normalization entirely, so normalizing never takes
# away what the network can represent.

# %%
epsilon = 1e-3
gamma = np.array([1.0, 2.0, 0.5, 1.0], "float32")
beta = np.array([0.0, 1.0, -1.0, 0.5], "float32")

mu = x.mean(axis=0)
var = x.var(axis=0)  # numpy's default is the biased variance
x_hat = (x - mu) / np.sqrt(var + epsilon)
y_hand = gamma * x_hat + beta

print("batch mean     ", np.round(mu, 3))
print("batch variance ", np.round(var, 3))
print("x_hat mean", np.round(x_hat.mean(0), 6))
print("x_hat std ", np.round(x_hat.std(0), 6))
print("y mean    ", np.round(y_hand.mean(0), 4))
print("y std     ", np.round(y_hand.std(0), 4))

# %% [markdown]
# Each column of `x_hat` has mean 0 and a standard deviation just under 1
# (by the factor `sqrt(var / (var + epsilon))`); `y` has mean `beta` and
# standard deviation about `gamma`. Now the same with the layer, in
# training mode:

# %%
bn = tfnorm.BatchNormalization(momentum=0.9, epsilon=epsilon)
bn.build((None, 4))
bn.gamma.assign(gamma)
bn.beta.assign(beta)
y_layer = keras.ops.convert_to_numpy(bn(x, training=True))

gap = np.abs(y_layer - y_hand).max()
print(f"largest difference, layer vs numpy: {gap:.2e}")
assert np.allclose(y_layer, y_hand, atol=1e-5), gap

# %% [markdown]
# ## The test phase: moving statistics
#
# At test time there may be a single example, and its prediction should
# not depend on which other examples happen to share its batch. So during
# training the layer also keeps running estimates of the mean and variance,
# updated at every training step:
#
# `moving = momentum * moving + (1 - momentum) * batch_statistic`
#
# (the Keras convention: `momentum` is the weight kept on the *old* value;
# PyTorch's `momentum=0.1` is `momentum=0.9` here). They start at mean 0
# and variance 1, so after the one training call above:

# %%
moving_mean = 0.9 * 0.0 + 0.1 * mu
moving_variance = 0.9 * 1.0 + 0.1 * var
print("moving mean    ", np.round(bn.moving_mean.numpy(), 4))
print("moving variance", np.round(bn.moving_variance.numpy(), 4))
assert np.allclose(bn.moving_mean.numpy(), moving_mean, atol=1e-6)
assert np.allclose(bn.moving_variance.numpy(), moving_variance, atol=1e-6)

# %% [markdown]
# In inference mode (`training=False`, the default when you call a Keras
# layer or `model.predict`) the layer uses those moving statistics instead
# of the batch's, and updates nothing:

# %%
y_test_hand = (
    gamma * (x - moving_mean) / np.sqrt(moving_variance + epsilon) + beta
)
y_test = keras.ops.convert_to_numpy(bn(x, training=False))
assert np.allclose(y_test, y_test_hand, atol=1e-5)
assert np.allclose(bn.moving_mean.numpy(), moving_mean, atol=1e-6)

# The same first digit in two different batches.
other = np.concatenate([x[:1], features[100:107]])
for mode in (True, False):
    a = keras.ops.convert_to_numpy(bn(x, training=mode))[0]
    b = keras.ops.convert_to_numpy(bn(other, training=mode))[0]
    print(
        f"training={mode!s:5}: output of digit 0 in batch A {np.round(a, 3)}"
        f"\n{'':16}in batch B {np.round(b, 3)}"
    )

# %% [markdown]
# In training mode the same digit gets a different output depending on
# its batch mates; in inference mode it does not. (Those two training-mode
# calls also moved the moving statistics a little: every training call
# does.)
#
# ## Momentum: how fast the moving statistics follow
#
# Below, three fresh layers with momentum 0.9, 0.99 and 0.999 watch the
# same stream of batches of 32 digits. The dashed line is the mean of the
# first feature over all 4,000 training digits, which the moving mean is
# meant to estimate.

# %%
rng = np.random.default_rng(0)
momenta = (0.9, 0.99, 0.999)
layers = {m: tfnorm.BatchNormalization(momentum=m) for m in momenta}
steps = 300
trace = {m: [] for m in momenta}
for _ in range(steps):
    batch = features[rng.choice(len(features), 32, replace=False)]
    for m, layer in layers.items():
        layer(batch, training=True)
        trace[m].append(float(layer.moving_mean.numpy()[0]))

population = features[:, 0].mean()
fig, ax = plt.subplots(figsize=(7, 3.5))
for m in momenta:
    ax.plot(np.arange(1, steps + 1), trace[m], label=f"momentum {m}")
ax.axhline(population, color="k", ls="--", lw=1, label="population mean")
ax.set_xlabel("training step")
ax.set_ylabel("moving mean, feature 0")
ax.legend()
plt.show()

for m in momenta:
    close = np.abs(np.array(trace[m]) - population) < 0.05 * population
    reached = int(np.argmax(close)) + 1 if close.any() else None
    # The initial value's weight after t steps is momentum ** t.
    half = np.log(0.5) / np.log(m)
    print(
        f"momentum {m}: within 5% of the population mean after "
        f"{reached if reached else f'more than {steps}'} steps; "
        f"half the weight still on the initial value after {half:.0f} steps"
    )

# %% [markdown]
# A high momentum averages over many batches (less noise) but lags behind:
# early in training, or whenever the weights below the layer change fast,
# the moving statistics describe a network that no longer exists. Notebook
# 6 shows a fix, PreciseBN.
#
# ## Epsilon: what keeps the division finite
#
# A digit's corner pixels are almost always blank. In a batch where a pixel
# is blank for every example, its variance is exactly 0, and without
# epsilon the normalization divides 0 by 0. A pixel that is inked in only
# one example of the batch has a tiny variance, and dividing by its square
# root turns that one faint stroke into a huge value.

# %%
pixels = digits.x_train[:64]
variances = pixels.var(axis=0)
blank = int(np.argmax(variances == 0))
rare = int(np.argmin(np.where(variances > 0, variances, np.inf)))
print(f"pixel {blank}: variance {variances[blank]:.1e} in this batch")
print(f"pixel {rare}: variance {variances[rare]:.1e} in this batch")

with np.errstate(divide="ignore", invalid="ignore"):
    no_eps = (pixels[:, blank] - pixels[:, blank].mean()) / np.sqrt(
        variances[blank]
    )
print("blank pixel normalized without epsilon:", no_eps[:4], "...")

for eps in (1e-5, 1e-3, 1e-1):
    layer = tfnorm.BatchNormalization(epsilon=eps)
    out = keras.ops.convert_to_numpy(layer(pixels, training=True))
    hand = (pixels[:, rare] - pixels[:, rare].mean()) / np.sqrt(
        variances[rare] + eps
    )
    assert np.allclose(out[:, rare], hand, atol=1e-4)
    assert np.all(out[:, blank] == 0.0)
    print(
        f"epsilon {eps:g}: largest |output| of the rare pixel "
        f"{np.abs(out[:, rare]).max():6.2f}; blank pixel -> "
        f"{np.abs(out[:, blank]).max():g}"
    )

# %% [markdown]
# With epsilon, a blank pixel normalizes to exactly 0 (then `beta`), and
# a larger epsilon damps the rare pixel's blow-up. Keras uses
# `epsilon=1e-3` by default, PyTorch and Flax `1e-5`.
#
# ## `trainable=False`: frozen means inference mode
#
# In Keras, setting `trainable = False` on a BN layer does more than
# freeze `gamma` and `beta`: the layer then always runs in inference mode,
# using and never updating its moving statistics, even when called with
# `training=True` and even inside `fit`. This is what fine-tuning a
# pretrained network usually needs. (PyTorch keeps the two switches
# separate.)

# %%
frozen = tfnorm.BatchNormalization()
frozen.build((None, 4))
frozen.moving_mean.assign(features.mean(axis=0))
frozen.moving_variance.assign(features.var(axis=0))
frozen.trainable = False
before = [v.numpy().copy() for v in frozen.weights]

out_train = frozen(x, training=True)
out_infer = frozen(x, training=False)
assert np.allclose(out_train, out_infer)

model = keras.Sequential([keras.Input((4,)), frozen, keras.layers.Dense(10)])
model.compile(
    optimizer=keras.optimizers.SGD(0.1),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
)
model.fit(features[:640], digits.y_train[:640], batch_size=64, verbose=0)
after = [v.numpy() for v in frozen.weights]
for variable, old, new in zip(frozen.weights, before, after, strict=True):
    print(f"{variable.name:16} changed by fit: {not np.array_equal(old, new)}")
    assert np.array_equal(old, new)

print(
    f"\ncells computed in {time.perf_counter() - started:.1f} s "
    "(imports and kernel start not counted)"
)
