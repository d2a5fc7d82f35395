"""tfnorm: Batch Normalization and dropout done right for Keras 3.

Public layers are re-exported here; families live in their own subpackages
(`tfnorm.normalization`, `tfnorm.dropout`, `tfnorm.callbacks`).
"""

from tfnorm import callbacks
from tfnorm.callbacks.precise_bn import precise_bn
from tfnorm.normalization import BatchNormalization
from tfnorm.normalization import BatchRenormalization
from tfnorm.normalization import GhostBatchNormalization

__version__ = "0.1.0"

__all__ = [
    "BatchNormalization",
    "BatchRenormalization",
    "GhostBatchNormalization",
    "callbacks",
    "precise_bn",
]
