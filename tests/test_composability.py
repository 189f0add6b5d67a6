"""The family transforms on a user's own model, under every inference route.

For each family transform (``kronecker_prior``, ``state_space``, ``infinite_width`` with
``scale_mixture``, ``markov_fbm``) a model written here has a plate, an observed
likelihood and one extra hierarchical parameter ``b`` that no family knows about (an
offset of the mean). The transformed model:

* fits under ``ppl.inference.SVI`` with an ``AutoNormal`` guide for ``elbo``,
  ``iwelbo(4)`` and ``renyi(0.5, 4)`` (finite losses, the late losses below the early
  ones) and converts to ArviZ with ``b`` in the posterior;
* fits under ``numpyro.infer.SVI`` with ``loss=ppl.as_numpyro_loss(...)``;
* samples under ``ppl.inference.NUTS`` and NumPyro's ``MCMC(NUTS)``: the posterior means
  of ``b`` agree within 4 combined Monte Carlo standard errors (ArviZ ``mcse_mean``).

The families' own algorithms on such models (their refusals or extensions) are tested in
``tests/test_composability_*.py``.
"""

from __future__ import annotations

import functools

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro.infer import MCMC
from numpyro.infer import NUTS as NumPyroNUTS
from numpyro.infer import SVI as NumPyroSVI
from numpyro.infer.autoguide import AutoNormal

import ppl
from ppl.inference import NUTS, SVI, to_inference_data
from ppl.transforms.fbm import fbm_sde, markov_fbm
from ppl.transforms.kronecker import kronecker_prior
from ppl.transforms.nngp import Dense, Relu, infinite_width, network, scale_mixture, serial
from ppl.transforms.state_space import GaussianProcess, Matern, state_space

P = 4  # the data plate's size
RNG = np.random.default_rng(0)


def _arr(x):
    return jnp.asarray(np.asarray(x, dtype=np.float32))


# kronecker_prior: y = Phi x + b + noise, x ~ N(0, diag(gamma_1 ⊗ gamma_2))
PHI = _arr(RNG.normal(size=(8, 6)))
KR_Y = _arr(PHI @ RNG.normal(size=6) + 1.5 + 0.3 * RNG.normal(size=8))


def kr_model(y):
    b = numpyro.sample("b", dist.Normal(0.0, 2.0))
    gamma = numpyro.sample("gamma", dist.Gamma(2.0, 2.0).expand([6]).to_event(1))
    x = numpyro.sample("x", dist.Normal(0.0, jnp.sqrt(gamma)).to_event(1))
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("y", dist.Normal(PHI @ x + b, 0.3), obs=y)


# state_space: P series of Matérn-3/2 GP values plus a shared offset b
SSM_INDEX = np.array([0.3, 0.1, 1.2, 2.0, 0.7], dtype=np.float32)
SSM_Y = _arr(RNG.normal(size=(P, 5)) + 1.0)


def ssm_model(y):
    b = numpyro.sample("b", dist.Normal(0.0, 2.0))
    with numpyro.plate("series", P):
        f = numpyro.sample("f", GaussianProcess(Matern(1.5, 0.8, 1.0), SSM_INDEX))
        numpyro.sample("y", dist.Normal(f + b, 0.3).to_event(1), obs=y)


# infinite_width(scale_mixture(...)): a ReLU network's Student-t process limit plus b
NET = serial(Dense(W_std=1.4, b_std=0.3), Relu(), Dense(W_std=1.0))
NN_X = _arr(RNG.normal(size=(6, 2)))
NN_Y = _arr(np.sin(np.asarray(NN_X[:, 0])) + 0.8 + 0.1 * RNG.normal(size=6))


def nn_model(x, y):
    b = numpyro.sample("b", dist.Normal(0.0, 2.0))
    f = network("f", NET, x, width=3)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(f + b, 0.3), obs=y)


# markov_fbm: P fOU series observed at two times, with an offset b on the observations
FBM_TIMES = jnp.array([0.25, 0.5])
FBM_Y = _arr(RNG.normal(0.5, 0.3, size=(P, 2, 1)))


