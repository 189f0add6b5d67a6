"""Program transformations over NumPyro models and guides.

Installed as ``ppl.transforms``. Gradient-estimator choice per sample site lives in
:mod:`ppl.transforms.estimators`; structure transforms of the model families are
added as one module each.
"""

from .estimators import ENUM, MVD, REINFORCE, REPARAM, Estimator, estimators

__all__ = ["ENUM", "MVD", "REINFORCE", "REPARAM", "Estimator", "estimators"]
