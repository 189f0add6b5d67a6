"""Shared pieces of the benchmark scripts: markdown tables, number formats, wall-clock timing.

Scripts run as ``python benchmarks/NAME.py``, so this directory is on ``sys.path`` and they
import it as ``from _report import ...``.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time

import jax
import numpy as np


def header(title, lines=()):
    print(f"\n## {title}\n")
    for line in lines:
        print(line)
    if lines:
        print()
    sys.stdout.flush()


def table(cols, rows):
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    sys.stdout.flush()


def fmt(v, digits=4):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}"


def sci(v):
    if v is None or not math.isfinite(v):
        return "–"
    return "0" if v == 0 else f"{v:.1e}"


def secs(s):
    if s is None:
        return "–"
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - start


def steady(fn, repeats, budget=10.0):
    """Median wall time of ``fn()`` over up to ``repeats`` calls (at least one; stops once
    ``budget`` seconds are spent). Returns ``(median, calls, last output)``."""
    times, out = [], None
    for _ in range(max(1, repeats)):
        out, dt = timed(fn)
        times.append(dt)
        if sum(times) > budget:
            break
    return float(np.median(times)), len(times), out


def machine_line():
    dev = jax.devices()[0]
    return (
        f"jax {jax.__version__}, numpy {np.__version__}, backend {jax.default_backend()} "
        f"({dev.device_kind}, {jax.device_count()} device(s)), {os.cpu_count()} CPU core(s), "
        f"{platform.processor() or platform.machine()}, load average "
        f"{os.getloadavg()[0]:.1f}; OPENBLAS_NUM_THREADS="
        f"{os.environ.get('OPENBLAS_NUM_THREADS')}, XLA_FLAGS="
        f"{os.environ.get('XLA_FLAGS', '')!r}"
    )
