"""ppl.inference.NUTS: exact conjugate posterior within Monte-Carlo error, the InferenceData
it returns (groups, plate dims, sample_stats), divergences on eight schools, bad input."""

import functools

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from ppl.inference import NUTS

# ---------------------------------------------------------------------------
# conjugate Gaussian: z_k ~ N(0, 1), x_ik ~ N(z_k, 1)  =>  z_k | x ~ N(S_k/(1+N), 1/(1+N))
# ---------------------------------------------------------------------------

N, K = 20, 3
X = jnp.asarray(
    np.random.default_rng(0).normal(size=(N, K)) + np.array([-1.0, 0.0, 2.0]), jnp.float32
)


def conj_model(x):
    with numpyro.plate("k", x.shape[1], dim=-1):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.deterministic("z2", 2.0 * z)
        with numpyro.plate("data", x.shape[0], dim=-2):
            numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


EXACT_MEAN = np.asarray(X).sum(0) / (1 + N)
EXACT_SD = np.full(K, 1.0 / np.sqrt(1 + N))
CHAINS, DRAWS = 4, 1000


@pytest.fixture(scope="module")
def conj():
    nuts = NUTS(conj_model, num_warmup=500, num_samples=DRAWS, num_chains=CHAINS)
    idata = nuts.run(jax.random.PRNGKey(0), X)
    return nuts, idata


def test_conjugate_mean_and_sd_within_4_mcse(conj):
    _, idata = conj
    z = idata.posterior["z"]
    ess_mean = az.ess(idata, var_names=["z"], method="mean")["z"].values
    ess_sd = az.ess(idata, var_names=["z"], method="sd")["z"].values
    assert np.all(ess_mean > 400) and np.all(ess_sd > 400)
    mean = z.mean(("chain", "draw")).values
    sd = z.std(("chain", "draw")).values
    # MCSE of the mean: sd/sqrt(ESS); of the sd of a Gaussian: sd/sqrt(2 ESS)
    mcse_mean = EXACT_SD / np.sqrt(ess_mean)
    mcse_sd = EXACT_SD / np.sqrt(2 * ess_sd)
    assert np.all(np.abs(mean - EXACT_MEAN) < 4 * mcse_mean), (mean, EXACT_MEAN, mcse_mean)
    assert np.all(np.abs(sd - EXACT_SD) < 4 * mcse_sd), (sd, EXACT_SD, mcse_sd)
    summary = az.summary(idata, var_names=["z"])
    assert (summary["r_hat"] < 1.01).all()


def test_inference_data_groups_dims_and_shapes(conj):
    nuts, idata = conj
    assert set(idata.groups()) == {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "observed_data",
        "sample_stats",
    }
    post = idata.posterior
    assert post["z"].dims == ("chain", "draw", "k") and post["z"].shape == (CHAINS, DRAWS, K)
    assert post["z2"].dims == ("chain", "draw", "k")
    np.testing.assert_allclose(post["z2"].values, 2 * post["z"].values, rtol=1e-6)
    assert idata.posterior_predictive["x"].dims == ("chain", "draw", "data", "k")
    assert idata.posterior_predictive["x"].shape == (CHAINS, DRAWS, N, K)
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "data", "k")
    assert idata.observed_data["x"].dims == ("data", "k")
    np.testing.assert_array_equal(idata.observed_data["x"].values, np.asarray(X))
    # pointwise log-likelihood is log N(x_ik | z_k, 1) at each draw
    expected = dist.Normal(post["z"].values[:, :, None, :], 1.0).log_prob(np.asarray(X))
    np.testing.assert_allclose(idata.log_likelihood["x"].values, expected, rtol=1e-5, atol=1e-5)
    # posterior predictive: x_rep - z ~ N(0, 1)
    resid = idata.posterior_predictive["x"].values - post["z"].values[:, :, None, :]
    assert abs(resid.mean()) < 0.02 and abs(resid.std() - 1.0) < 0.02
    # the object keeps the draws
    assert nuts.idata is idata
    assert nuts.samples["z"].shape == (CHAINS, DRAWS, K)
    assert nuts.adapted["step_size"].shape == (CHAINS,)


