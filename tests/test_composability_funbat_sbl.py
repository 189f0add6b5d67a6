"""FunBaT CEP and KroSBL EM either use every site of the user's model or refuse it.

CEP (:func:`ppl.inference.funbat.fit`) and EM (:func:`ppl.inference.sbl.fit_model`) update
a fixed set of sites; a model with more (an offset, another likelihood) must not come back
with those sites silently left at their prior.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from ppl.inference import funbat
from ppl.models import funbat as fm
from ppl.transforms.state_space import GaussianProcess, Matern

KERNEL = Matern(0.5, 0.2, 1.0)


def _funbat_data(n=200):
    d = fm.load_default("synthetic2")
    return d["train_indexes"][:n], d["train_y"][:n]


def _tucker_with(indexes, y=None, *, offset=None, lik="normal"):
    """``fm.model`` (ranks 2) written out, plus an optional extra site."""
    idx = np.asarray(indexes)
    us = []
    for k in range(idx.shape[1]):
        grid, pos = np.unique(idx[:, k], return_inverse=True)
        with numpyro.plate(f"rank_{k}", 2):
            u = numpyro.sample(f"u_{k}", GaussianProcess(KERNEL, grid))
        us.append(u[:, pos].T)
    W = numpyro.sample("W", dist.Normal(0.0, 1.0).expand((2, 2)).to_event(2))
    tau = numpyro.sample("tau", dist.Gamma(1.0, 1.0))
    mean = fm.tucker_mean(W, us)
    if offset == "latent":
        mean = mean + numpyro.sample("b", dist.Normal(0.0, 3.0))
    elif offset == "fixed":
        mean = mean + 2.0
    with numpyro.plate("data", idx.shape[0]):
        if lik == "normal":
            numpyro.sample("y", dist.Normal(mean, 1.0 / jnp.sqrt(tau)), obs=y)
        else:
            numpyro.sample("y", dist.StudentT(3.0, mean, 1.0 / jnp.sqrt(tau)), obs=y)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"offset": "latent"}, r"\['b'\].*state_space\(model\)"),
        ({"offset": "fixed"}, r"mean of site 'y' is not the Tucker mean"),
        ({"lik": "student"}, r"StudentT likelihood.*NUTS"),
    ],
)
def test_funbat_cep_refuses_sites_it_cannot_update(kwargs, match):
    idx, y = _funbat_data()
    model = functools.partial(_tucker_with, **kwargs)
    with pytest.raises(ValueError, match=match):
        funbat.fit(jax.random.PRNGKey(0), model, idx, y, funbat.FunBaTConfig(num_iters=2))


def test_funbat_cep_plain_model_still_fits():
    """The same program without the extra site fits, and agrees with ``fm.model``."""
    idx, y = _funbat_data()
    cfg = funbat.FunBaTConfig(num_iters=30)
    key = jax.random.PRNGKey(0)
    mine = funbat.fit(key, _tucker_with, idx, y, cfg)
    ref = funbat.fit(key, functools.partial(fm.model, ranks=2, kernels=KERNEL), idx, y, cfg)
    np.testing.assert_allclose(mine.state.pred, ref.state.pred, rtol=1e-8, atol=1e-10)
    # a real fit: train RMSE near the noise sd 0.1 (sd(y) ≈ 0.36)
    assert float(mine.history["train_rmse"][-1]) < 0.15
