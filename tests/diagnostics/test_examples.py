"""The docstring examples of tfnorm.diagnostics run as written."""

import doctest

import pytest

from tfnorm.diagnostics import callbacks
from tfnorm.diagnostics import ics
from tfnorm.diagnostics import landscape
from tfnorm.diagnostics import layer_stats


@pytest.mark.parametrize(
    "module", [ics, landscape, layer_stats, callbacks], ids=lambda m: m.__name__
)
def test_examples(module):
    result = doctest.testmod(module, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0
