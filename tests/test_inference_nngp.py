"""ppl.inference.nngp: posterior inference over the readout scale σ² (spec nngp.md §1.3–1.6,
T3–T5, T7) and ppl.distributions' scale priors.

References are independent of the code under test: the ReLU NNGP kernel in numpy (spec §1.1
closed form) and brute-force ``scipy.integrate.quad`` over ln σ² with scipy's densities.
"""

import math
import warnings

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from scipy import integrate, stats

from ppl.distributions import BurrXII, HalfCauchyScale
from ppl.inference import nngp
from ppl.transforms.nngp import Dense, Relu, kernel_fn, serial, unit_scale

# ------------------------------------------------------------------- data (spec T3–T5)

X = np.linspace(-2, 2, 8)[:, None]
Y = np.sin(2 * X[:, 0]) + 0.1 * (-1.0) ** np.arange(8)
XS = np.array([[-3.0], [0.3], [3.0]])
YS = np.sin(2 * XS[:, 0])
TAU2 = 0.01
NET = serial(
    Dense(W_std=2**0.5, b_std=0.1**0.5),
    Relu(),
    Dense(W_std=2**0.5, b_std=0.1**0.5),
    Relu(),
    Dense(W_std=1.0),
)


def relu_kernel(x1, x2, depth=2, sw2=2.0, sb2=0.1):
    """Spec §1.1 closed form (numpy), unit-scale readout."""
    d = x1.shape[1]
    k12 = sw2 * x1 @ x2.T / d + sb2
    k1 = sw2 * np.sum(x1 * x1, 1) / d + sb2
    k2 = sw2 * np.sum(x2 * x2, 1) / d + sb2
    for layer in range(depth):
        nrm = np.sqrt(np.outer(k1, k2))
        c = np.clip(k12 / nrm, -1, 1)
        th = np.arccos(c)
        e = nrm / (2 * np.pi) * (np.sin(th) + (np.pi - th) * c)
        if layer == depth - 1:
            return e
        k12, k1, k2 = sw2 * e + sb2, sw2 * k1 / 2 + sb2, sw2 * k2 / 2 + sb2


class Ref:
    """numpy reference statistics with the same C = K + (τ² + 1e-10·mean diag K)·I."""

    def __init__(self, y=Y, tau2=TAU2):
        k = relu_kernel(X, X)
        self.tau2 = tau2 + 1e-10 * np.mean(np.diag(k))
        c = k + self.tau2 * np.eye(len(X))
        y2 = y.reshape(len(X), -1)
        self.beta = float(np.sum(y2 * np.linalg.solve(c, y2)))
        self.n = y2.size
        self.logdet = y2.shape[1] * np.linalg.slogdet(c)[1]
        ks = relu_kernel(X, XS)
        self.mu = ks.T @ np.linalg.solve(c, y)
        self.s2 = np.diag(relu_kernel(XS, XS)) - np.sum(ks * np.linalg.solve(c, ks), 0)

    def loglik(self, s):
        return -0.5 * (self.n * (np.log(2 * np.pi) + np.log(s)) + self.logdet + self.beta / s)

    def quad(self, log_prior, fn=lambda s: 1.0):
        """log ∫ π(s) e^{ℓ(s)} fn(s) ds over u = ln s, and E[fn(σ²) | y]."""

        def g(u):
            return log_prior(np.exp(u)) + u + self.loglik(np.exp(u))

        u0 = np.log(self.beta / self.n)
        g0 = g(u0)
        z = integrate.quad(lambda u: np.exp(g(u) - g0), -30, 30, epsabs=0, epsrel=1e-13)[0]
        e = integrate.quad(
            lambda u: np.exp(g(u) - g0) * fn(np.exp(u)), -30, 30, epsabs=0, epsrel=1e-13
        )[0]
        return g0 + np.log(z), e / z


REF = Ref()

