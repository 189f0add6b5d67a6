"""MVD through NumPyro's wrappers (plates/expand, to_event, mask) and batched parameters.

For each family (Normal, LogNormal, Gamma, Poisson, Bernoulli, Categorical) and wrapper, the
objective ``E_q[Σ_e g(z_e)]`` has a closed form; ``ppl.value_and_grad`` with the site's
estimator set to MVD is averaged over 4000 keys (``jit(vmap)``, fixed seeds) and the mean
must lie within 4 standard errors of the closed-form gradient (and value). Masked-out
elements contribute nothing to the gradient (the draw itself is still from q).

The Gamma-concentration rule draws from the positive and negative parts of the score by
exact rejection; its pieces are also checked against float64 quadrature.
"""

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from scipy import integrate, special

import ppl
from ppl.transforms import MVD, estimators

est_mod = importlib.import_module("ppl.transforms.estimators")

N = 3
MASK = np.array([True, False, True])
KEYS = 4000
G_CAT = jnp.array([1.0, -2.0, 3.5])

# family: (distribution factory, g, per-element E[g] in closed form, scalar params, batched)
FAMILIES = {
    "normal": (
        lambda p: dist.Normal(p["loc"], p["scale"]),
        lambda z: z**2,
        lambda p: p["loc"] ** 2 + p["scale"] ** 2,
        {"loc": 0.7, "scale": 0.8},
        {"loc": [0.7, -0.4, 1.1], "scale": [0.8, 1.3, 0.5]},
    ),
    "lognormal": (
        lambda p: dist.LogNormal(p["loc"], p["scale"]),
        lambda z: z**2,
        lambda p: jnp.exp(2 * p["loc"] + 2 * p["scale"] ** 2),
        {"loc": 0.2, "scale": 0.4},
        {"loc": [0.2, -0.3, 0.1], "scale": [0.4, 0.3, 0.5]},
    ),
    "gamma": (
        lambda p: dist.Gamma(p["alpha"], p["beta"]),
        lambda z: z**2,
        lambda p: p["alpha"] * (p["alpha"] + 1) / p["beta"] ** 2,
        {"alpha": 2.5, "beta": 1.5},
        {"alpha": [2.5, 0.6, 14.0], "beta": [1.5, 0.8, 4.0]},
    ),
    "poisson": (
        lambda p: dist.Poisson(p["rate"]),
        lambda z: z**2,
        lambda p: p["rate"] + p["rate"] ** 2,
        {"rate": 2.2},
        {"rate": [2.2, 0.5, 4.0]},
    ),
    "bernoulli": (
        lambda p: dist.Bernoulli(logits=p["logit"]),
        lambda z: z,
        lambda p: jax.nn.sigmoid(p["logit"]),
        {"logit": 0.4},
        {"logit": [0.4, -1.0, 2.0]},
    ),
    "categorical": (
        lambda p: dist.Categorical(logits=p["logits"]),
        lambda z: G_CAT[z],
        lambda p: jax.nn.softmax(p["logits"], -1) @ G_CAT,
        {"logits": [0.3, -0.5, 0.9]},
        {"logits": [[0.3, -0.5, 0.9], [1.0, 0.0, -1.0], [0.0, 0.2, 0.1]]},
    ),
}

WRAPPERS = ("plain", "plate", "event", "mask", "batched", "event_mask", "expand_event")


