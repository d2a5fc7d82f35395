"""Dropout flavors that Keras lacks."""

from tfnorm.dropout.concrete import ConcreteDropout
from tfnorm.dropout.dropblock import DropBlock1D
from tfnorm.dropout.dropblock import DropBlock2D
from tfnorm.dropout.dropconnect import DropConnect
from tfnorm.dropout.droppath import DropPath
from tfnorm.dropout.droppath import stochastic_depth_rates
from tfnorm.dropout.mc import mc_predict
from tfnorm.dropout.uout import Uout

__all__ = [
    "ConcreteDropout",
    "DropBlock1D",
    "DropBlock2D",
    "DropConnect",
    "DropPath",
    "Uout",
    "mc_predict",
    "stochastic_depth_rates",
]
