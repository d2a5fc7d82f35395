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
# # 8. Reading the zoo's results
#
# **Purpose:** run a small zoo experiment, find its results on disk and
# in TensorBoard (scalars, histograms, the HPARAMS comparison), then read
# the same curves back from the event files with TensorBoard's own event
# reader and plot them here.
#
# **Runtime:** about 27 s of CPU time (user + sys, run as a script;
# 38 s wall-clock on 2 cores shared with other jobs).

# %%
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from google.protobuf import json_format
from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
)
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

import tfnorm
from zoo import report

started = time.perf_counter()

# %% [markdown]
# ## A small run
#
# `tfnorm-zoo run basics` trains the `basics` comparison (several
# normalization variants, three seeds, 600 steps each; a few minutes on a
# laptop). Here we shrink it to seconds: `--smoke` makes the layers tiny
# and the run short, `--steps 60` lengthens it a little so that the curves
# have a shape, and `--variants` keeps two of the variants. The results
# go to a temporary folder. This is the same command a terminal would
# run, started from Python (`python -m zoo` is `tfnorm-zoo`).

# %%
logdir = Path(tempfile.mkdtemp(prefix="tfnorm_zoo_"))
command = [
    sys.executable,
    "-m",
    "zoo",
    "run",
    "basics",
    "--smoke",
    "--steps",
    "60",
    "--variants",
    "none,bn_before",
    "--logdir",
    str(logdir),
]
print("tfnorm-zoo", " ".join(command[3:]), "\n")
finished = subprocess.run(
    command,
    capture_output=True,
    text=True,
    # Plain text: no live progress bars or colour codes in the captured
    # output (Jupyter kernels set FORCE_COLOR, which rich would obey).
    env={
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "COLUMNS": "100",
        "TTY_COMPATIBLE": "0",
        "NO_COLOR": "1",
    },
    check=False,
)
print(finished.stdout)
if finished.returncode != 0:
    raise RuntimeError(finished.stderr[-3000:])

# %% [markdown]
# ## What is on disk
#
# One folder per experiment, one per run inside it:

# %%
exp_dir = next(logdir.glob("*/report.md")).parent
for path in sorted(exp_dir.rglob("*")):
    depth = len(path.relative_to(exp_dir).parts) - 1
    name = path.name + ("/" if path.is_dir() else "")
    if name.startswith("events.out.tfevents"):
        name = "events.out.tfevents.*"
    print("  " * depth + name)

run_dirs = sorted(p.parent for p in exp_dir.glob("*/*/result.json"))
first = run_dirs[0]
print(f"\n{first.relative_to(exp_dir)}/result.json:")
print((first / "result.json").read_text())

# %% [markdown]
# - `config.json` and `command.txt` say exactly what ran and how to run it
#   again; `result.json` says how it ended (completed, or diverged at
#   which step) with the final validation accuracy.
# - `metrics.jsonl` holds every logged scalar, one JSON object per line:
#   easy to read with any tool.
# - `events.out.tfevents.*` holds the same scalars, plus histograms and
#   hparams, for TensorBoard. The file in the experiment folder itself
#   declares the hparams and metrics that the HPARAMS tab lines up.
# - `report.md` and `val_accuracy.png` are the summary over seeds that the
#   command printed.
#
# ## In TensorBoard
#
# Start TensorBoard on the experiment folder (the report prints the
# command) and open http://localhost:6006:

# %%
print(report.tensorboard_command(exp_dir))

# %% [markdown]
# - **SCALARS**: one chart per tag (`train/loss`, `val/accuracy`, ...),
#   one line per run; the run names are the folder paths
#   (`bn_before/seed_0`), so the run filter box can select a variant or a
#   seed with a regular expression.
# - **HISTOGRAMS** (and **DISTRIBUTIONS**): `preactivations/act_i`, the
#   inputs of the i-th hidden ReLU on 256 fixed validation digits, at a few
#   steps of training: the layer input distributions of notebook 2.
# - **HPARAMS**: a table of all runs with their variant, seed and
#   hyperparameters and their final metrics; its parallel-coordinates
#   view shows at a glance which settings ended where.
#
# ## The same data, read back with TensorBoard's event reader
#
# `EventAccumulator` is the class TensorBoard itself uses to load event
# files. The zoo writes with `tf.summary`, which stores scalars and
# histograms as tensors, so they come back under the `tensors` key, each
# tagged with the plugin (scalars, histograms, hparams) that displays it.


# %%
def load(run_dir):
    """Every tensor summary of a run folder, grouped by plugin and tag."""
    accumulator = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    accumulator.Reload()
    by_plugin = {}
    for tag in accumulator.Tags()["tensors"]:
        plugin = accumulator.SummaryMetadata(tag).plugin_data.plugin_name
        by_plugin.setdefault(plugin, {})[tag] = accumulator.Tensors(tag)
    return accumulator, by_plugin


