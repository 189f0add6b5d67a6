"""ppl.inference.to_inference_data: groups, plate-named dims, shapes and values of an SVI
result's InferenceData; az.summary / loo / compare / plot_posterior; netCDF round trip."""

from collections import namedtuple

import arviz as az
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
import xarray as xr
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal

# the non-centred eight schools model and its NUTS run (shared, run once per session)
from test_nuts import SIGMA8, Y8, eight_schools_nuts, schools_noncentred

from ppl.inference import to_inference_data

matplotlib.use("Agg")

Result = namedtuple("Result", "params losses")  # the SVI-result contract: .params, .losses

J = 8  # schools: the data plate
S = 400  # guide draws
STEPS = 2000
GUIDE = AutoNormal(schools_noncentred)


@pytest.fixture(scope="module")
def fit():
    svi = SVI(schools_noncentred, GUIDE, numpyro.optim.Adam(0.05), Trace_ELBO())
    res = svi.run(jax.random.PRNGKey(1), STEPS, SIGMA8, y=Y8, progress_bar=False)
    return Result(res.params, res.losses)


@pytest.fixture(scope="module")
def idata_vi(fit):
    return to_inference_data(fit, schools_noncentred, GUIDE, SIGMA8, y=Y8, num_samples=S)


def test_groups_dims_and_shapes(idata_vi, fit):
    assert set(idata_vi.groups()) == {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "observed_data",
        "sample_stats",
    }
    post = idata_vi.posterior
    # the model's latent and deterministic sites, none of AutoNormal's internals
    assert set(post.data_vars) == {"mu", "tau", "theta_tilde", "theta"}
    assert post["mu"].dims == ("chain", "draw") and post["mu"].shape == (1, S)
    assert post["theta_tilde"].dims == ("chain", "draw", "school")
    assert post["theta"].dims == ("chain", "draw", "school")
    assert post["theta"].shape == (1, S, J)
    for group in ("posterior_predictive", "log_likelihood"):
        assert idata_vi[group]["y"].dims == ("chain", "draw", "school"), group
        assert idata_vi[group]["y"].shape == (1, S, J), group
    assert idata_vi.observed_data["y"].dims == ("school",)
    np.testing.assert_array_equal(idata_vi.observed_data["y"].values, np.asarray(Y8))
    loss = idata_vi.sample_stats["loss"]
    assert loss.dims == ("step",) and loss.shape == (STEPS,)
    np.testing.assert_allclose(loss.values, np.asarray(fit.losses), rtol=1e-6)
    assert (post["tau"].values > 0).all()


def test_values_are_consistent(idata_vi, fit):
    post = idata_vi.posterior
    mu, tau, tt = (post[k].values[0] for k in ("mu", "tau", "theta_tilde"))
    theta = post["theta"].values[0]
    # the deterministic site is recomputed at each guide draw
    np.testing.assert_allclose(theta, mu[:, None] + tau[:, None] * tt, rtol=1e-5, atol=1e-5)
    # pointwise log-likelihood log N(y_j | theta_j, sigma_j) at each draw
    expected = dist.Normal(theta, np.asarray(SIGMA8)).log_prob(np.asarray(Y8))
    np.testing.assert_allclose(
        idata_vi.log_likelihood["y"].values[0], expected, rtol=1e-5, atol=1e-5
    )
    # the observed site is re-sampled: standardised replicate residuals are N(0, 1)
    z = (idata_vi.posterior_predictive["y"].values[0] - theta) / np.asarray(SIGMA8)
    assert abs(z.mean()) < 4 / np.sqrt(z.size) and abs(z.std() - 1) < 4 / np.sqrt(2 * z.size)
    # the draws follow the guide: theta_tilde ~ N(loc, scale) of AutoNormal, per school
    loc = np.asarray(fit.params["theta_tilde_auto_loc"])
    scale = np.asarray(fit.params["theta_tilde_auto_scale"])
    assert np.all(np.abs(tt.mean(0) - loc) < 4 * scale / np.sqrt(S))
    assert np.all(np.abs(tt.std(0) / scale - 1.0) < 4 / np.sqrt(2 * S))


def test_arviz_functions_run(idata_vi):
    summary = az.summary(idata_vi, var_names=["mu", "tau", "theta"])
    assert len(summary) == 2 + J and list(summary.index[:3]) == ["mu", "tau", "theta[0]"]
    loo = az.loo(idata_vi, pointwise=True)
    assert loo.n_data_points == J and np.isfinite(loo.elpd_loo) and loo.loo_i.shape == (J,)
    axes = az.plot_posterior(idata_vi, var_names=["mu", "tau"])
    assert np.size(axes) == 2
    matplotlib.pyplot.close("all")


@pytest.mark.slow  # NUTS + LOO; conversion is covered by the other tests here
def test_compare_with_nuts(idata_vi):
    idata_mcmc = eight_schools_nuts()
    cmp = az.compare({"svi": idata_vi, "nuts": idata_mcmc})
    assert set(cmp.index) == {"svi", "nuts"}
    assert np.all(np.isfinite(cmp["elpd_loo"]))
    # one InferenceData shape for both drivers
    for group in ("posterior", "posterior_predictive", "log_likelihood", "observed_data"):
        a, b = idata_vi[group], idata_mcmc[group]
        assert set(a.data_vars) == set(b.data_vars), group
        for name in a.data_vars:
            assert a[name].dims == b[name].dims, (group, name)
    # mean-field SVI lands near the NUTS posterior mean of the grand mean
    m_vi = float(idata_vi.posterior["mu"].mean())
    m_mc, sd_mc = float(idata_mcmc.posterior["mu"].mean()), float(idata_mcmc.posterior["mu"].std())
    assert abs(m_vi - m_mc) < 0.5 * sd_mc