IG = {
    "IG(2,2)": (dist.InverseGamma(2.0, 2.0), stats.invgamma(2.0, scale=2.0)),
    "IG(1,1)": (dist.InverseGamma(1.0, 1.0), stats.invgamma(1.0, scale=1.0)),
    "IG(5,0.5)": (dist.InverseGamma(5.0, 0.5), stats.invgamma(5.0, scale=0.5)),
}
# spec T3: log p(y), E[σ²|y], ν', Var f* at (−3, 0.3), lpd of y* at (−3, 0.3)
T3 = {
    "IG(2,2)": (-16.9095675, 13.4894281, 12, (0.4386200, 0.0863378), (-2.0284271, -0.1414106)),
    "IG(1,1)": (-15.6192684, 16.6117851, 10, (0.5401461, 0.1063222), (-1.9085923, -0.2226042)),
    "IG(5,0.5)": (-31.5541569, 8.2433925, 18, (0.2680408, 0.0527611), (-2.5236784, 0.0561991)),
}
GENERAL = {
    "Burr(2,2)": (BurrXII(2.0, 2.0), stats.burr12(2.0, 2.0).logpdf, -21.4029492),
    "Burr(2,1)": (BurrXII(2.0, 1.0), stats.burr12(2.0, 1.0).logpdf, -17.4414244),
    "half-Cauchy": (
        HalfCauchyScale(1.0),
        lambda s: -np.log(np.pi) - 0.5 * np.log(s) - np.log1p(s),
        -15.3874749,
    ),
}


def lpd_quad(log_prior, i):
    """Predictive log density of y*_i by quadrature (noise on the scale)."""
    v = REF.s2[i] + REF.tau2
    _, e = REF.quad(log_prior, lambda s: stats.norm.pdf(YS[i], REF.mu[i], np.sqrt(s * v)))
    return np.log(e)


# ---------------------------------------------------------------------------- checks


def test_reference_statistics_match_spec():
    assert REF.beta == pytest.approx(130.894281, abs=1e-5)
    assert REF.logdet == pytest.approx(-19.072440, abs=1e-5)
    np.testing.assert_allclose(REF.mu, [1.480225, 0.691478, -1.480225], atol=1e-6)
    np.testing.assert_allclose(REF.s2, [0.0325158, 0.0064004, 0.0325158], atol=1e-7)


@pytest.mark.parametrize("name", list(IG))
def test_t3_closed_form_vs_table_gh_and_quadrature(name):
    prior, sp = IG[name]
    le, es2, nu, var, lpd = T3[name]
    closed = nngp.fit(NET, X, Y, prior=prior, noise=TAU2, method="closed")
    gh = nngp.fit(NET, X, Y, prior=prior, noise=TAU2, method="gh")
    q_le, q_es2 = REF.quad(sp.logpdf, lambda s: s)
    # closed form: the spec's table (1e-6) and the quadrature (1e-9)
    assert float(closed.log_evidence) == pytest.approx(le, abs=1e-6)
    assert float(closed.log_evidence) == pytest.approx(q_le, abs=1e-9)
    assert closed.mean_scale == pytest.approx(es2, abs=1e-6)
    assert closed.mean_scale == pytest.approx(q_es2, rel=1e-9)
    # Gauss–Hermite at 32 nodes: 1e-8
    assert float(gh.log_evidence) == pytest.approx(q_le, abs=1e-8)
    assert gh.mean_scale == pytest.approx(q_es2, rel=1e-6)  # a moment: measured ≤ 1e-7
    pc = nngp.predict(closed, XS, latent=True)
    pg = nngp.predict(gh, XS, latent=True)
    assert pc.df == nu and pg.df is None
    np.testing.assert_allclose(pc.variance[:2], var, atol=1e-6)
    np.testing.assert_allclose(pg.variance, pc.variance, rtol=1e-6)
    np.testing.assert_allclose(pc.mean, REF.mu, atol=1e-9)
    np.testing.assert_allclose(pc.variance[0], pc.variance[2], rtol=1e-12)  # x* = 3 mirrors −3
    yc = nngp.predict(closed, XS).log_prob(YS)
    yg = nngp.predict(gh, XS).log_prob(YS)
    np.testing.assert_allclose(yc[:2], lpd, atol=1e-6)
    np.testing.assert_allclose(yg, yc, atol=1e-8)
    assert yc[0] == pytest.approx(lpd_quad(sp.logpdf, 0), abs=1e-8)


