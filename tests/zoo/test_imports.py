"""tfnorm must never import the zoo or anything only the zoo needs."""

import json
import os
import subprocess
import sys

# Top-level packages that only the zoo (or TensorBoard's plugins) bring in.
ZOO_ONLY = (
    "zoo",
    "matplotlib",
    "rich",
    "mlxtend",
    "mnist1d",
    "tensorflow_datasets",
    "tensorboard.plugins",
)

# Keras itself imports rich and matplotlib, so the check is what tfnorm
# adds on top of `import keras, tensorflow`, in one fresh interpreter.
_SCRIPT = """
import json, sys
import keras, tensorflow
before = set(sys.modules)
import tfnorm, tfnorm.callbacks
print(json.dumps([sorted(before), sorted(sys.modules)]))
"""


def _zoo_only(modules):
    return {
        m
        for m in modules
        if any(m == name or m.startswith(name + ".") for name in ZOO_ONLY)
    }


def test_tfnorm_imports_no_zoo_code_or_zoo_dependencies():
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    ).stdout
    before, after = json.loads(out.splitlines()[-1])
    added = sorted(_zoo_only(after) - _zoo_only(before))
    assert added == [], f"import tfnorm pulled in zoo-only modules: {added}"
    assert "tfnorm" in after
