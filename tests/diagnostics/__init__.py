"""Tests of tfnorm.diagnostics."""