def test_student_t_predict_matches_closed_predictive():
    df, loc, scale = nngp.student_t_predict(kernel_fn(unit_scale(NET)), X, Y, XS, 2.0, 2.0, TAU2)
    assert df == 12.0 and loc.shape == (3,) and scale.shape == (3, 3)
    np.testing.assert_allclose(loc, REF.mu, atol=1e-9)
    np.testing.assert_allclose(np.diag(scale)[:2] * df / (df - 2), T3["IG(2,2)"][3], atol=1e-6)
    np.testing.assert_allclose(scale, scale.T, atol=1e-15)
    pc = nngp.predict(
        nngp.fit(NET, X, Y, prior=dist.InverseGamma(2.0, 2.0), noise=TAU2, method="closed"),
        XS,
        latent=True,
        full_cov=True,
    )
    np.testing.assert_allclose(pc.covariance, scale * df / (df - 2), rtol=1e-10)
    np.testing.assert_allclose(np.diag(pc.covariance), pc.variance, rtol=1e-12)


@pytest.mark.parametrize("name", list(GENERAL))
def test_t4_general_priors_gh_vs_quadrature(name):
    prior, log_prior, le = GENERAL[name]
    post = nngp.fit(NET, X, Y, prior=prior, noise=TAU2)
    q_le, q_es2 = REF.quad(log_prior, lambda s: s)
    assert float(post.log_evidence) == pytest.approx(le, abs=1e-6)
    assert float(post.log_evidence) == pytest.approx(q_le, abs=1e-8)
    assert post.mean_scale == pytest.approx(q_es2, rel=1e-6)  # measured ≤ 3e-7
    assert post.log_scale_nodes.shape == post.log_weights.shape == (32,)
    assert float(np.exp(post.log_weights).sum()) == pytest.approx(1.0, abs=1e-12)
    if name == "Burr(2,2)":
        assert post.mean_scale == pytest.approx(9.451054, abs=1e-5)
        lpd = nngp.predict(post, XS).log_prob(YS)
        assert lpd[0] == pytest.approx(-2.350819, abs=1e-6)
        assert lpd[0] == pytest.approx(lpd_quad(log_prior, 0), abs=1e-8)


def test_gh_error_decays_with_nodes():
    prior, log_prior, _ = GENERAL["Burr(2,2)"]
    q_le, _ = REF.quad(log_prior)
    errs = [
        abs(float(nngp.fit(NET, X, Y, prior=prior, noise=TAU2, num_nodes=m).log_evidence) - q_le)
        for m in (8, 16, 32)
    ]
    assert errs[0] < 1e-3 and errs[1] < 1e-5 and errs[2] < 1e-8  # spec: 1e-4, 5e-7, 1.5e-10


@pytest.mark.parametrize("name", ["IG(2,2)", "Burr(2,2)"])
def test_importance_sampling_t_proposal(name):
    if name == "IG(2,2)":
        prior, ref, tol = IG[name][0], T3[name][0], 0.06
    else:
        prior, ref, tol = GENERAL[name][0], GENERAL[name][2], 0.07
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ESS warning
        post = nngp.fit(NET, X, Y, prior=prior, noise=TAU2, method="is", key=jax.random.key(7))
    assert abs(float(post.log_evidence) - ref) <= tol
    assert 650 < float(post.ess) <= 1000  # spec: ≈ 772
    assert post.log_scale_nodes.shape == (1000,)
    lp = nngp.predict(post, XS).log_prob(YS)
    assert np.all(np.isfinite(lp))


def test_prior_proposal_collapses_and_warns():
    prior = GENERAL["Burr(2,2)"][0]
    with pytest.warns(UserWarning, match="effective sample size"):
        post = nngp.fit(NET, X, Y, prior=prior, noise=TAU2, method="is", proposal="prior")
    assert float(post.ess) < 100  # spec: ESS ≈ 2 of 1000


@pytest.mark.slow
def test_importance_sampling_repeats():
    """Spec T4: 200 runs of the t₄ proposal; mean within 0.01 of the reference."""
    prior, _, ref = GENERAL["Burr(2,2)"]
    les, esss = [], []
    for r in range(200):
        post = nngp.fit(NET, X, Y, prior=prior, noise=TAU2, method="is", key=7000 + r)
        les.append(float(post.log_evidence))
        esss.append(float(post.ess))
    assert abs(np.mean(les) - ref) <= 0.01
    assert np.std(les) < 0.04 and np.max(np.abs(np.array(les) - ref)) <= 0.07
    assert 700 < np.mean(esss) < 850
    # the reference's prior proposal, IG(2,2): unbiased-ish but noisy (spec: sd 0.18)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        les = [
            float(
                nngp.fit(
                    NET,
                    X,
                    Y,
                    prior=IG["IG(2,2)"][0],
                    noise=TAU2,
                    method="is",
                    proposal="prior",
                    key=5000 + r,
                ).log_evidence
            )
            for r in range(50)
        ]
    assert abs(np.mean(les) - T3["IG(2,2)"][0]) < 0.15