def _build(family, wrapper, est):
    make, _, _, scalar, batched = FAMILIES[family]
    init = batched if wrapper in ("batched", "expand_event") else scalar
    infer = {"estimator": est}

    def guide():
        p = {k: numpyro.param(k, jnp.asarray(v, jnp.float32)) for k, v in init.items()}
        d = make(p)
        if wrapper == "plain":
            numpyro.sample("z", d, infer=infer)
        elif wrapper == "plate":  # ExpandedDistribution
            with numpyro.plate("n", N):
                numpyro.sample("z", d.expand([N]), infer=infer)
        elif wrapper == "event":  # Independent(Expanded)
            numpyro.sample("z", d.expand([N]).to_event(1), infer=infer)
        elif wrapper == "mask":  # Masked(Expanded)
            with numpyro.plate("n", N):
                numpyro.sample("z", d.expand([N]).mask(jnp.asarray(MASK)), infer=infer)
        elif wrapper == "batched":  # batched parameters, plain law
            with numpyro.plate("n", N):
                numpyro.sample("z", d, infer=infer)
        elif wrapper == "event_mask":  # Independent(Masked(Expanded))
            numpyro.sample("z", d.expand([N]).mask(jnp.asarray(MASK)).to_event(1), infer=infer)
        elif wrapper == "expand_event":  # Expanded(Independent(batched)) in a plate
            with numpyro.plate("m", 2):
                numpyro.sample("z", d.to_event(1).expand([2]), infer=infer)
        else:
            raise AssertionError(wrapper)

    shape = {"plain": (), "expand_event": (2, N)}.get(wrapper, (N,))
    weight = np.ones(shape)
    if "mask" in wrapper:
        weight = MASK.astype(float)
    params = {k: jnp.asarray(v, jnp.float32) for k, v in init.items()}
    return guide, params, shape, weight


def _empty_model():
    pass


def _draws(family, guide, params, seed, n=KEYS):
    g = FAMILIES[family][1]

    def objective(model, guide):
        tr = ppl.sample_trace(guide)
        return jnp.sum(g(tr.values["z"]).astype(jnp.float32))

    f = ppl.value_and_grad(objective, _empty_model, guide)
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    v, grads = jax.jit(jax.vmap(f, in_axes=(None, 0)))(params, keys)
    return np.asarray(v, np.float64), {k: np.asarray(a, np.float64) for k, a in grads.items()}


def _exact(family, params, shape, weight):
    mean = FAMILIES[family][2]

    def total(p, w):
        return jnp.sum(jnp.broadcast_to(mean(p), shape) * w)

    value = float(total(params, jnp.ones(shape)))
    grads = jax.grad(total)(params, jnp.asarray(weight, jnp.float32))
    return value, {k: np.asarray(v) for k, v in grads.items()}


def _assert_mean(samples, target, label, k=4.0):
    mean = samples.mean(0)
    se = samples.std(0, ddof=1) / math.sqrt(samples.shape[0])
    err = np.abs(mean - target)
    assert np.all(err <= k * se + 1e-6), f"{label}: mean {mean} (s.e. {se}), expected {target}"
    return mean, se


CASES = [(f, w) for f in FAMILIES for w in WRAPPERS]
# The default suite checks every family through a plate (the ExpandedDistribution)
# and through Independent(Masked(Expanded)); the other wrappers run with -m slow.
DEFAULT = {"plate", "event_mask"}


@pytest.mark.parametrize(
    "family,wrapper",
    [
        pytest.param(f, w, marks=() if w in DEFAULT else pytest.mark.slow, id=f"{f}-{w}")
        for f, w in CASES
    ],
)
def test_mvd_gradient_matches_closed_form(family, wrapper):
    guide, params, shape, weight = _build(family, wrapper, MVD())
    seed = 1000 + CASES.index((family, wrapper))
    v, g = _draws(family, guide, params, seed)
    value, grad = _exact(family, params, shape, weight)
    _assert_mean(v, value, f"{family}/{wrapper} value")
    for k in params:
        mean, se = _assert_mean(g[k], grad[k], f"{family}/{wrapper} d/d{k}")
        print(f"{family}/{wrapper} d/d{k}: {np.round(mean, 4)} ± {np.round(se, 4)} vs {grad[k]}")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["normal", "lognormal", "gamma"])
def test_uncoupled_mvd_is_unbiased_too(family):
    guide, params, shape, weight = _build(family, "plate", MVD(coupled=False))
    v, g = _draws(family, guide, params, 77)
    value, grad = _exact(family, params, shape, weight)
    _assert_mean(v, value, f"{family} value")
    for k in params:
        _assert_mean(g[k], grad[k], f"{family} uncoupled d/d{k}")


