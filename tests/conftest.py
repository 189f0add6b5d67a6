"""Test-wide setup: run JAX on the CPU unless the caller chose a platform.

Slow tests are selected with ``-m slow`` (pyproject's ``addopts`` deselects them by default).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
