"""Keras callbacks that drive tfnorm layers during training."""

from tfnorm.callbacks.drop_rate_schedule import DropRateSchedule
from tfnorm.callbacks.precise_bn import PreciseBN
from tfnorm.callbacks.renorm_clipping import RenormClippingSchedule
from tfnorm.callbacks.renorm_clipping import renorm_clipping_at

__all__ = [
    "DropRateSchedule",
    "PreciseBN",
    "RenormClippingSchedule",
    "renorm_clipping_at",
]
