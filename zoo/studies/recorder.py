"""Keeps tfnorm's diagnostics in the run folder, next to metrics.jsonl.

tfnorm's probe callbacks log to TensorBoard and keep their results in
memory (`history`). A report reads run folders, not live objects, so
`DiagnosticsRecorder` appends each new probe result, flattened to
scalars, as one JSON line of `diagnostics.jsonl` in the run's folder.
"""

import json
import math
from pathlib import Path

import keras
import numpy as np

DIAGNOSTICS_FILE = "diagnostics.jsonl"

LANDSCAPE_KEYS = (
    "loss",
    "grad_norm",
    "loss_min",
    "loss_max",
    "grad_change_min",
    "grad_change_max",
    "beta_smoothness",
)
ICS_KEYS = ("l2", "relative", "cosine")


def flatten_ics(result):
    return {
        f"ics/{layer}/{key}": values[key]
        for layer, values in result.items()
        for key in ICS_KEYS
    }


def flatten_landscape(result):
    return {f"landscape/{key}": result[key] for key in LANDSCAPE_KEYS}


def flatten_layers(result):
    """Every float of `layer_statistics` except the per-unit arrays."""
    return {
        f"layers/{layer}/{key}": value
        for layer, values in result.items()
        for key, value in values.items()
        if isinstance(value, float)
    }


def _finite(value):
    # Strict JSON has no NaN: a probe on diverged weights records null.
    value = float(value)
    return value if math.isfinite(value) else None


class DiagnosticsRecorder(keras.callbacks.Callback):
    """Appends the new results of probe callbacks to `diagnostics.jsonl`.

    Place it after the probes in the callback list. Each line holds the
    optimizer step and the flattened scalars of every probe that ran at
    that step. A resumed run (the zoo's checkpoints restore the optimizer
    step) first drops the lines written after its checkpoint, so the file
    ends as an uninterrupted run's would.

    Args:
        run_dir: The folder the run is being written in (the `.partial`
            one while it trains).
        probes: `(callback, flatten)` pairs: a tfnorm diagnostics callback
            and a function from one of its results to `{tag: float}`.
    """

    def __init__(self, run_dir, probes):
        super().__init__()
        self.path = Path(run_dir) / DIAGNOSTICS_FILE
        self.probes = list(probes)
        self._written = [0] * len(self.probes)

    def on_train_begin(self, logs=None):
        step = int(np.asarray(self.model.optimizer.iterations))
        kept = []
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line and json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
        self.path.write_text("".join(kept))
        self._written = [len(p.history) for p, _ in self.probes]

    def on_train_batch_end(self, batch, logs=None):
        lines = {}
        for i, (probe, flatten) in enumerate(self.probes):
            for step, result in probe.history[self._written[i] :]:
                line = lines.setdefault(step, {"step": step})
                line.update(
                    {tag: _finite(v) for tag, v in flatten(result).items()}
                )
            self._written[i] = len(probe.history)
        if lines:
            with open(self.path, "a") as file:
                for step in sorted(lines):
                    file.write(json.dumps(lines[step]) + "\n")


def load(run_dir):
    """The lines of a finished run's `diagnostics.jsonl`, in step order."""
    path = Path(run_dir) / DIAGNOSTICS_FILE
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted(lines, key=lambda line: line["step"])