runs = {str(d.relative_to(exp_dir)): load(d) for d in run_dirs}
name, (accumulator, by_plugin) = next(iter(runs.items()))
for plugin, tags in by_plugin.items():
    print(f"{name}, {plugin}: {', '.join(tags)}")


def scalar_curve(by_plugin, tag):
    events = by_plugin["scalars"][tag]
    steps = np.array([e.step for e in events])
    values = np.array(
        [float(tensor_util.make_ndarray(e.tensor_proto)) for e in events]
    )
    return steps, values


# %% [markdown]
# The curves of every run, drawn from the event files:

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for name, (_, by_plugin) in runs.items():
    color = "C0" if name.startswith("none") else "C1"
    style = "-" if name.endswith("seed_0") else "--"
    for ax, tag in zip(axes, ("train/loss", "val/accuracy"), strict=True):
        steps, values = scalar_curve(by_plugin, tag)
        ax.plot(steps, values, style, color=color, marker=".", label=name)
for ax, tag in zip(axes, ("train/loss", "val/accuracy"), strict=True):
    ax.set_title(tag)
    ax.set_xlabel("step")
    ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# They are the numbers in `metrics.jsonl`, to float32 precision:

# %%
for name, (_, by_plugin) in runs.items():
    lines = [
        json.loads(line)
        for line in (exp_dir / name / "metrics.jsonl").read_text().split("\n")
        if line.strip()
    ]
    logged = [
        (r["step"], r["val/accuracy"]) for r in lines if "val/accuracy" in r
    ]
    steps, values = scalar_curve(by_plugin, "val/accuracy")
    assert [s for s, _ in logged] == list(steps), name
    assert np.allclose([v for _, v in logged], values, rtol=1e-6), name
    print(f"{name}: {len(logged)} validation points agree")

# %% [markdown]
# ## Histograms
#
# A histogram summary is a tensor of `(left edge, right edge, count)`
# rows. Below: the input of the first hidden ReLU, at the first and the
# last recorded step, for each variant (seed 0). With BN it is the BN
# output; without, the raw Dense output. The zoo records these in
# inference mode, so BN uses its moving statistics, which at step 0 are
# still their initial values (mean 0, variance 1): both networks start
# out alike.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), sharey=True)
for ax, variant in zip(axes, ("none", "bn_before"), strict=True):
    _, by_plugin = runs[f"{variant}/seed_0"]
    events = by_plugin["histograms"]["preactivations/act_1"]
    for event, style in ((events[0], ":"), (events[-1], "-")):
        buckets = tensor_util.make_ndarray(event.tensor_proto)
        centers = (buckets[:, 0] + buckets[:, 1]) / 2
        widths = np.maximum(buckets[:, 1] - buckets[:, 0], 1e-12)
        ax.plot(
            centers, buckets[:, 2] / widths, style, label=f"step {event.step}"
        )
    ax.set_title(f"{variant}: input of the first ReLU")
    ax.set_xlabel("value")
    ax.legend()
axes[0].set_ylabel("density (count / bucket width)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The HPARAMS table, rebuilt
#
# Each run's event file carries a `session_start_info` record with its
# hyperparameters, in the hparams plugin's protocol buffer format. Joined
# with the last value of each metric, it gives the table that TensorBoard's
# HPARAMS tab shows.

# %%
print(f"{'run':18}{'variant':12}{'seed':>5}{'lr':>6}{'steps':>7}{'val acc':>9}")
for name, (accumulator, by_plugin) in runs.items():
    content = accumulator.PluginTagToContent("hparams")
    info = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]
    ).session_start_info
    # Each value is a protobuf Value; MessageToDict turns them into floats
    # and strings.
    hparams = json_format.MessageToDict(info)["hparams"]
    _, accuracy = scalar_curve(by_plugin, "val/accuracy")
    print(
        f"{name:18}{hparams['variant']:12}{int(hparams['seed']):5}"
        f"{hparams['learning_rate']:6g}{int(hparams['steps']):7}"
        f"{accuracy[-1]:9.3f}"
    )

# %% [markdown]
# A 60-step smoke run with 16-unit layers says little about BN itself; the
# point here is where the numbers are. For the real comparison run
# `tfnorm-zoo run basics` and read `runs/basics/report.md`.

# %%
print(f"tfnorm {tfnorm.__version__}")
# The run was only an example: remove its temporary folder (skip this line
# to keep it and open it in TensorBoard).
shutil.rmtree(logdir)
print(
    f"cells computed in {time.perf_counter() - started:.1f} s "
    "(imports and kernel start not counted)"
)