def fbm_model(y):
    b = numpyro.sample("b", dist.Normal(0.0, 2.0))
    with numpyro.plate("series", P, dim=-1):
        xs = fbm_sde(
            "x",
            lambda t, x: -x,
            lambda t, x: 1.0,
            jnp.zeros((P, 1)),
            hurst=0.7,
            times=FBM_TIMES,
            dt=0.05,
        )
        numpyro.sample("y", dist.Normal(xs + b, 0.2).to_event(2), obs=y)


FAMILIES = {
    "kronecker_prior": (lambda: kronecker_prior(kr_model, site="gamma", shape=(2, 3)), (KR_Y,)),
    "state_space": (lambda: state_space(ssm_model), (SSM_Y,)),
    "infinite_width+scale_mixture": (
        lambda: infinite_width(scale_mixture(nn_model, dist.InverseGamma(2.0, 2.0))),
        (NN_X, NN_Y),
    ),
    "markov_fbm": (lambda: markov_fbm(fbm_model, num_ou=3, gamma_max=5.0), (FBM_Y,)),
}
OBJECTIVES = {
    "elbo": ppl.objectives.elbo,
    "iwelbo4": ppl.objectives.iwelbo(4),
    "renyi05_4": ppl.objectives.renyi(0.5, 4),
}
# the default suite runs iwelbo(4) (vmapped particles through every transform); the others
# run with -m slow
SLOW = pytest.mark.slow
OBJECTIVE_PARAMS = [pytest.param(k, marks=() if k == "iwelbo4" else SLOW) for k in OBJECTIVES]


@functools.cache
def family(name):
    build, args = FAMILIES[name]
    model = build()
    return model, AutoNormal(model), args


@pytest.mark.parametrize("objective", OBJECTIVE_PARAMS)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_ppl_svi_fits_and_converts(name, objective):
    model, guide, args = family(name)
    svi = SVI(model, guide, optax.adam(0.02), OBJECTIVES[objective])
    result = svi.run(jax.random.PRNGKey(0), 300, *args, progress_bar=False)
    losses = np.asarray(result.losses)
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-50:]) < np.mean(losses[:50])
    if objective == "iwelbo4":
        idata = to_inference_data(result, model, guide, *args, num_samples=100)
        assert idata.posterior["b"].shape == (1, 100)
        assert np.isfinite(float(idata.posterior["b"].mean()))


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=() if n == "state_space" else SLOW) for n in FAMILIES]
)
def test_numpyro_svi_with_a_ppl_loss(name):
    model, guide, args = family(name)
    svi = NumPyroSVI(model, guide, optax.adam(0.02), loss=ppl.as_numpyro_loss(ppl.objectives.elbo))
    result = svi.run(jax.random.PRNGKey(0), 300, *args, progress_bar=False)
    losses = np.asarray(result.losses)
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-50:]) < np.mean(losses[:50])


@pytest.mark.slow  # two NUTS runs per family, about a minute in all on 2 cores
@pytest.mark.parametrize("name", list(FAMILIES))
def test_ppl_nuts_agrees_with_numpyro_mcmc_on_the_extra_parameter(name):
    model, _, args = family(name)
    ours = NUTS(model, num_warmup=300, num_samples=400, num_chains=2).run(
        jax.random.PRNGKey(1), *args
    )
    mcmc = MCMC(
        NumPyroNUTS(model),
        num_warmup=300,
        num_samples=400,
        num_chains=2,
        chain_method="vectorized",
        progress_bar=False,
    )
    mcmc.run(jax.random.PRNGKey(2), *args)
    theirs = az.from_numpyro(mcmc)
    a = az.summary(ours, var_names=["b"], kind="all")
    c = az.summary(theirs, var_names=["b"], kind="all")
    se = float(np.hypot(a["mcse_mean"].iloc[0], c["mcse_mean"].iloc[0]))
    assert abs(a["mean"].iloc[0] - c["mean"].iloc[0]) < 4 * se, (a, c)
