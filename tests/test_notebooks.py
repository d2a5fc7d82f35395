"""Every notebook in `notebooks/` runs top to bottom, and reads as promised.

The notebooks are stored as jupytext py:percent text. Each is converted in
memory and executed by nbclient in a kernel started from this interpreter,
so the test needs only the dev extra (jupytext, nbclient, ipykernel), not
a Jupyter installation or a registered kernel.
"""

import ast
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import AsyncKernelManager  # noqa: E402
from jupyter_client.utils import run_sync  # noqa: E402

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))
KERNEL_NAME = "tfnorm-notebooks"

# Each notebook is written to finish in well under a minute on 2 CPU
# cores; the limit leaves room for a loaded CI machine without letting a
# hung cell stall the suite.
CELL_TIMEOUT_S = 300


def _ids(paths):
    return [path.stem for path in paths]


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    """A kernelspec that starts ipykernel with this very interpreter.

    A `python3` spec found on the Jupyter path may belong to another
    environment; this one cannot.
    """
    root = tmp_path_factory.mktemp("kernels")
    kernelspec.write_kernel_spec(path=root / KERNEL_NAME)
    return root


def test_all_notebooks_found():
    assert [path.name[:2] for path in NOTEBOOKS] == [
        f"{i:02d}" for i in range(1, 9)
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_shape(path):
    """Header first, tfnorm and zoo imported, no classes of its own."""
    notebook = jupytext.read(path)
    header = notebook.cells[0]
    assert header.cell_type == "markdown", path.name
    assert header.source.startswith("# "), path.name
    assert "Runtime:" in header.source, path.name
    code = "\n".join(
        cell.source for cell in notebook.cells if cell.cell_type == "code"
    )
    tree = ast.parse(code)
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
        assert not isinstance(node, ast.ClassDef), (
            f"{path.name} defines class {node.name}: notebooks take their "
            "layers and models from tfnorm, zoo and Keras"
        )
    assert {"tfnorm", "zoo"} <= imported, (path.name, sorted(imported))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs(path, kernel_dir):
    notebook = jupytext.read(path)
    manager = AsyncKernelManager(
        kernel_name=KERNEL_NAME,
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]),
    )
    client = nbclient.NotebookClient(
        notebook,
        km=manager,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    # A failing cell raises CellExecutionError, naming the cell and
    # showing its traceback. The kernel is ours (passed in), so nbclient
    # leaves it running: each would hold its TensorFlow (about 1 GB)
    # until pytest exits.
    try:
        client.execute()
    finally:
        if manager.has_kernel:
            run_sync(manager.shutdown_kernel)(now=True)
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors, errors