def test_estimator_map_route_bernoulli_probs_and_chi2():
    """The ``estimators`` handler route; BernoulliProbs and ``Chi2`` (a Gamma subclass)."""

    def guide():
        p = numpyro.param("p", jnp.array([0.2, 0.5, 0.9]))
        df = numpyro.param("df", jnp.array(3.0))
        with numpyro.plate("n", N):
            numpyro.sample("c", dist.Bernoulli(probs=p))
            numpyro.sample("x", dist.Chi2(df).expand([N]))

    def objective(model, guide):
        tr = ppl.sample_trace(guide)
        return jnp.sum(tr.values["c"] * 2.0) + jnp.sum(tr.values["x"] ** 2)

    f = ppl.value_and_grad(objective, _empty_model, estimators(guide, {"c": "mvd", "x": MVD()}))
    params = {"p": jnp.array([0.2, 0.5, 0.9]), "df": jnp.array(3.0)}
    keys = jax.random.split(jax.random.PRNGKey(5), KEYS)
    _, g = jax.jit(jax.vmap(f, in_axes=(None, 0)))(params, keys)
    _assert_mean(np.asarray(g["p"], np.float64), np.full(N, 2.0), "Bernoulli(probs) d/dp")
    # E[x²] = df(df + 2) per element: d/d df = 2 df + 2, three elements
    _assert_mean(np.asarray(g["df"], np.float64), 3 * (2 * 3.0 + 2), "Chi2 d/d df")


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "make,law,applicable",
    [
        (
            lambda: dist.Beta(2.0, 2.0).expand([N]),
            "Beta inside ExpandedDistribution",
            "REPARAM, REINFORCE",
        ),
        (
            lambda: dist.Binomial(4, 0.3).expand([N]).to_event(1),
            "BinomialProbs inside ExpandedDistribution inside Independent",
            "ENUM, REINFORCE",
        ),
        (
            lambda: dist.Geometric(0.3).mask(False),
            "GeometricProbs inside MaskedDistribution",
            ": REINFORCE",
        ),
    ],
)
def test_unsupported_law_error_names_site_law_and_estimators(make, law, applicable):
    def guide():
        with numpyro.plate("n", N):
            numpyro.sample("bad_site", make(), infer={"estimator": MVD()})

    f = ppl.value_and_grad(
        lambda m, g: jnp.sum(ppl.sample_trace(g).values["bad_site"]), _empty_model, guide
    )
    with pytest.raises(ValueError) as info:
        f({}, jax.random.PRNGKey(0))
    msg = str(info.value)
    assert "'bad_site'" in msg and law in msg and applicable in msg, msg


# ---------------------------------------------------------------------------- element-wise view


def test_elementwise_resolves_wrappers_to_the_family_with_broadcast_parameters():
    fn = dist.Normal(jnp.zeros(N), 1.0).to_event(1).expand([2]).mask(jnp.array([True, False]))
    el = est_mod.elementwise(fn)
    assert type(el) is dist.Normal and el.batch_shape == (2, N)
    assert el.loc.shape == el.scale.shape == (2, N)
    np.testing.assert_array_equal(el._ppl_mask, np.array([[True] * N, [False] * N]))
    assert est_mod.elementwise(el)._ppl_mask is not None  # idempotent
    cat = est_mod.elementwise(dist.Categorical(logits=jnp.zeros(4)).expand([2, N]))
    assert type(cat) is dist.CategoricalLogits and cat.logits.shape == (2, N, 4)
    # ENUM's use: support and per-element probabilities of an expanded Bernoulli
    b = est_mod.elementwise(dist.Bernoulli(logits=0.3).expand([N]).to_event(1))
    probs = jnp.exp(b.log_prob(b.enumerate_support(expand=False)))
    np.testing.assert_allclose(probs.sum(0), np.ones(N), rtol=1e-6)
    # a law without a rule keeps the old behaviour (expanded, unmasked log_prob)
    beta = est_mod.elementwise(dist.Beta(2.0, 2.0).expand([N]).mask(False))
    assert beta.batch_shape == (N,) and not hasattr(beta, "_ppl_mask")


