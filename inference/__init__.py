"""Inference drivers: SVI (optax), BlackJAX NUTS, and ArviZ conversion.

Installed as ``ppl.inference``.
"""

import importlib

_EXPORTS = {
    "SVI": ".svi",
    "SVIState": ".svi",
    "SVIRunResult": ".svi",
    "NUTS": ".nuts",
    "to_inference_data": ".arviz",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
