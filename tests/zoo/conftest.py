"""Shared zoo test setup: tiny experiments that train in about a second."""

import pytest

from zoo import experiments


@pytest.fixture
def tiny():
    """`basics` in smoke size, restricted to two cheap variants."""
    return (
        experiments.get("basics")
        .shrink()
        .replace(variants=("none", "bn_before"), steps=6, eval_every=3)
    )
