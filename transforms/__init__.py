"""Program transformations over NumPyro models and guides.

Installed as ``ppl.transforms``. Gradient-estimator choice per sample site lives in
:mod:`ppl.transforms.estimators`; structure transforms of the model families are
added as one module each.
"""

from .estimators import ENUM, MVD, REINFORCE, REPARAM, Estimator, estimators
from .subspace import (
    CRITERIA,
    SparseGuide,
    SubspaceState,
    criterion_scores,
    erk_densities,
    restrict_prior,
    sparse_subspace,
    update_support,
)

__all__ = [
    "CRITERIA",
    "ENUM",
    "MVD",
    "REINFORCE",
    "REPARAM",
    "Estimator",
    "SparseGuide",
    "SubspaceState",
    "criterion_scores",
    "erk_densities",
    "estimators",
    "restrict_prior",
    "sparse_subspace",
    "update_support",
]