def test_delta_prior_is_the_plain_nngp():
    v = 2.5
    post = nngp.fit(NET, X, Y, prior=dist.Delta(v), noise=TAU2)
    c = relu_kernel(X, X) + REF.tau2 * np.eye(8)
    exact = stats.multivariate_normal(np.zeros(8), v * c).logpdf(Y)
    assert float(post.log_evidence) == pytest.approx(exact, abs=1e-10)
    assert post.log_scale_nodes.tolist() == [math.log(v)]
    for latent in (True, False):
        pred = nngp.predict(post, XS, latent=latent)
        var = v * (REF.s2 + (0.0 if latent else REF.tau2))
        np.testing.assert_allclose(pred.mean, REF.mu, atol=1e-10)
        np.testing.assert_allclose(pred.variance, var, rtol=1e-9)
        np.testing.assert_allclose(
            pred.log_prob(YS), stats.norm.logpdf(YS, REF.mu, np.sqrt(var)), atol=1e-9
        )


def test_multi_output_shares_one_scale():
    y2 = np.stack([Y, 0.5 * Y[::-1] + 0.2], axis=1)
    ref = Ref(y2)
    prior, sp = IG["IG(2,2)"]
    closed = nngp.fit(NET, X, y2, prior=prior, noise=TAU2, method="closed")
    gh = nngp.fit(NET, X, y2, prior=prior, noise=TAU2)
    q_le, q_es2 = ref.quad(sp.logpdf, lambda s: s)
    assert closed.num_obs == 16 and closed.beta == pytest.approx(ref.beta, rel=1e-10)
    assert float(closed.log_evidence) == pytest.approx(q_le, abs=1e-9)
    assert float(gh.log_evidence) == pytest.approx(q_le, abs=1e-8)
    assert closed.a == pytest.approx(2.0 + 8.0)  # a + n·k/2
    # a shared scale is not two independent fits
    single = [Ref(y2[:, j]).quad(sp.logpdf)[0] for j in range(2)]
    assert abs(sum(single) - float(closed.log_evidence)) > 0.1
    pred = nngp.predict(gh, XS)
    assert pred.mean.shape == (3, 2) and pred.variance.shape == (3,)
    np.testing.assert_allclose(pred.mean[:, 0], REF.mu, atol=1e-10)
    lp = pred.log_prob(np.zeros((3, 2)))
    assert lp.shape == (3, 2) and np.all(np.isfinite(lp))


def test_trained_ensemble_readout_only_t5():
    prior = dist.InverseGamma(2.0, 2.0)
    ens = nngp.trained_ensemble(NET, X, Y, XS, prior=prior, noise=1e-8)
    np.testing.assert_allclose(ens.mean, [3.07835, 0.65990, -3.07835], atol=1e-5)
    np.testing.assert_allclose(ens.unit_variance, [1.465e-3, 2.1e-5, 1.465e-3], atol=1e-6)
    assert ens.df == 4.0  # 2a, not 2a + n
    np.testing.assert_allclose(ens.scale, np.sqrt(ens.unit_variance), rtol=1e-12)  # b/a = 1
    np.testing.assert_allclose(ens.variance, 2.0 * ens.unit_variance, rtol=1e-12)  # b/(a−1)
    # a general prior: mixture under the prior, E[σ²] = mean of Burr(2, 2) = π/4
    burr = nngp.trained_ensemble(NET, X, Y, XS, prior=BurrXII(2.0, 2.0), noise=1e-8)
    np.testing.assert_allclose(burr.variance, math.pi / 4 * burr.unit_variance, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="unverified"):
        nngp.trained_ensemble(NET, X, Y, XS, prior=prior, readout_only=False)


def test_kernel_function_net_and_kernel_fn_agree():
    prior = BurrXII(2.0, 1.0)
    a = nngp.fit(NET, X, Y, prior=prior, noise=TAU2)
    b = nngp.fit(kernel_fn(unit_scale(NET)), X, Y, prior=prior, noise=TAU2)
    c = nngp.fit(relu_kernel, X, Y, prior=prior, noise=TAU2)  # a plain numpy kernel
    assert float(a.log_evidence) == pytest.approx(float(b.log_evidence), abs=1e-12)
    assert float(a.log_evidence) == pytest.approx(float(c.log_evidence), abs=1e-9)
    np.testing.assert_allclose(
        nngp.predict(c, XS).variance, nngp.predict(a, XS).variance, rtol=1e-8
    )
    assert jax.tree_util.tree_leaves(a)  # a pytree


