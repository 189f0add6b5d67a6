"""Test-wide setup: run JAX on the CPU unless the caller chose a platform.

Slow tests are selected with ``-m slow`` (pyproject's ``addopts`` deselects them by default).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_collection_modifyitems(config, items):
    """Run the notebook tests first. Under pytest-xdist (``--dist loadscope``) a module runs
    on one worker, in collection order; the notebooks are the longest module (about 4 minutes
    on 2 cores), and started last they left the other workers idle at the end."""
    items.sort(key=lambda item: not item.nodeid.startswith("tests/test_notebooks.py"))
