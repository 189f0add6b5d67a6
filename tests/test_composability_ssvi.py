"""SSVI (Li et al., ICLR 2024) on a model written the ordinary NumPyro way: plain ``x @ w``,
a data plate, an observed likelihood and a Gamma noise precision beside the sparse weights.

The reference is NumPyro's own NUTS on the same (unrestricted) model; the variational
posteriors of the precision are compared with it through ArviZ.
"""

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro.handlers import seed, trace
from numpyro.infer import MCMC, NUTS

import ppl
from ppl.inference import SSVI, to_inference_data
from ppl.sparse import SparseTensor
from ppl.transforms import sparse_subspace

N, D = 60, 6
TRUE_SUPPORT = [1, 3]  # flat indices of w [D, 1]: y = 2 x_1 - x_3 + noise


def model(x, y=None):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1], 1]).to_event(2))
    tau = numpyro.sample("tau", dist.Gamma(2.0, 2.0))  # the noise precision
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal((x @ w)[..., 0], 1.0 / jnp.sqrt(tau)), obs=y)


# a decaying step size: at a constant 0.05 Adam's last iterate of log tau wanders by ~5 %
_LR = optax.cosine_decay_schedule(0.05, 1000, alpha=0.05)


@pytest.fixture(scope="module")
def data():
    x = jax.random.normal(jax.random.PRNGKey(0), (N, D))
    y = 2.0 * x[:, 1] - x[:, 3] + 0.5 * jax.random.normal(jax.random.PRNGKey(1), (N,))
    return x, y


@pytest.fixture(scope="module")
def nuts_tau(data):
    """NumPyro NUTS draws of tau (one chain)."""
    mcmc = MCMC(NUTS(model), num_warmup=300, num_samples=1000, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(2), *data)
    return az.from_numpyro(mcmc).posterior["tau"]


@pytest.fixture(scope="module")
def ssvi_fit(data):
    guide, init_state = sparse_subspace(model, len(TRUE_SUPPORT) / D, init_scale=(0.1, 0.0))
    ssvi = SSVI(model, guide, optax.adam(_LR), every=50, alpha=0.9, t_end=0.5)
    return guide, ssvi.run(jax.random.PRNGKey(3), 1000, *data)


@pytest.fixture(scope="module")
def ssvi_idata(data, ssvi_fit):
    """The SSVI fit through the generic converter, with the bare sparse guide (bound to
    ``result.state`` by ``to_inference_data``)."""
    guide, result = ssvi_fit
    return to_inference_data(result, model, guide, *data, num_samples=1000, key=_KEY)


_KEY = jax.random.PRNGKey(7)


def _lognormal_moments(params, name):
    m, s = params[f"{name}_loc"], jax.nn.softplus(params[f"{name}_rho"])
    mean = float(jnp.exp(m + 0.5 * s**2))
    return mean, mean * float(jnp.sqrt(jnp.expm1(s**2)))


def test_constrained_site_gets_a_transformed_normal(data, ssvi_fit, nuts_tau):
    guide, result = ssvi_fit
    np.testing.assert_array_equal(result.state.idx["w"], TRUE_SUPPORT)
    assert guide.sites["tau"].nse is None and guide.sparse_sites == ("w",)
    assert result.params["tau_loc"].shape == ()
    tr = trace(seed(guide, 0)).get_trace(*data, support=result.state)
    assert isinstance(tr["tau"]["fn"], dist.TransformedDistribution)
    assert isinstance(tr["w"]["value"], SparseTensor) and float(tr["tau"]["value"]) > 0
    # q(tau) is LogNormal: its mean and sd in closed form against NUTS's. Tolerance 5 % on
    # the mean: NUTS's MCSE is ~0.5 %; the exact posterior means of tau (1-d quadrature of
    # the Gaussian marginal likelihood) under the full model and the one restricted to the
    # true support differ by 1.4 % (3.091 and 3.050); mean-field VI of a conjugate precision
    # adds ~1 % (LogNormal against Gamma); measured: 3.03 and 3.06 for two seeds. 25 % on the
    # sd (mean-field VI under-disperses; measured 5 %)
    mean, sd = _lognormal_moments(result.params, "tau")
    ref_mean, ref_sd = float(nuts_tau.mean()), float(nuts_tau.std())
    assert abs(mean - ref_mean) < 0.05 * ref_mean, (mean, ref_mean)
    assert abs(sd - ref_sd) < 0.25 * ref_sd, (sd, ref_sd)
    # SSVIResult's own draws are in the support too: their mean is q's within 4 s.e.
    draws = result.sample_posterior(jax.random.PRNGKey(8), 4000)["tau"]
    assert draws.shape == (4000,) and float(draws.min()) > 0
    assert abs(float(draws.mean()) - mean) < 4 * sd / np.sqrt(4000)


