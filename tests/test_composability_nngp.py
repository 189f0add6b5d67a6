"""The scale-mixture NNGP tools on a user's own NumPyro model (Lee et al., ICLR 2022):
``ppl.inference.nngp.fit(model, method="gh" | "closed" | "is")`` reads the scale, its prior
and the Gaussian likelihood from the trace, and ``marginalize_scale`` accepts observations
in a plate and other latent sites (an intercept), with the scale's posterior drawn back
afterwards.

References are independent of the code under test: NumPy/SciPy closed forms (the Student-t
marginal and the inverse-gamma conditional, integrated over the intercept on a grid) and
NumPyro's NUTS on the original model.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.diagnostics import effective_sample_size
from numpyro.infer import MCMC, NUTS
from numpyro.infer.util import log_density
from scipy import special, stats

from ppl.distributions import BurrXII
from ppl.inference import nngp
from ppl.transforms.nngp import Dense, Relu, kernel_fn, marginalize_scale, serial, unit_scale

X = np.linspace(-2, 2, 8)[:, None]
Y = np.sin(2 * X[:, 0]) + 0.1 * (-1.0) ** np.arange(8)
TAU2 = 0.01
NET = serial(
    Dense(W_std=2**0.5, b_std=0.1**0.5),
    Relu(),
    Dense(W_std=2**0.5, b_std=0.1**0.5),
    Relu(),
    Dense(),
)
with jax.enable_x64(True):
    K = np.asarray(kernel_fn(unit_scale(NET))(jnp.asarray(X, jnp.float64)))
C = K + (TAU2 + 1e-10 * np.mean(np.diag(K))) * np.eye(8)  # the library's C (jitter included)
T3_LOG_EVIDENCE, T3_MEAN_SCALE = -16.9095675, 13.4894  # IG(2, 2), docs/nngp.md


def _gp(x, y=None, prior=None, latent=False):
    """The NNGP regression written by hand: y ~ MVN(0, s·C), or f ~ MVN(0, s·K) and
    y_i ~ N(f_i, √(s·τ²)) in a plate."""
    s = numpyro.sample("scale", prior or dist.InverseGamma(2.0, 2.0))
    n = x.shape[0]
    if latent:
        k = C - TAU2 * np.eye(n)
        f = numpyro.sample("f", dist.MultivariateNormal(jnp.zeros(n), s * k))
        with numpyro.plate("data", n):
            numpyro.sample("y", dist.Normal(f, jnp.sqrt(s * TAU2)), obs=y)
    else:
        numpyro.sample("y", dist.MultivariateNormal(jnp.zeros(n), s * C), obs=y)


# --------------------------------------------------- fit(model, method=...) on the model


@pytest.mark.parametrize("latent", [False, True])
@pytest.mark.parametrize("method", ["gh", "closed", "is"])
def test_fit_reads_the_scale_mixture_from_the_model(method, latent):
    post = nngp.fit(_gp, X, Y, method=method, model_kwargs={"latent": latent}, num_samples=4000)
    # IS: 4000 draws with ESS > 2000 -> the evidence to ~1e-2 (spec tolerance of T4)
    tol = 1e-6 if method != "is" else 0.05
    assert float(post.log_evidence) == pytest.approx(T3_LOG_EVIDENCE, abs=tol)
    assert post.mean_scale == pytest.approx(T3_MEAN_SCALE, rel=1e-5 if method != "is" else 0.02)
    assert post.method == method and post.num_obs == 8


def test_fit_on_the_model_matches_the_kernel_path_for_a_general_prior():
    prior = BurrXII(2.0, 2.0)
    got = nngp.fit(_gp, X, Y, model_kwargs={"prior": prior, "latent": True})
    want = nngp.fit(NET, X, Y, prior=prior, noise=TAU2)
    assert float(got.log_evidence) == pytest.approx(float(want.log_evidence), abs=1e-6)
    np.testing.assert_allclose(got.weights, want.weights, atol=1e-8)


def test_fit_on_the_model_predicts_with_its_kernel():
    post = nngp.fit(_gp, X, Y, method="closed", kernel=NET, noise=TAU2)
    pred = nngp.predict(post, np.array([[-3.0], [0.3]]), latent=True)
    ref = nngp.predict(
        nngp.fit(NET, X, Y, prior=dist.InverseGamma(2.0, 2.0), noise=TAU2, method="closed"),
        np.array([[-3.0], [0.3]]),
        latent=True,
    )
    np.testing.assert_allclose(pred.variance, ref.variance, rtol=1e-8)
    with pytest.raises(ValueError, match="do not reproduce the model's covariance"):
        nngp.fit(_gp, X, Y, method="closed", kernel=NET, noise=0.5)


def _with_intercept(x, y=None):
    s = numpyro.sample("scale", dist.InverseGamma(2.0, 2.0))
    c = numpyro.sample("intercept", dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.MultivariateNormal(c * jnp.ones(x.shape[0]), s * C), obs=y)


def _noise_off_the_scale(x, y=None):
    s = numpyro.sample("scale", dist.InverseGamma(2.0, 2.0))
    numpyro.sample("y", dist.MultivariateNormal(jnp.zeros(8), s * K + TAU2 * np.eye(8)), obs=y)


@pytest.mark.parametrize("method", ["gh", "closed", "is"])
def test_fit_names_the_site_it_cannot_handle_before_any_work(method, monkeypatch):
    def no_inference(*args, **kwargs):
        raise AssertionError("inference ran before the model was rejected")

    monkeypatch.setattr(nngp, "_mode_and_scale", no_inference)
    with pytest.raises(ValueError, match=r"'intercept'.*method='nuts'.*marginalize_scale"):
        nngp.fit(_with_intercept, X, Y, method=method)
    with pytest.raises(ValueError, match="not proportional.*method='nuts'"):
        nngp.fit(_noise_off_the_scale, X, Y, method=method)
    with pytest.raises(ValueError, match="prior=None"):
        nngp.fit(_gp, X, Y, method=method, prior=dist.InverseGamma(2.0, 2.0))


def test_fit_closed_on_a_model_needs_an_inverse_gamma_scale():
    with pytest.raises(ValueError, match="InverseGamma.*method='gh'"):
        nngp.fit(_gp, X, Y, method="closed", model_kwargs={"prior": BurrXII(2.0, 2.0)})


# ----------------------------- marginalize_scale: plates, an intercept, the scale drawn back

A, B, TAU2_C = 3.0, 1.0, 0.05


def _plated_intercept_model(x, y=None):
    """NNGP regression with an intercept: y_i ~ N(c + f_i, √(s·τ²)) in a plate."""
    s = numpyro.sample("scale", dist.InverseGamma(A, B))
    c = numpyro.sample("intercept", dist.Normal(0.0, 1.0))
    n = x.shape[0]
    f = numpyro.sample("f", dist.MultivariateNormal(jnp.zeros(n), s * K))
    with numpyro.plate("data", n):
        numpyro.sample("y", dist.Normal(c + f, jnp.sqrt(s * TAU2_C)), obs=y)


def _intercept_grid():
    """The intercept's exact posterior on a 4001-point grid: y | c ~ t_{2a}(c·1,
    (b/a)(K + τ²I)), so p(c | y) ∝ N(c; 0, 1)·(b + β(c)/2)^{−(a + n/2)}."""
    grid = np.linspace(-6, 6, 4001)
    b_n = B + _beta(grid) / 2
    logw = stats.norm.logpdf(grid) - (A + len(Y) / 2) * np.log(b_n)
    return grid, np.exp(logw - special.logsumexp(logw))


def _beta(c):
    r = Y[None, :] - np.asarray(c)[:, None]
    return np.einsum("gi,ij,gj->g", r, np.linalg.inv(K + TAU2_C * np.eye(len(Y))), r)


def _exact_posterior():
    """E[c|y], E[s|y], sd[s|y] and E[f|y], with s | c, y ~ IG(a + n/2, b + β(c)/2)."""
    n = len(Y)
    grid, w = _intercept_grid()
    a_n, b_n = A + n / 2, B + _beta(grid) / 2
    ci = np.linalg.inv(K + TAU2_C * np.eye(n))
    mean_c = np.sum(w * grid)
    es = b_n / (a_n - 1)
    es2 = b_n**2 / ((a_n - 1) * (a_n - 2))
    mean_s = np.sum(w * es)
    sd_s = math.sqrt(np.sum(w * es2) - mean_s**2)
    mean_f = K @ ci @ (Y - mean_c)  # E[f | c, s, y] = K(K + τ²I)⁻¹(y − c), free of s
    return mean_c, mean_s, sd_s, mean_f


def _nuts(model, key, num_samples, num_warmup=400):
    with jax.enable_x64(True):
        mcmc = MCMC(NUTS(model), num_warmup=num_warmup, num_samples=num_samples, progress_bar=False)
        mcmc.run(jax.random.PRNGKey(key), X, Y)
        return {k: np.asarray(v) for k, v in mcmc.get_samples().items()}


def _mcse(draws):
    return np.std(draws) / math.sqrt(float(effective_sample_size(draws[None])))


def test_sample_posterior_draws_the_scale_and_f_from_their_conditionals():
    # exact posterior draws of the intercept (from the grid) in, exact draws of (s, f) out
    grid, w = _intercept_grid()
    c = np.random.default_rng(0).choice(grid, size=20000, p=w)  # exact to the grid's 0.003
    tp = marginalize_scale(_plated_intercept_model)
    with jax.enable_x64(True):
        out = tp.sample_posterior(jax.random.PRNGKey(0), {"intercept": jnp.asarray(c)}, X, Y)
    s, f = np.asarray(out["scale"]), np.asarray(out["f"])
    mean_c, mean_s, sd_s, mean_f = _exact_posterior()
    assert s.shape == (20000,) and f.shape == (20000, 8)
    assert abs(s.mean() - mean_s) < 4 * sd_s / math.sqrt(20000)
    # the sd's standard error is ≈ sd·√((kurtosis − 1)/(4m)) ≈ 1.3 % here (IG(7, ·) tails)
    assert np.std(s) == pytest.approx(sd_s, rel=0.06)
    assert np.all(np.abs(f.mean(0) - mean_f) < 4 * f.std(0) / math.sqrt(20000))


def test_nuts_on_the_marginalised_model_recovers_the_intercept_and_the_scale():
    tp = marginalize_scale(_plated_intercept_model)
    draws = _nuts(tp, 0, 300, num_warmup=200)
    assert sorted(draws) == ["intercept"]  # no placeholder scale ≡ 1 among the draws
    with jax.enable_x64(True):
        full = tp.sample_posterior(jax.random.PRNGKey(1), draws, X, Y)
    s, c = np.asarray(full["scale"]), full["intercept"]
    assert s.shape == (300,) and full["f"].shape == (300, 8) and np.std(s) > 0.5
    mean_c, mean_s, _, _ = _exact_posterior()
    assert abs(c.mean() - mean_c) < 4 * _mcse(c)
    assert abs(s.mean() - mean_s) < 4 * _mcse(s)


@pytest.mark.slow
def test_marginalize_scale_with_a_plate_and_an_intercept_matches_nuts_on_the_model():
    tp = marginalize_scale(_plated_intercept_model)
    draws = _nuts(tp, 0, 1000)
    with jax.enable_x64(True):
        full = tp.sample_posterior(jax.random.PRNGKey(1), draws, X, Y)
    got = {"intercept": full["intercept"], "scale": np.asarray(full["scale"])}
    # NUTS on the original model: the scale, the intercept and f all latent
    ref = _nuts(_plated_intercept_model, 2, 1000)
    for name in ("intercept", "scale"):
        se = math.hypot(_mcse(ref[name]), _mcse(got[name]))
        assert abs(ref[name].mean() - got[name].mean()) < 4 * se, name
        # the posterior sds agree too (IG tails: the sd estimates are noisy, 30 %)
        assert np.std(got[name]) == pytest.approx(np.std(ref[name]), rel=0.3), name


def test_marginalize_scale_plate_observation_gives_the_student_t_evidence():
    with jax.enable_x64(True):
        lp, tr = log_density(marginalize_scale(_gp), (X, Y), {"latent": True}, {})
    assert float(lp) == pytest.approx(T3_LOG_EVIDENCE, abs=1e-6)
    assert isinstance(tr["y"]["fn"], dist.MultivariateStudentT)
    assert tr["scale"]["type"] == tr["f"]["type"] == "nngp_marginalized"


def test_marginalize_scale_intercept_conditional_is_the_student_t():
    # log p(y | c) with the scale and f integrated out, against scipy's multivariate t
    c = 0.3
    with jax.enable_x64(True):
        lp, _ = log_density(
            marginalize_scale(_plated_intercept_model), (X, Y), {}, {"intercept": c}
        )
    cc = (B / A) * (K + TAU2_C * np.eye(8))
    want = stats.norm.logpdf(c) + stats.multivariate_t.logpdf(Y, c * np.ones(8), cc, df=2 * A)
    assert float(lp) == pytest.approx(want, abs=1e-8)


def _subsampled(x, y=None):
    s = numpyro.sample("scale", dist.InverseGamma(2.0, 2.0))
    with numpyro.plate("data", 8, subsample_size=4) as idx:
        numpyro.sample("y", dist.Normal(0.0, jnp.sqrt(s)), obs=y[idx])


def _scale_in_the_intercept(x, y=None):
    s = numpyro.sample("scale", dist.InverseGamma(2.0, 2.0))
    c = numpyro.sample("intercept", dist.Normal(0.0, s))
    with numpyro.plate("data", 8):
        numpyro.sample("y", dist.Normal(c, jnp.sqrt(s)), obs=y)


@pytest.mark.parametrize(
    "model, match",
    [
        (_subsampled, "'y' is subsampled"),
        (_scale_in_the_intercept, "law of site 'intercept' changes with the scale"),
    ],
)
def test_marginalize_scale_names_what_it_cannot_integrate(model, match):
    with jax.enable_x64(True), pytest.raises(ValueError, match=match):
        log_density(marginalize_scale(model), (X, Y), {}, {})


def test_sample_posterior_needs_the_other_latent_draws():
    tp = marginalize_scale(_plated_intercept_model)
    with jax.enable_x64(True), pytest.raises(ValueError, match=r"\['intercept'\]"):
        tp.sample_posterior(jax.random.PRNGKey(0), {}, X, Y, num_samples=3)
