"""Test-wide setup: run JAX on the CPU unless the caller chose a platform.

Slow tests are selected with ``-m slow`` (pyproject's ``addopts`` deselects them by default).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_collection_modifyitems(config, items):
    """Run the notebook tests first. Under pytest-xdist (``--dist loadscope
    --no-loadscope-reorder``, pyproject's addopts) a module runs on one worker and modules
    are handed out in collection order. The notebooks are the longest module by time but
    hold few tests, so xdist's default order (most tests first) started them last and left
    the other workers idle at the end."""
    items.sort(key=lambda item: not item.nodeid.startswith("tests/test_notebooks.py"))
