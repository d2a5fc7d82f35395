"""Batch Normalization and its variants, on one statistics core."""

from tfnorm.normalization.batch_normalization import BatchNormalization
from tfnorm.normalization.batch_normalization import BatchRenormalization
from tfnorm.normalization.batch_normalization import GhostBatchNormalization

__all__ = [
    "BatchNormalization",
    "BatchRenormalization",
    "GhostBatchNormalization",
]