def test_predictive_sampling_matches_moments():
    post = nngp.fit(NET, X, Y, prior=GENERAL["Burr(2,1)"][0], noise=TAU2)
    pred = nngp.predict(post, XS[:2], latent=True, full_cov=True)
    draws = pred.sample(jax.random.key(1), 20000)
    assert draws.shape == (20000, 2)
    assert np.all(np.abs(draws.mean(0) - pred.mean) < 5 * np.sqrt(pred.variance / 2e4))
    corr = np.corrcoef(draws.T)[0, 1]
    ref = pred.covariance[0, 1] / np.sqrt(pred.covariance[0, 0] * pred.covariance[1, 1])
    assert corr == pytest.approx(ref, abs=0.03)
    np.testing.assert_allclose(draws.var(0), pred.variance, rtol=0.1)


@pytest.mark.slow
def test_nuts_on_the_scale_site():
    prior = dist.InverseGamma(2.0, 2.0)
    post = nngp.fit(
        NET, X, Y, prior=prior, noise=TAU2, method="nuts", num_samples=600, num_warmup=300, key=0
    )
    assert post.log_scale_nodes.shape == (600,) and np.isnan(float(post.log_evidence))
    # σ² | y ~ IG(6, 2 + β/2): E = 13.489, sd = 6.74; NUTS ESS ≥ 100 → 4 MC se ≲ 2.7
    se = 6.74 / math.sqrt(float(post.ess))
    assert abs(post.mean_scale - T3["IG(2,2)"][1]) < 4 * se
    assert float(post.ess) > 100


@pytest.mark.slow
def test_nuts_on_a_numpyro_model():
    c = relu_kernel(X, X) + REF.tau2 * np.eye(8)

    def model(x, y=None):
        s = numpyro.sample("scale", dist.InverseGamma(2.0, 2.0))
        numpyro.sample("y", dist.MultivariateNormal(np.zeros(len(x)), s * c), obs=y)

    post = nngp.fit(
        model, X, Y, method="nuts", num_samples=1000, key=1, kernel=relu_kernel, noise=TAU2
    )
    assert abs(post.mean_scale - T3["IG(2,2)"][1]) < 4 * 6.74 / math.sqrt(float(post.ess))
    pred = nngp.predict(post, XS, latent=True)
    np.testing.assert_allclose(pred.variance[:2], T3["IG(2,2)"][3], rtol=0.15)
    gh = nngp.fit(model, X, Y, method="gh")  # the same model, by quadrature over the scale
    assert float(gh.log_evidence) == pytest.approx(T3["IG(2,2)"][0], abs=1e-6)


def test_fit_hyperparameters_improves_evidence():
    net = serial(Dense(W_std=1.0, b_std=0.1), Relu(), Dense(W_std=3.0))
    res = nngp.fit_hyperparameters(net, X, Y, prior=dist.InverseGamma(2.0, 2.0), steps=100, lr=0.05)
    assert res.losses.shape == (100,) and np.all(np.isfinite(res.losses))
    assert res.losses[-1] < res.losses[0] - 0.05
    assert res.net.layers[-1].W_std == 1.0  # σ_v fixed under a scale prior (D2)
    assert res.net.layers[0].W_std == pytest.approx(res.params["W_std"])
    assert isinstance(res.prior, dist.InverseGamma)
    post = nngp.fit(res.net, X, Y, prior=res.prior, noise=res.noise, method="closed")
    assert -float(post.log_evidence) / 8 == pytest.approx(res.losses[-1], abs=0.02)


@pytest.mark.slow
def test_fit_hyperparameters_general_prior_and_plain_nngp():
    net = serial(Dense(W_std=1.0, b_std=0.1), Relu(), Dense(b_std=0.1), Relu(), Dense())
    res = nngp.fit_hyperparameters(net, X, Y, prior=BurrXII(2.0, 2.0), steps=100, lr=0.05)
    assert res.losses[-1] < res.losses[0]
    assert res.net.layers[0].W_std == res.net.layers[2].W_std  # shared hidden σ_w
    res = nngp.fit_hyperparameters(net, X, Y, prior=None, steps=100, lr=0.05)
    assert res.losses[-1] < res.losses[0] and "scale" in res.params
    assert res.net.layers[-1].W_std == pytest.approx(math.sqrt(res.params["scale"]))


