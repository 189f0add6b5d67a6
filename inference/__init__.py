"""Inference drivers: SVI (optax), BlackJAX NUTS, EM for sparse Bayesian learning
(:mod:`ppl.inference.sbl`), conditional EP with Kalman smoothing for FunBaT
(:mod:`ppl.inference.funbat`, :mod:`ppl.inference.kalman`), and ArviZ conversion.

Installed as ``ppl.inference``. Names and submodules are imported lazily.
"""

import importlib

_EXPORTS = {
    "SVI": ".svi",
    "SVIState": ".svi",
    "SVIRunResult": ".svi",
    "NUTS": ".nuts",
    "to_inference_data": ".arviz",
    "SSVI": ".ssvi",
    "SSVIResult": ".ssvi",
    "cosine_fraction": ".ssvi",
    "density_scaled": ".ssvi",
}

#: Algorithm modules reachable as attributes (``ppl.inference.sbl``).
_SUBMODULES = ("fbm", "funbat", "kalman", "nngp", "sbl", "ssvi")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
