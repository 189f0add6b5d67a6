"""ppl: programmable variational inference and structured model families over NumPyro.

The core is a small objective DSL (:func:`sample_trace`, :func:`log_density`,
:func:`particles`, :func:`marginal`, :func:`normalize`) and :func:`value_and_grad`, which
turns an objective written with it into an unbiased gradient estimator, with the
estimator (REPARAM, REINFORCE, ENUM, MVD) chosen per sample site
(:mod:`ppl.transforms`). Drivers live in :mod:`ppl.inference`, model families in
:mod:`ppl.models`.
"""

from ppl import objectives, sparse
from ppl.dsl import Trace, add_cost, log_density, logmeanexp, particles, sample_trace
from ppl.grad import check_data, constrain_params, init_params, value_and_grad
from ppl.interop import as_numpyro_loss
from ppl.marginal import log_normalizer, marginal, normalize, sample_joint

__version__ = "0.1.0"

__all__ = [
    "Trace",
    "add_cost",
    "as_numpyro_loss",
    "check_data",
    "constrain_params",
    "init_params",
    "log_density",
    "log_normalizer",
    "logmeanexp",
    "marginal",
    "normalize",
    "objectives",
    "particles",
    "sample_joint",
    "sample_trace",
    "sparse",
    "value_and_grad",
]


def __getattr__(name):
    # ``import ppl`` then ``ppl.inference.SVI`` / ``ppl.models.get`` work without an explicit
    # import of the subpackage (loaded on first use: they pull in optax, arviz, ...).
    if name in ("inference", "models"):
        import importlib

        return importlib.import_module(f"ppl.{name}")
    raise AttributeError(f"module 'ppl' has no attribute {name!r}")