def test_burr_and_half_cauchy_distributions():
    s = np.array([0.2, 1.0, 7.5])
    b = BurrXII(2.0, 1.5)
    np.testing.assert_allclose(np.exp(b.log_prob(s)), stats.burr12(2.0, 1.5).pdf(s), rtol=1e-6)
    np.testing.assert_allclose(b.cdf(s), stats.burr12(2.0, 1.5).cdf(s), rtol=1e-6)
    draws = np.asarray(b.sample(jax.random.key(0), (4000,)))
    assert stats.kstest(draws, stats.burr12(2.0, 1.5).cdf).pvalue > 1e-3
    h = HalfCauchyScale(1.5)
    sig = np.sqrt(np.asarray(h.sample(jax.random.key(1), (4000,))))
    assert stats.kstest(sig, stats.halfcauchy(scale=1.5).cdf).pvalue > 1e-3
    # density of σ² when σ ~ HalfCauchy(1.5): p_σ(√s)/(2√s)
    ref = stats.halfcauchy(scale=1.5).pdf(np.sqrt(s)) / (2 * np.sqrt(s))
    np.testing.assert_allclose(np.exp(h.log_prob(s)), ref, rtol=1e-6)
    np.testing.assert_allclose(h.cdf(s), stats.halfcauchy(scale=1.5).cdf(np.sqrt(s)), rtol=1e-6)
    for bad in (lambda: BurrXII(0.0, 1.0), lambda: BurrXII(1.0, -2.0)):
        with pytest.raises(ValueError, match="> 0"):
            bad()
    with pytest.raises(ValueError, match="scale"):
        HalfCauchyScale(-1.0)


def bad_kernel(a, b):
    return -np.ones((a.shape[0], b.shape[0]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=X[:7]), "rows"),
        (dict(x=np.where(X == X[2], np.nan, X)), "NaN"),
        (dict(y=np.where(Y == Y[0], np.inf, Y)), "NaN or inf"),
        (dict(noise=0.0), "noise"),
        (dict(noise=-1.0), "noise"),
        (dict(method="laplace"), "method"),
        (dict(prior=dist.Normal(0.0, 1.0)), "positive support"),
        # numpyro refuses IG(−2, −2) at construction; a transformed pytree gets through
        (dict(prior=jax.tree_util.tree_map(lambda v: -v, dist.InverseGamma(2.0, 2.0))), "a "),
        (dict(prior=BurrXII(2.0, 2.0), method="closed"), "InverseGamma"),
        (dict(prior=dist.Delta(-1.0)), "Delta"),
        (dict(kernel=bad_kernel), "condition number"),
        (dict(num_nodes=0), "num_nodes"),
    ],
)
def test_bad_inputs(kwargs, match):
    args = dict(kernel=NET, x=X, y=Y, prior=dist.InverseGamma(2.0, 2.0), noise=TAU2, method="gh")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        nngp.fit(args.pop("kernel"), args.pop("x"), args.pop("y"), **args)


def test_bad_inputs_predict_and_student_t():
    post = nngp.fit(NET, X, Y, prior=dist.InverseGamma(2.0, 2.0), noise=TAU2)
    with pytest.raises(ValueError, match="feature shape"):
        nngp.predict(post, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        nngp.predict(post, np.array([[np.nan]]))
    k = kernel_fn(unit_scale(NET))
    for a, b, match in ((0.0, 1.0, "a"), (1.0, -1.0, "b")):
        with pytest.raises(ValueError, match=match):
            nngp.student_t_predict(k, X, Y, XS, a, b, TAU2)
    with pytest.raises(ValueError, match="noise_var"):
        nngp.student_t_predict(k, X, Y, XS, 2.0, 2.0, 0.0)
    with pytest.raises(ValueError, match="feature shape"):
        nngp.student_t_predict(k, X, Y, np.zeros((2, 2)), 2.0, 2.0, TAU2)
    with pytest.raises(ValueError, match="x_test"):
        nngp.trained_ensemble(NET, X, Y, np.zeros((2, 2)), prior=dist.InverseGamma(2.0, 2.0))