def test_netcdf_round_trip(idata_vi, tmp_path):
    path = tmp_path / "posterior.nc"
    idata_vi.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    assert set(back.groups()) == set(idata_vi.groups())
    for group in idata_vi.groups():
        xr.testing.assert_identical(back[group].load(), idata_vi[group])
    back.close()


def test_plain_params_dict_and_default_key(fit):
    a = to_inference_data(fit.params, schools_noncentred, GUIDE, SIGMA8, y=Y8, num_samples=20)
    assert "sample_stats" not in a.groups()  # no losses, no loss trace
    b = to_inference_data(
        fit, schools_noncentred, GUIDE, SIGMA8, y=Y8, num_samples=20, key=jax.random.PRNGKey(0)
    )
    # key=None is PRNGKey(0): the same draws from the dict as from the result
    for group in ("posterior", "posterior_predictive", "log_likelihood"):
        xr.testing.assert_equal(a[group], b[group])


def test_ppl_svi_result_hand_written_guide_typed_key_single_draw():
    """The result of ppl.inference.SVI converts as is; a hand-written guide with an event
    dim, a typed key and a single draw work too."""
    from ppl.inference import SVI as PplSVI

    x = jnp.linspace(-1.0, 1.0, 12)
    y = 0.5 + 1.5 * x + 0.1 * jnp.sin(7.0 * x)

    def model(x, y=None):
        beta = numpyro.sample("beta", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("y", dist.Normal(beta[0] + beta[1] * x, 0.2), obs=y)

    def guide(x, y=None):
        loc = numpyro.param("beta_loc", jnp.zeros(2))
        scale = numpyro.param("beta_scale", 0.1 * jnp.ones(2), constraint=dist.constraints.positive)
        numpyro.sample("beta", dist.Normal(loc, scale).to_event(1))

    result = PplSVI(model, guide, optax.adam(0.05)).run(
        jax.random.PRNGKey(0), 300, x, y=y, progress_bar=False
    )
    idata = to_inference_data(result, model, guide, x, y=y, num_samples=1, key=jax.random.key(7))
    assert idata.sample_stats["loss"].shape == (300,)
    assert idata.posterior["beta"].dims == ("chain", "draw", "beta_dim_0")
    assert idata.posterior["beta"].shape == (1, 1, 2)
    assert idata.log_likelihood["y"].shape == (1, 1, 12)
    np.testing.assert_allclose(result.params["beta_loc"], [0.5, 1.5], atol=0.2)


def test_named_event_dims_nested_plates_and_unlisted_latents():
    """infer={"event_dims": [...]} names event dims; nested plates name their own dims;
    a latent site the guide does not draw is drawn from its prior given the rest."""

    def model(y):
        with numpyro.plate("group", 3, dim=-1):
            w = numpyro.sample("w", dist.Dirichlet(jnp.ones(4)), infer={"event_dims": ["category"]})
            numpyro.sample("extra", dist.Normal(0.0, 1.0))  # not in the guide
            with numpyro.plate("obs", 5, dim=-2):
                numpyro.sample("y", dist.Categorical(logits=w), obs=y)

    def guide(y):
        loc = numpyro.param("loc", jnp.zeros((3, 4)))
        with numpyro.plate("group", 3, dim=-1):
            numpyro.sample("w", dist.Normal(loc, 1.0).to_event(1))

    y = jnp.zeros((5, 3), jnp.int32)
    idata = to_inference_data({"loc": jnp.ones((3, 4))}, model, guide, y, num_samples=7)
    assert idata.posterior["w"].dims == ("chain", "draw", "group", "category")
    assert idata.posterior["extra"].dims == ("chain", "draw", "group")
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "obs", "group")
    assert idata.observed_data["y"].dims == ("obs", "group")
    assert idata.posterior_predictive["y"].values.max() <= 3


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"num_samples": 2.5}, TypeError, "num_samples"),
        ({"num_samples": True}, TypeError, "num_samples"),
        ({"key": 3}, TypeError, "key"),
    ],
)
def test_bad_arguments(fit, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        to_inference_data(fit, schools_noncentred, GUIDE, SIGMA8, y=Y8, **kwargs)


def test_bad_result_model_and_data(fit):
    m, g = schools_noncentred, GUIDE
    with pytest.raises(TypeError, match="result"):
        to_inference_data(42, m, g, SIGMA8, y=Y8)
    with pytest.raises(TypeError, match="guide"):
        to_inference_data(fit, m, None, SIGMA8, y=Y8)
    with pytest.raises(ValueError, match="'sigma'.*non-finite"):
        to_inference_data(fit, m, g, SIGMA8.at[0].set(jnp.nan), y=Y8)
    with pytest.raises(ValueError, match="'y'.*non-finite"):
        to_inference_data(fit, m, g, SIGMA8, y=Y8.at[2].set(jnp.inf))
    bad = Result({**fit.params, "mu_auto_loc": jnp.nan}, fit.losses)
    with pytest.raises(ValueError, match="mu_auto_loc"):
        to_inference_data(bad, m, g, SIGMA8, y=Y8)


def test_subsampled_plate_is_refused():
    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", y.shape[0], subsample_size=3) as idx:
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=y[idx])

    def guide(y):
        numpyro.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="subsample"):
        to_inference_data({}, model, guide, Y8, num_samples=5)