def test_sample_stats(conj):
    _, idata = conj
    stats = idata.sample_stats
    for name in ("diverging", "step_size", "tree_depth", "acceptance_rate", "energy", "lp"):
        assert stats[name].dims == ("chain", "draw"), name
        assert stats[name].shape == (CHAINS, DRAWS), name
    assert stats["diverging"].dtype == bool
    assert int(stats["diverging"].sum()) == 0  # an isotropic Gaussian posterior
    # one adapted step size per chain, constant over draws
    eps = stats["step_size"].values
    assert np.all(eps == eps[:, :1]) and np.all(eps > 0)
    assert 0.6 < float(stats["acceptance_rate"].mean()) < 0.99
    assert int(stats["tree_depth"].max()) <= 10 and int(stats["tree_depth"].min()) >= 1
    assert np.all(np.isfinite(stats["lp"].values)) and np.all(np.isfinite(stats["energy"]))
    az.plot_energy(idata)  # ArviZ reads sample_stats.energy


# ---------------------------------------------------------------------------
# eight schools
# ---------------------------------------------------------------------------

Y8 = jnp.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA8 = jnp.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def schools_noncentred(sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("school", sigma.shape[0]):
        theta_tilde = numpyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
        theta = numpyro.deterministic("theta", mu + tau * theta_tilde)
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def schools_centred(sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("school", sigma.shape[0]):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


@functools.cache
def eight_schools_nuts():
    """NUTS on the non-centred eight schools, run once per session (test_arviz compares
    an SVI fit against it)."""
    # progress_bar=True also drives the chunked sampling loop (the bar is off without a TTY)
    nuts = NUTS(schools_noncentred, num_warmup=400, num_samples=400, progress_bar=True)
    return nuts.run(jax.random.PRNGKey(1), SIGMA8, y=Y8)


def test_eight_schools_noncentred_reports_divergences_and_summarises():
    idata = eight_schools_nuts()
    div = idata.sample_stats["diverging"]
    assert div.dims == ("chain", "draw") and div.shape == (4, 400) and div.dtype == bool
    assert int(div.sum()) <= 8  # non-centring removes (nearly) all divergences
    assert idata.posterior["theta"].dims == ("chain", "draw", "school")
    assert float(idata.posterior["tau"].min()) > 0
    summary = az.summary(idata, var_names=["mu", "tau", "theta"])
    assert len(summary) == 10 and (summary["r_hat"] < 1.05).all()
    # textbook posterior: E[mu] ~ 4.4, E[tau] ~ 3.6
    assert abs(summary.loc["mu", "mean"] - 4.4) < 1.0
    assert 2.0 < summary.loc["tau", "mean"] < 5.5
    assert np.isfinite(az.loo(idata).elpd_loo)


@pytest.mark.slow  # a statistical property of NUTS on the funnel, ~15 s
def test_eight_schools_centred_has_divergences():
    """The funnel of the centred model makes NUTS diverge; the count reaches sample_stats.
    (target_accept=0.6 makes it robust: 13-30 divergences over seeds 0-3.)"""
    nuts = NUTS(schools_centred, num_warmup=200, num_samples=500, num_chains=2, target_accept=0.6)
    idata = nuts.run(jax.random.PRNGKey(0), SIGMA8, y=Y8)
    assert int(idata.sample_stats["diverging"].sum()) > 0


# ---------------------------------------------------------------------------
# bad input: clear errors before any compilation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"num_chains": 0}, ValueError, "num_chains"),
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"num_warmup": -1}, ValueError, "num_warmup"),
        ({"num_samples": 10.0}, TypeError, "num_samples"),
        ({"max_tree_depth": 0}, ValueError, "max_tree_depth"),
        ({"target_accept": 1.0}, ValueError, "target_accept"),
        ({"progress_bar": "yes"}, TypeError, "progress_bar"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        NUTS(conj_model, **kwargs)


def test_bad_model_and_key():
    with pytest.raises(TypeError, match="model"):
        NUTS("not a model")
    with pytest.raises(TypeError, match="rng_key"):
        NUTS(conj_model).run(0, X)


def test_non_finite_data_named():
    bad = X.at[3, 1].set(jnp.nan)
    with pytest.raises(ValueError, match="'x'.*non-finite"):
        NUTS(conj_model).run(jax.random.PRNGKey(0), bad)
    with pytest.raises(ValueError, match="'y'.*non-finite"):
        NUTS(schools_noncentred).run(jax.random.PRNGKey(0), SIGMA8, y=Y8.at[0].set(jnp.inf))
