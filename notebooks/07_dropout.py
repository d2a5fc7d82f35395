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
# # 7. Dropout: the flavors, the variance shift, MC dropout
#
# **Purpose:** see what each dropout flavor removes from the same digit;
# measure the variance shift that dropout causes when it sits before a BN
# layer, against its formula, and fix it; and use dropout at test time
# (MC dropout) to get an uncertainty estimate.
#
# **Runtime:** about 20 s of CPU time (user + sys, run as a script;
# 34 s wall-clock on 2 cores shared with other jobs).

# %%
import time

import keras
import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf

import tfnorm
from zoo import data
from zoo import models

started = time.perf_counter()
digits = data.load("digits")
keras.utils.set_random_seed(0)

# %% [markdown]
# ## The flavors side by side
#
# Every flavor below is active only in training mode and is the identity
# at inference. Each row applies one layer, in training mode, to a batch
# of six copies of the same digit, so the six columns are six independent
# draws of its noise:
#
# - `Dropout`: each value kept with probability `1 - p` and scaled by
#   `1 / (1 - p)` (so the expected value is unchanged);
# - `GaussianDropout`: each value multiplied by noise from
#   `N(1, p / (1 - p))`;
# - `tfnorm.Uout`: each value multiplied by `1 + u`, `u ~ U(-r, r)`;
# - `tfnorm.DropBlock2D`: whole square blocks dropped, for convolutional
#   maps whose neighbouring pixels carry the same information;
# - `SpatialDropout2D`: whole channels dropped (this image has one
#   channel, so each copy is kept or lost entirely);
# - `tfnorm.DropPath`: a whole sample's input dropped (stochastic depth,
#   used on residual branches).

# %%
image = digits.x_val[7].reshape(1, 28, 28, 1)
copies = np.repeat(image, 6, axis=0)
flavors = {
    "Dropout(0.3)": keras.layers.Dropout(0.3, seed=1),
    "GaussianDropout(0.3)": keras.layers.GaussianDropout(0.3, seed=2),
    "Uout(0.5)": tfnorm.Uout(0.5, seed=3),
    "DropBlock2D(0.3, block 7)": tfnorm.DropBlock2D(0.3, 7, seed=4),
    "SpatialDropout2D(0.3)": keras.layers.SpatialDropout2D(0.3, seed=5),
    "DropPath(0.3)": tfnorm.DropPath(0.3, seed=6),
}
fig, axes = plt.subplots(len(flavors), 7, figsize=(10, 9.5))
for row, (name, layer) in zip(axes, flavors.items(), strict=True):
    out = keras.ops.convert_to_numpy(layer(copies, training=True))
    same = keras.ops.convert_to_numpy(layer(copies, training=False))
    assert np.array_equal(same, copies), name
    row[0].imshow(image[0, :, :, 0], cmap="gray_r", vmin=0, vmax=1)
    for ax, draw in zip(row[1:], out, strict=True):
        ax.imshow(draw[:, :, 0], cmap="gray_r", vmin=0, vmax=1.5)
    row[0].set_ylabel(name, rotation=0, ha="right", va="center")
    for ax in row:
        ax.set_xticks([])
        ax.set_yticks([])
axes[0, 0].set_title("input")
for i, ax in enumerate(axes[0, 1:], start=1):
    ax.set_title(f"draw {i}")
plt.tight_layout()
plt.show()

# %% [markdown]
# The realized fraction of zeroed values and the mean output, measured on
# 256 maps of ones (so every position counts), overall and in the central
# 14x14 square where the ink of a digit is. Every flavor keeps the mean
# at 1 overall: the scaling makes up for what is dropped.

# %%
ones = np.ones((256, 28, 28, 1), "float32")
center = (slice(None), slice(7, 21), slice(7, 21))
for name, layer in flavors.items():
    out = keras.ops.convert_to_numpy(layer(ones, training=True))
    print(
        f"{name:26} zeroed {np.mean(out == 0):5.1%} "
        f"(center {np.mean(out[center] == 0):5.1%})   "
        f"mean output {out.mean():.3f}"
    )

# %% [markdown]
# DropBlock drops the center more often than the border: a block may
# start only where it fits inside the map, so central positions are
# covered by more possible blocks than edge ones.
#
# `tfnorm.DropConnect` drops *weights* instead of activations: it wraps a
# Dense or convolution layer and draws a fresh mask over its kernel at
# every training call. The same input then gives a different output each
# time in training, and exactly the wrapped layer's output at inference:

# %%
dense = keras.layers.Dense(
    3, kernel_initializer=keras.initializers.GlorotUniform(seed=0)
)
connect = tfnorm.DropConnect(dense, rate=0.5, seed=0)
x = digits.x_val[:1].reshape(1, -1)
for _ in range(3):
    print("training: ", np.round(connect(x, training=True).numpy()[0], 3))
print("inference:", np.round(connect(x, training=False).numpy()[0], 3))
print("the Dense:", np.round(dense(x).numpy()[0], 3))

# %% [markdown]
# ## Dropout before BN: the variance shift
#
# Li et al. (2019) noticed that dropout placed right before a BN layer
# makes BN learn the wrong variance. Take a unit with mean `c` and
# variance `v`, and dropout with keep probability `q = 1 - p`. In
# training, dropout's output `x * m / q` (`m` a 0/1 mask) has variance
#
# `(c^2 + v) / q - c^2`,
#
# larger than `v`, and BN's moving variance learns that. At inference
# dropout is off, the variance is back to `v`, and BN, still dividing by
# the training variance, shrinks every unit.
#
# First the formula, checked on real activations: the ReLU outputs of a
# random Dense layer of 64 units on 1,000 digits.

# %%
features = keras.Sequential(
    [keras.Input((784,)), keras.layers.Dense(64, activation="relu")]
)
x = digits.x_val
a = keras.ops.convert_to_numpy(features(x))
c, v = a.mean(axis=0), a.var(axis=0)

fig, ax = plt.subplots(figsize=(5, 4))
for p in (0.1, 0.3, 0.5):
    q = 1 - p
    dropped = keras.ops.convert_to_numpy(
        keras.layers.Dropout(p, seed=2)(a, training=True)
    )
    measured = dropped.var(axis=0)
    predicted = (c**2 + v) / q - c**2
    error = np.median(np.abs(measured / predicted - 1))
    print(
        f"p={p}: training variance / inference variance, predicted "
        f"{np.median(predicted / v):.2f}, measured "
        f"{np.median(measured / v):.2f} (median over units); median "
        f"relative error of the formula {error:.1%}"
    )
    ax.scatter(predicted, measured, s=8, label=f"p = {p}")
lim = [0, ax.get_xlim()[1]]
ax.plot(lim, lim, "k--", lw=1)
ax.set_xlabel("(c^2 + v) / q - c^2")
ax.set_ylabel("measured variance after dropout")
ax.legend()
plt.show()

# %% [markdown]
# Now the consequence. The same features feed `Dropout(0.5)` and then
# `tfnorm.BatchNormalization(momentum=0.9)`, and the BN layer learns its
# moving statistics from 100 training-mode batches of 100 digits (with
# momentum 0.9 the initial values keep a weight of `0.9^100`, nothing).
# At inference, a well-calibrated BN layer would output unit variance.
# We also try `tfnorm.Uout(0.5)` in place of dropout (its noise has variance
# `r^2 / 3`, a smaller shift), and then repair the dropout network with
# `tfnorm.precise_bn`, which recomputes the statistics with dropout off.


# %%
def bn_after(noise):
    """The features, a noise layer, then a BN layer (shared features)."""
    return keras.Sequential(
        [
            keras.Input((784,)),
            features,
            noise,
            tfnorm.BatchNormalization(momentum=0.9),
        ]
    )


def inference_std(model):
    out = keras.ops.convert_to_numpy(model(x, training=False))
    return np.median(out.std(axis=0))


rng = np.random.default_rng(0)
inputs = tf.data.Dataset.from_tensor_slices(digits.x_train).batch(100)
rows = []
for name, noise in (
    ("Dropout(0.5)", keras.layers.Dropout(0.5, seed=3)),
    ("Uout(0.5)", tfnorm.Uout(0.5, seed=3)),
):
    model = bn_after(noise)
    for _ in range(100):
        model(digits.x_train[rng.choice(4000, 100)], training=True)
    rows.append((name, inference_std(model)))
    if name.startswith("Dropout"):
        tfnorm.precise_bn(model, inputs, num_batches=20)
        rows.append((name + " + precise_bn", inference_std(model)))
for name, std in rows:
    print(f"{name:26} BN output std at inference: {std:.3f} (median unit)")
shift = (c**2 + v) / 0.5 - c**2
print(
    "predicted for Dropout(0.5) from the formula: "
    f"{np.median(np.sqrt(v / shift)):.3f}"
)

