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
# # 2. Internal covariate shift
#
# **Purpose:** watch the input distributions of a network's layers move
# during training, with and without Batch Normalization, and measure
# Santurkar et al.'s version of internal covariate shift to see whether BN
# actually reduces it.
#
# **Runtime:** about 19 s of CPU time (user + sys, run as a script;
# 31 s wall-clock on 2 cores shared with other jobs).
#
# ## An everyday picture
#
# Think of a small team writing one report, each person owning a chapter
# that builds on the chapters before it. Every evening all of them revise
# at once, each fixing their own chapter to fit what the others had
# written that morning. By the next day those other chapters have changed
# too, so part of every fix is already out of date, and the team spends
# much of its effort chasing a moving target. Everyone would make faster
# progress if what they build on held still.
#
# Ioffe and Szegedy (2015) described deep networks the same way. Every
# layer learns from the outputs of the layers below it, and at every step
# all layers change together, so each layer's *input distribution* keeps
# shifting. They called this **internal covariate shift** and proposed
# Batch Normalization to hold each layer's inputs at a fixed mean and
# variance. BN did make training much faster. Whether it did so *because*
# it removed that shift is a separate question, taken up in the second
# half.

# %%
import time

import keras
import matplotlib.pyplot as plt
import numpy as np

import tfnorm
from zoo import data
from zoo import models

started = time.perf_counter()
digits = data.load("digits")
probe_x = digits.x_val[:500]

STEPS = 300
EVERY = 30
BATCH = 64
LEARNING_RATE = 0.1
HIDDEN = (128,) * 4
VARIANTS = ("none", "bn_before")

# %% [markdown]
# ## Two networks, one training stream
#
# Both are the zoo's MLP with four hidden layers of 128 ReLU units, trained
# by plain SGD at learning rate 0.1 on the packaged MNIST digits. The
# `bn_before` variant puts `tfnorm.BatchNormalization` between each Dense
# layer and its ReLU. Both see the same batches in the same order.
#
# Every 30 steps we record, on 500 fixed validation digits:
#
# - the distribution of one unit's input to the last ReLU (its 15th, 50th
#   and 85th percentiles, as in Ioffe and Szegedy's Figure 1);
# - `tfnorm.diagnostics.layer_statistics`: per-unit mean and spread of
#   every layer's input, and how far they moved since the last checkpoint;
# - `tfnorm.diagnostics.internal_covariate_shift` on the current batch
#   (explained below).
#
# The probes run in training mode, as the layers see their inputs while
# learning, through Keras's `stateless_call`: they leave the weights and
# the BN moving statistics untouched.


# %%
def preactivations(probe, x):
    """Training-mode inputs of every activation, leaving state as it was."""
    outputs, _ = probe.stateless_call(
        [v.value for v in probe.trainable_variables],
        [v.value for v in probe.non_trainable_variables],
        x,
        training=True,
    )
    return {name: keras.ops.convert_to_numpy(t) for name, t in outputs.items()}


def train_and_watch(variant, seed=0):
    model = models.sgd_mlp(digits, variant, LEARNING_RATE, HIDDEN, seed=seed)
    probe = models.preactivation_model(model)
    order = np.random.default_rng(seed).permutation(len(digits.x_train))
    log = {"step": [], "percentiles": [], "drift": [], "ics": []}
    previous = None
    for step in range(STEPS + 1):
        start = (step * BATCH) % (len(order) - BATCH)
        idx = order[start : start + BATCH]
        xb, yb = digits.x_train[idx], digits.y_train[idx]
        if step % EVERY == 0:
            last = preactivations(probe, probe_x)[f"act_{len(HIDDEN)}"]
            stats = tfnorm.diagnostics.layer_statistics(
                model, probe_x, previous=previous
            )
            shift = tfnorm.diagnostics.internal_covariate_shift(
                model, xb, yb, learning_rate=LEARNING_RATE
            )
            log["step"].append(step)
            log["percentiles"].append(np.percentile(last[:, 0], [15, 50, 85]))
            log["drift"].append(
                {
                    name: entry.get("input_mean_drift", np.nan)
                    for name, entry in stats.items()
                    if entry["kind"] == "kernel"
                }
            )
            log["ics"].append(shift)
            previous = stats
        if step < STEPS:
            model.train_on_batch(xb, yb)
    loss, accuracy = model.evaluate(
        digits.x_val, digits.y_val, batch_size=500, verbose=0
    )
    log["val_accuracy"] = accuracy
    return log


logs = {variant: train_and_watch(variant) for variant in VARIANTS}
for variant, log in logs.items():
    print(
        f"{variant:10} validation accuracy after {STEPS} steps: "
        f"{log['val_accuracy']:.3f}"
    )

# %% [markdown]
# ## Layer inputs moving during training
#
# Left: the input of the last ReLU for one unit, on the same 500 digits,
# as training goes on (line: median; band: 15th to 85th percentile).
# Right: how far each layer's per-unit input means moved between
# checkpoints (root mean square change over units), averaged over the
# Dense layers after the first (the first layer's input is the images,
# which never move).

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for variant, log in logs.items():
    p = np.array(log["percentiles"])
    (line,) = axes[0].plot(log["step"], p[:, 1], label=variant)
    axes[0].fill_between(
        log["step"], p[:, 0], p[:, 2], color=line.get_color(), alpha=0.25
    )
    drift = [
        np.nanmean([v for name, v in d.items() if name != "dense_1"])
        for d in log["drift"][1:]
    ]
    axes[1].plot(log["step"][1:], drift, marker="o", label=variant)
