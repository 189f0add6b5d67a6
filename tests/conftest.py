"""Test-wide setup: run JAX on the CPU unless the caller chose a platform, and compile with
XLA's CPU backend optimisation level 0 unless ``XLA_FLAGS`` already sets one.

Most of the suite's time is XLA compiling many small programs, each run a few times; at
``--xla_backend_optimization_level=0`` (LLVM codegen without its optimisation passes; the
HLO-level optimisations, and so the programs' semantics, are unchanged) test_spec_progvi,
test_nuts, test_transforms_nngp and test_docstrings together took a third less CPU time than
at the default level (446 -> 295 s CPU, 329 -> 237 s wall, -n 0 on 2 idle cores), the fBM
notebook a fifth less; a few compute-bound tests (test_finite_cnn_network_matches_its_kernel)
run slower. The setting reaches the subprocesses the
tests start (notebook kernels, README blocks, the ``ppl`` console script) through the
environment. Run with ``XLA_FLAGS=--xla_backend_optimization_level=2`` (or any level) to
test at another level.

Slow tests are selected with ``-m slow`` (pyproject's ``addopts`` deselects them by default).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()


def pytest_collection_modifyitems(config, items):
    """Run the notebook tests first. Under pytest-xdist (``--dist loadscope
    --no-loadscope-reorder``, pyproject's addopts) a module runs on one worker and modules
    are handed out in collection order. The notebooks are the longest module by time but
    hold few tests, so xdist's default order (most tests first) started them last and left
    the other workers idle at the end."""
    items.sort(key=lambda item: not item.nodeid.startswith("tests/test_notebooks.py"))