def test_mvd_rule_zeroes_masked_weights():
    fn = dist.Gamma(2.0, 1.0).expand([N]).mask(jnp.asarray(MASK))
    z = fn.sample(jax.random.PRNGKey(0))
    for _, c, _, _ in est_mod.mvd_rule(est_mod.elementwise(fn), z, jax.random.PRNGKey(1)):
        c = np.broadcast_to(np.asarray(c), (N,))
        assert np.all(c[~MASK] == 0) and np.all(c[MASK] > 0)


# ---------------------------------------------------------------------------- Gamma shape pieces

ALPHAS = [0.05, 0.6, 3.0, 9.99, 50.0, 2000.0]


def _v_density(a):
    m = special.digamma(a) - np.log(a)
    lgam = special.gammaln(a) - a * np.log(a) + a
    return m, (lambda v: np.exp(a * (1 + v - np.exp(v)) - lgam))


def _quad(f, lo, hi):
    return integrate.quad(f, lo, hi, limit=1000, epsabs=0, epsrel=1e-11)[0]


@pytest.mark.slow  # 100k rejection draws at six shapes against quadrature, ~30 s
def test_gamma_shape_weight_and_side_moments_match_quadrature():
    n = 100_000
    alpha = jnp.repeat(jnp.asarray(ALPHAS, jnp.float32)[:, None], n, axis=1)
    sides = jax.jit(est_mod._gamma_shape_sides, static_argnums=2)
    c, v_plus, v_minus = sides(alpha, jax.random.PRNGKey(3), False)
    for i, a in enumerate(ALPHAS):
        m, p = _v_density(a)
        with np.errstate(over="ignore"):
            c_ref = _quad(lambda v: p(v) * (v - m), m, np.inf)
            np.testing.assert_allclose(float(c[i, 0]), c_ref, rtol=2e-5)
            for draws, sign, lo, hi in ((v_plus, 1, m, np.inf), (v_minus, -1, -np.inf, m)):
                d = np.asarray(draws[i], np.float64) - m
                assert np.all(sign * d > 0), (a, sign)
                for k in (1, 2):
                    ref = _quad(lambda v: p(v) * sign * (v - m) ** (k + 1), lo, hi) / c_ref
                    se = (d**k).std() / math.sqrt(n)
                    assert abs((d**k).mean() - ref) < 4 * se, (a, sign, k, (d**k).mean(), ref)


def test_gamma_shape_rejection_envelope_covers_the_target():
    """``f(v)/f(mode) ≤ e^δ min(1, e^{1−|x|})`` on a fine grid, both sides, α over 7 decades."""
    alpha = jnp.asarray(np.geomspace(0.015, 1e5, 40), jnp.float32)
    m, lgam, c = est_mod._gamma_shape_constants(alpha)
    dh = lambda v: alpha * (1.0 - jnp.exp(v)) + 1.0 / (v - m)
    em = est_mod._expm1_minus_x
    x = jnp.linspace(-40.0, 40.0, 40001)[:, None]
    for mode in (
        est_mod._bisect(dh, m, jnp.maximum(m, 0.0) + 2.0 / jnp.sqrt(alpha)),
        est_mod._bisect(dh, m - 2.0 / (alpha * -jnp.expm1(m)), m),
    ):
        log_f_mode = -alpha * em(mode) - lgam + jnp.log(jnp.abs(mode - m)) - jnp.log(c)
        v = mode + x / jnp.exp(log_f_mode - est_mod._DELTA)
        ratio = (v - m) / (mode - m)
        safe = jnp.where(ratio > 0, ratio, 1.0)
        log_rel = jnp.where(ratio > 0, -alpha * (em(v) - em(mode)) + jnp.log(safe), -jnp.inf)
        gap = log_rel - jnp.minimum(0.0, 1.0 - jnp.abs(x)) - est_mod._DELTA
        assert float(jnp.max(gap)) <= 0.0