axes[0].set_title("one unit's input to the last ReLU")
axes[0].set_xlabel("training step")
axes[1].set_title("movement of layer input means between checkpoints")
axes[1].set_xlabel("training step")
axes[1].set_yscale("log")
for ax in axes:
    ax.legend()
plt.tight_layout()
plt.show()

for variant, log in logs.items():
    p = np.array(log["percentiles"])
    print(
        f"{variant:10} median of that unit's input: step 0 {p[0, 1]:+.3f}, "
        f"step {STEPS} {p[-1, 1]:+.3f}; 15-85% width "
        f"{p[0, 2] - p[0, 0]:.3f} -> {p[-1, 2] - p[-1, 0]:.3f}"
    )

# %% [markdown]
# With BN the unit's input is the BN output, `gamma * x_hat + beta`: its
# median and spread can only move as fast as `gamma` and `beta` learn.
# Without BN they follow every change of all the weights below. That is
# the stability Ioffe and Szegedy were after. The right-hand plot shows
# the inputs of the Dense layers, which in the BN network are ReLUs of
# normalized values.
#
# ## Santurkar's measure: does BN reduce internal covariate shift?
#
# Santurkar et al. (2018, "How Does Batch Normalization Help
# Optimization?") asked what a layer actually suffers from when the layers
# below it change. Their answer (Definition 2.1): the layer's **gradient**
# changes. For layer `i` on one batch, take `G`, the gradient of the loss
# with respect to its weights, and `G'`, the same gradient after only the
# layers *before* `i` took their SGD step. If the layers below did not
# disturb layer `i`, `G'` would equal `G`. They report `||G - G'||` and
# the cosine between `G` and `G'`.
#
# `tfnorm.diagnostics.internal_covariate_shift` computes exactly this,
# without touching the model. Below: the relative change
# `||G - G'|| / ||G||` (lower means less shift) and the cosine (1 means
# no shift), averaged over the Dense layers after the first (the first
# has nothing before it, so its shift is 0 by definition).


# %%
def layer_average(shift, key):
    return np.mean(
        [entry[key] for name, entry in shift.items() if name != "dense_1"]
    )


fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
summary = {}
for variant, log in logs.items():
    relative = [layer_average(s, "relative") for s in log["ics"]]
    cosine = [layer_average(s, "cosine") for s in log["ics"]]
    summary[variant] = (np.mean(relative), np.mean(cosine))
    axes[0].plot(log["step"], relative, marker="o", label=variant)
    axes[1].plot(log["step"], cosine, marker="o", label=variant)
axes[0].set_title("||G - G'|| / ||G||  (lower: less shift)")
axes[1].set_title("cos(G, G')  (higher: less shift)")
for ax in axes:
    ax.set_xlabel("training step")
    ax.legend()
plt.tight_layout()
plt.show()

for variant, (relative, cosine) in summary.items():
    print(
        f"{variant:10} mean over checkpoints: relative change "
        f"{relative:.3f}, cosine {cosine:.3f}"
    )


def mean_drift(log):
    return np.nanmean(
        [
            np.nanmean([v for name, v in d.items() if name != "dense_1"])
            for d in log["drift"][1:]
        ]
    )


input_ratio = mean_drift(logs["bn_before"]) / mean_drift(logs["none"])
gradient_ratio = summary["bn_before"][0] / summary["none"][0]
print(
    f"\nBN / no BN, movement of the layer input means: {input_ratio:.2f}"
    f"\nBN / no BN, relative gradient change ||G - G'|| / ||G||: "
    f"{gradient_ratio:.2f}"
    f"\nvalidation accuracy: BN {logs['bn_before']['val_accuracy']:.3f}, "
    f"no BN {logs['none']['val_accuracy']:.3f}"
)

# %% [markdown]
# Santurkar et al. found BN's shift by this measure similar to, or larger
# than, a plain network's, and clearly larger in a deep linear network,
# even though BN trained better: the steadier *inputs* that BN gives did
# not come with steadier *gradients*, and the gradient is what a layer
# learns from. Compare the two ratios printed above: how much BN steadied
# the layer inputs, against how much it steadied the gradients. At this
# small scale the gradient comparison can come out either way between
# runs, and the two gradient measures (relative change and cosine) need
# not agree. They also trained a network with deliberate noise
# injected after every BN layer, so that its layer inputs moved *more*
# than without BN, and it trained nearly as well as BN (the zoo's
# `noisy_bn` variant, `tfnorm-zoo run basics`). Their conclusion: whatever
# BN does, reducing internal covariate shift is not the main reason it
# helps. Notebook 3 looks at what it does instead: it makes the loss
# landscape smoother.
#
# One seed and 300 steps on a CPU are a small sample; the zoo's
# experiments run several seeds and report the spread.

# %%
print(
    f"cells computed in {time.perf_counter() - started:.1f} s "
    "(imports and kernel start not counted)"
)
