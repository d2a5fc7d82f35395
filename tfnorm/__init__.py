"""tfnorm: Batch Normalization and dropout done right for Keras 3.

Public layers are re-exported here; families live in their own subpackages
(`tfnorm.normalization`, `tfnorm.dropout`, `tfnorm.callbacks`).
"""

from tfnorm import callbacks
from tfnorm import diagnostics
from tfnorm.callbacks.precise_bn import precise_bn
from tfnorm.dropout import ConcreteDropout
from tfnorm.dropout import DropBlock1D
from tfnorm.dropout import DropBlock2D
from tfnorm.dropout import DropConnect
from tfnorm.dropout import DropPath
from tfnorm.dropout import Uout
from tfnorm.dropout import mc_predict
from tfnorm.dropout import stochastic_depth_rates
from tfnorm.normalization import BatchNormalization
from tfnorm.normalization import BatchRenormalization
from tfnorm.normalization import GhostBatchNormalization

__version__ = "0.1.0"

__all__ = [
    "BatchNormalization",
    "BatchRenormalization",
    "ConcreteDropout",
    "DropBlock1D",
    "DropBlock2D",
    "DropConnect",
    "DropPath",
    "GhostBatchNormalization",
    "Uout",
    "callbacks",
    "diagnostics",
    "mc_predict",
    "precise_bn",
    "stochastic_depth_rates",
]
