"""Instruments for why BN helps: covariate shift, landscape, statistics.

Each probe is a function that returns plain Python floats and numpy arrays,
and a Keras callback that runs it every N training steps and logs it to
TensorBoard under `diagnostics/...`. Every probe evaluates the model through
`model.stateless_call`, so weights, optimizer state, BN moving statistics
and dropout seeds stay exactly as they were.
"""

from tfnorm.diagnostics.callbacks import InternalCovariateShiftCallback
from tfnorm.diagnostics.callbacks import LayerStatisticsCallback
from tfnorm.diagnostics.callbacks import LossLandscapeCallback
from tfnorm.diagnostics.ics import internal_covariate_shift
from tfnorm.diagnostics.landscape import DEFAULT_STEP_SIZES
from tfnorm.diagnostics.landscape import loss_landscape
from tfnorm.diagnostics.layer_stats import layer_statistics

__all__ = [
    "DEFAULT_STEP_SIZES",
    "InternalCovariateShiftCallback",
    "LayerStatisticsCallback",
    "LossLandscapeCallback",
    "internal_covariate_shift",
    "layer_statistics",
    "loss_landscape",
]