# %% [markdown]
# Dropout before BN leaves BN's inference outputs too narrow, by about the
# square root of the variance ratio above; Uout's smaller shift leaves
# them closer to 1, and PreciseBN, estimating the statistics with dropout
# off, brings them back. The next layer was trained on the wider training
# distribution, so the shrunk one costs accuracy. The simplest fix is to
# put dropout after the last BN layer only.
#
# ## MC dropout: dropout at test time as uncertainty
#
# Gal and Ghahramani (2016) keep dropout on at test time and average `T`
# stochastic passes: the mean is the prediction and the spread says how
# much the network hesitates. The usual Keras trick, `training=True`,
# would also switch BN to batch statistics; `tfnorm.mc_predict` turns on
# only the dropout layers and keeps BN in inference mode.
#
# The zoo's `bn_dropout` MLP (BN before each ReLU, dropout 0.3 after it,
# two hidden layers of 128) is trained for five passes at learning rate
# 0.5; then we compare a single deterministic pass with the mean of 30
# dropout passes.

# %%
model = models.build_mlp(
    digits.input_shape,
    digits.num_classes,
    variant="bn_dropout",
    hidden_units=(128, 128),
    dropout_rate=0.3,
)
model.compile(
    optimizer=keras.optimizers.SGD(0.5),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
)
model.fit(digits.x_train, digits.y_train, batch_size=64, epochs=5, verbose=0)
probabilities = keras.Sequential([model, keras.layers.Softmax()])

single = probabilities.predict(digits.x_val, batch_size=500, verbose=0)
mc = tfnorm.mc_predict(probabilities, digits.x_val, samples=30, batch_size=500)


def calibration_error(p, y, bins=10):
    """Expected calibration error: |accuracy - confidence| over bins."""
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == y
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            gap = abs(correct[inside].mean() - confidence[inside].mean())
            total += inside.mean() * gap
    return total


y = digits.y_val
scores = {}
for name, p in (("single pass", single), ("MC dropout, T=30", mc["mean"])):
    nll = -np.mean(np.log(p[np.arange(len(y)), y] + 1e-12))
    scores[name] = nll
    print(
        f"{name:17} accuracy {np.mean(p.argmax(1) == y):.3f}   "
        f"NLL {nll:.3f}   ECE {calibration_error(p, y):.3f}   "
        f"mean confidence {p.max(1).mean():.3f}"
    )
better = scores["MC dropout, T=30"] < scores["single pass"]
print(f"MC dropout's NLL is {'lower' if better else 'higher'} here.")

# %% [markdown]
# Lower NLL and ECE mean better-calibrated probabilities. Gal and
# Ghahramani found the MC average better on both; on a network this small,
# trained this briefly, it can go the other way: averaging over masks
# makes the predictions less confident, which helps an overconfident
# network and hurts an underconfident one (compare the mean confidence
# with the accuracy). What MC dropout adds in any case is a per-example
# uncertainty: the entropy of the mean prediction. Below, its
# distribution for the digits the network got right and wrong, and the
# six digits it was least sure about, with the mean and the spread over
# the 30 passes of the probability it gave its answer.

# %%
entropy = mc["entropy"]
wrong = mc["mean"].argmax(1) != y
fig, ax = plt.subplots(figsize=(6, 3.2))
bins = np.linspace(0, entropy.max(), 30)
ax.hist(entropy[~wrong], bins=bins, alpha=0.6, density=True, label="right")
ax.hist(entropy[wrong], bins=bins, alpha=0.6, density=True, label="wrong")
ax.set_xlabel("predictive entropy of the MC mean (nats)")
ax.legend()
plt.show()

fig, axes = plt.subplots(1, 6, figsize=(10, 2.2))
for ax, index in zip(axes, np.argsort(entropy)[-6:], strict=True):
    ax.imshow(digits.x_val[index].reshape(28, 28), cmap="gray_r")
    top = mc["mean"][index].argmax()
    ax.set_title(
        f"label {y[index]}, says {top}\n"
        f"p {mc['mean'][index, top]:.2f} ± {mc['std'][index, top]:.2f}",
        fontsize=9,
    )
    ax.axis("off")
plt.show()

print(
    f"mean entropy: right {entropy[~wrong].mean():.3f} nats, "
    f"wrong {entropy[wrong].mean():.3f} nats ({wrong.sum()} wrong of "
    f"{len(y)})"
)

# %%
print(
    f"cells computed in {time.perf_counter() - started:.1f} s "
    "(imports and kernel start not counted)"
)