def test_sparse_guide_refuses_discrete_and_argument_dependent_supports():
    def discrete(x):
        numpyro.sample("w", dist.Normal(0.0, 1.0).expand([3, 2]).to_event(2))
        numpyro.sample("k", dist.Poisson(3.0))

    def dependent(x):
        numpyro.sample("w", dist.Normal(0.0, 1.0).expand([3, 2]).to_event(2))
        numpyro.sample("u", dist.Uniform(x.min(), x.max()))

    x = jnp.arange(4.0)
    for fn, match in ((discrete, "'k' .*discrete"), (dependent, "'u'.*depends on the model")):
        guide, init_state = sparse_subspace(fn, 0.5)
        with pytest.raises(TypeError, match=match):
            init_state(jax.random.PRNGKey(0), x)


def test_to_inference_data_densifies_sparse_sites(data, ssvi_fit, ssvi_idata):
    guide, result = ssvi_fit
    idx = np.asarray(result.state.idx["w"])
    off = np.setdiff1d(np.arange(D), idx)
    model_r, guide_r = guide.bind(result.state)
    pair = to_inference_data(result, model_r, guide_r, *data, num_samples=100, key=_KEY)
    for idata, num in ((ssvi_idata, 1000), (pair, 100)):
        w = idata.posterior["w"]
        assert w.shape == (1, num, D, 1)
        assert w.dims == ("chain", "draw", "w_dim_0", "w_dim_1")
        flat = np.asarray(w).reshape(num, D)
        assert np.all(flat[:, off] == 0.0) and np.all(flat[:, idx] != 0.0)
        # the draws are the guide's: their mean is its loc within 4 s.e.
        se = np.asarray(jax.nn.softplus(result.params["w_rho"])) / np.sqrt(num)
        assert np.all(np.abs(flat[:, idx].mean(0) - result.params["w_loc"]) < 4 * se)
        assert idata.posterior["tau"].shape == (1, num)
        assert float(idata.posterior["tau"].min()) > 0
        assert idata.log_likelihood["y"].dims == ("chain", "draw", "data")
    summary = az.summary(ssvi_idata, var_names=["tau", "w"], kind="stats")
    assert list(summary.index) == ["tau"] + [f"w[{i}, 0]" for i in range(D)]
    assert np.isfinite(summary.loc["tau", "mean"])
    with pytest.raises(ValueError, match="needs its active sets"):
        to_inference_data(dict(result.params), model, guide, *data, num_samples=10)


def test_ssvi_and_svi_agree_with_nuts_on_the_extra_parameter(data, ssvi_fit, ssvi_idata, nuts_tau):
    """The headline: one model, SSVI and the generic SVI driver with ``ppl.objectives.elbo``
    on the same sparse guide, both converted to ArviZ, against NumPyro NUTS."""
    guide, result = ssvi_fit
    model_r, guide_r = guide.bind(result.state)
    svi = ppl.inference.SVI(model_r, guide_r, optax.adam(_LR), objective=ppl.objectives.elbo)
    svi_result = svi.run(jax.random.PRNGKey(6), 1000, *data, progress_bar=False)
    svi_idata = to_inference_data(svi_result, model_r, guide_r, *data, num_samples=1000, key=_KEY)
    ref = az.summary(nuts_tau.to_dataset(), var_names=["tau"])
    for idata in (ssvi_idata, svi_idata):
        got = az.summary(idata, var_names=["tau"])
        # 4 MCSE of the two Monte Carlo means, plus 4 % for the model restriction and the
        # mean-field bias (see test_constrained_site_gets_a_transformed_normal: 1.4 % + ~1 %)
        mcse = float(np.hypot(got.loc["tau", "mcse_mean"], ref.loc["tau", "mcse_mean"]))
        tol = 4 * mcse + 0.04 * float(ref.loc["tau", "mean"])
        assert abs(got.loc["tau", "mean"] - ref.loc["tau", "mean"]) < tol, (got, ref)
