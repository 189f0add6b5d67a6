"""Core DSL and value_and_grad: exact answers on small cases (brute force, closed forms,
NumPyro's own Trace_ELBO), unbiasedness of mixed estimator assignments, and bad input."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import Trace_ELBO

import ppl
from ppl.transforms import ENUM, MVD, REINFORCE, REPARAM, estimators

X = jnp.array([0.5, 1.2, -0.3])


def gauss_model(x):
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def gauss_guide(x):
    m = numpyro.param("m", 0.2)
    s = numpyro.param("s", jnp.exp(-0.5), constraint=dist.constraints.positive)
    numpyro.sample("z", dist.Normal(m, s))


def mean_and_se(a):
    a = np.asarray(a)
    return a.mean(0), a.std(0) / np.sqrt(a.shape[0])


def batched(objective, model, guide, n, seed=0):
    """Evaluate ``n`` independent estimates at once: ``(values [n], grads [n, ...])``."""
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    f = ppl.value_and_grad(objective, model, guide)

    def run(params, *args):
        g = jax.vmap(lambda k: f(params, k, *args))
        return jax.jit(g)(keys)

    return run


def test_elbo_value_and_reparam_gradient_equal_numpyro_trace_elbo():
    params = ppl.init_params(jax.random.PRNGKey(0), gauss_model, gauss_guide, X)
    f = jax.jit(ppl.value_and_grad(ppl.objectives.elbo, gauss_model, gauss_guide))
    constrained = ppl.constrain_params(params, gauss_model, gauss_guide, X)
    for seed in range(3):
        key = jax.random.PRNGKey(seed)
        value, grads = f(params, key, X)

        def neg_loss(p):
            c = {"m": p["m"], "s": jnp.exp(p["s"])}
            return -Trace_ELBO().loss(key, c, gauss_model, gauss_guide, X)

        ref_value, ref_grads = jax.value_and_grad(neg_loss)(params)
        np.testing.assert_allclose(value, ref_value, atol=1e-5)
        for k in params:
            np.testing.assert_allclose(grads[k], ref_grads[k], atol=1e-5)
    assert float(constrained["s"]) == pytest.approx(np.exp(-0.5), rel=1e-6)


def test_elbo_gradient_is_unbiased_for_the_closed_form():
    # spec §4.1: d/dm = sum(x) - 4m = 0.6, d/dlog s = 1 - 4 s^2 = -0.4715178
    params = ppl.init_params(jax.random.PRNGKey(0), gauss_model, gauss_guide, X)
    for est in [REPARAM(), REINFORCE(), MVD()]:
        g = estimators(gauss_guide, {"z": est})
        _, grads = batched(ppl.objectives.elbo, gauss_model, g, 20000, seed=11)(params, X)
        for k, exact in [("m", 0.6), ("s", -0.4715178)]:
            m, se = mean_and_se(grads[k])
            assert abs(m - exact) < 4 * se + 1e-4, (est, k, m, se)


def brute_force_elbo(model, guide, params, supports):
    """Exact ELBO by summing over every joint value of the guide's discrete sites."""
    from numpyro.handlers import condition, substitute, trace

    total = 0.0
    names = list(supports)
    for values in itertools.product(*supports.values()):
        data = {n: jnp.asarray(v) for n, v in zip(names, values, strict=True)}
        gt = trace(substitute(condition(guide, data), params)).get_trace()
        mt = trace(condition(model, data)).get_trace()
        log_q = sum(
            s["fn"].log_prob(s["value"]).sum() for s in gt.values() if s["type"] == "sample"
        )
        log_p = sum(
            s["fn"].log_prob(s["value"]).sum() for s in mt.values() if s["type"] == "sample"
        )
        total = total + jnp.exp(log_q) * (log_p - log_q)
    return total


TABLE = jnp.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])


def chain_model():
    c1 = numpyro.sample("c1", dist.Bernoulli(0.3))
    c2 = numpyro.sample("c2", dist.Categorical(TABLE[c1.astype(int)]))
    numpyro.sample("x", dist.Normal(c1 + c2, 1.0), obs=0.7)


def chain_guide():
    a = numpyro.param("a", 0.3)
    b = numpyro.param("b", jnp.array([[0.1, -0.2, 0.4], [0.5, 0.0, -0.3]]))
    c1 = numpyro.sample("c1", dist.Bernoulli(logits=a))
    numpyro.sample("c2", dist.Categorical(logits=b[c1.astype(int)]))


def test_nested_enum_equals_brute_force_summation():
    g = estimators(chain_guide, {"c1": ENUM(), "c2": ENUM()})
    params = ppl.init_params(jax.random.PRNGKey(0), chain_model, g)
    value, grads = jax.jit(ppl.value_and_grad(ppl.objectives.elbo, chain_model, g))(
        params, jax.random.PRNGKey(3)
    )

    def exact(p):
        return brute_force_elbo(chain_model, chain_guide, p, {"c1": [0.0, 1.0], "c2": [0, 1, 2]})

    ref_value, ref_grads = jax.value_and_grad(exact)(params)
    np.testing.assert_allclose(value, ref_value, atol=1e-6)
    for k in params:
        np.testing.assert_allclose(grads[k], ref_grads[k], atol=1e-6)


@pytest.mark.parametrize(
    "assignment",
    [
        {"c1": "reinforce", "c2": "reinforce"},
        {"c1": ENUM(), "c2": MVD()},
        {"c1": MVD(), "c2": ENUM()},
        {"c1": REINFORCE(baseline="mean"), "c2": "mvd"},
    ],
)
def test_mixed_assignments_are_unbiased(assignment):
    g = estimators(chain_guide, assignment)
    params = ppl.init_params(jax.random.PRNGKey(0), chain_model, g)
    if "c1_baseline" in params:
        params["c1_baseline"] = jnp.array(-1.9)
    _, grads = batched(ppl.objectives.elbo, chain_model, g, 40000, seed=2)(params)

    def exact(p):
        return brute_force_elbo(chain_model, chain_guide, p, {"c1": [0.0, 1.0], "c2": [0, 1, 2]})

    ref = jax.grad(exact)({k: params[k] for k in ("a", "b")})
    for k in ("a", "b"):
        m, se = mean_and_se(grads[k])
        assert np.all(np.abs(m - ref[k]) < 4 * se + 1e-4), (k, m, ref[k], se)


def test_enum_over_event_dims_is_unbiased_and_exact_for_one_element():
    # a Bernoulli vector latent (to_event): one replay per element and value
    def model():
        c = numpyro.sample("c", dist.Bernoulli(jnp.array([0.2, 0.6, 0.5])).to_event(1))
        numpyro.sample("x", dist.Normal(c.sum() - 1.0, 0.7), obs=0.3)

    def guide():
        phi = numpyro.param("phi", jnp.array([0.4, -0.3, 0.1]))
        numpyro.sample("c", dist.Bernoulli(logits=phi).to_event(1), infer={"estimator": "enum"})

    params = ppl.init_params(jax.random.PRNGKey(0), model, guide)
    _, grads = batched(ppl.objectives.elbo, model, guide, 20000, seed=4)(params)

    def exact(p):
        from numpyro.handlers import condition, substitute, trace

        total = 0.0
        for bits in itertools.product([0.0, 1.0], repeat=3):
            c = jnp.array(bits)
            gt = trace(substitute(condition(guide, {"c": c}), p)).get_trace()
            mt = trace(condition(model, {"c": c})).get_trace()
            lq = gt["c"]["fn"].log_prob(c)
            lp = mt["c"]["fn"].log_prob(c) + mt["x"]["fn"].log_prob(0.3)
            total = total + jnp.exp(lq) * (lp - lq)
        return total

    ref = jax.grad(exact)(params)["phi"]
    m, se = mean_and_se(grads["phi"])
    assert np.all(np.abs(m - ref) < 4 * se + 1e-5), (m, ref, se)
    assert np.all(se < 0.02)  # per-element enumeration has far lower variance than REINFORCE


def test_loo_baseline_reduces_variance_and_stays_unbiased():
    def elbo5(model, guide, *args, **kwargs):
        with ppl.particles(5):
            return ppl.objectives.elbo(model, guide, *args, **kwargs)

    params = ppl.init_params(jax.random.PRNGKey(0), gauss_model, gauss_guide, X)
    stats = {}
    for b in [None, "loo"]:
        g = estimators(gauss_guide, {"z": REINFORCE(baseline=b)})
        _, grads = batched(elbo5, gauss_model, g, 20000, seed=5)(params, X)
        m, se = mean_and_se(grads["m"])
        assert abs(m - 0.6) < 4 * se, (b, m, se)
        stats[b] = float(np.std(grads["m"]))
    assert stats["loo"] < 0.6 * stats[None], stats


def test_mean_baseline_reduces_variance_once_learned():
    # spec §4.3 Bernoulli at phi=0: per-sample sd 1.293 without, 0.500 with b = E[F]
    def model(x):
        c = numpyro.sample("c", dist.Bernoulli(0.3))
        numpyro.sample("x", dist.Normal(2 * c - 1, 1), obs=x)

    def guide(x):
        numpyro.sample("c", dist.Bernoulli(logits=numpyro.param("phi", 0.0)))

    x = jnp.array(0.4)
    g = estimators(guide, {"c": REINFORCE(baseline="mean")})
    params = ppl.init_params(jax.random.PRNGKey(0), model, g, x)
    assert set(params) == {"phi", "c_baseline"}
    sds = {}
    for b in [0.0, -1.5861152]:
        params["c_baseline"] = jnp.array(b)
        _, grads = batched(ppl.objectives.elbo, model, g, 100000, seed=6)(params, x)
        m, se = mean_and_se(grads["phi"])
        assert abs(m - (-0.0118245)) < 4 * se
        sds[b] = float(np.std(grads["phi"]))
    assert sds[0.0] == pytest.approx(1.293, abs=0.02)
    assert sds[-1.5861152] == pytest.approx(0.500, abs=0.02)


def test_subsample_mask_scale_are_unbiased_for_full_data_elbo():
    data = jnp.linspace(-1.0, 2.0, 10)
    mask = jnp.arange(10) < 8

    def model(x, batch):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", 10, subsample_size=batch) as i:
            with numpyro.handlers.mask(mask=mask[i]), numpyro.handlers.scale(scale=2.0):
                numpyro.sample("x", dist.Normal(z, 1.0), obs=x[i])

    def guide(x, batch):
        numpyro.sample("z", dist.Normal(numpyro.param("m", 0.3), 0.5))

    params = ppl.init_params(jax.random.PRNGKey(0), model, guide, data, 10)
    full_v, full_g = jax.jit(
        ppl.value_and_grad(ppl.objectives.elbo, model, guide), static_argnums=3
    )(params, jax.random.PRNGKey(0), data, 10)
    f = jax.jit(
        jax.vmap(ppl.value_and_grad(ppl.objectives.elbo, model, guide), (None, 0, None, None)),
        static_argnums=3,
    )
    vs, gs = f(params, jax.random.split(jax.random.PRNGKey(8), 20000), data, 3)
    fv, fg = f(params, jax.random.split(jax.random.PRNGKey(8), 20000), data, 10)
    # same z draws (keys) — the subsampled estimate is unbiased for the full-data one
    m, se = mean_and_se(vs - fv)
    assert abs(m) < 4 * se
    m, se = mean_and_se(gs["m"] - fg["m"])
    assert abs(m) < 4 * se
    # exact full-data ELBO gradient wrt m: 2 * sum_{i<8}(x_i - m) - m (mask and scale 2)
    m, se = mean_and_se(fg["m"])
    assert abs(m - (2 * float((data[:8] - 0.3).sum()) - 0.3)) < 4 * se
    assert np.isfinite(full_v) and np.isfinite(full_g["m"])


def test_one_compile_no_retrace_on_new_data():
    traces = []

    def model(x):
        traces.append(1)
        gauss_model(x)

    params = ppl.init_params(jax.random.PRNGKey(0), model, gauss_guide, X)
    traces.clear()
    f = jax.jit(ppl.value_and_grad(ppl.objectives.iwelbo(3), model, gauss_guide))
    f(params, jax.random.PRNGKey(0), X)
    n = len(traces)
    for i in range(3):
        f(params, jax.random.PRNGKey(i), X + i)
    assert len(traces) == n


def test_user_objective_chi_upper_bound_and_tempered_elbo():
    def tempered(model, guide, *args, beta=0.5, **kwargs):
        tr = ppl.sample_trace(guide, *args, **kwargs)
        log_p = ppl.log_density(model, tr, *args, **kwargs)
        return beta * log_p - ppl.log_density(guide, tr, *args, **kwargs)

    def chi2_upper(model, guide, *args, **kwargs):  # CUBO_2 = 1/2 log E_q[w^2]
        with ppl.particles(200):
            tr = ppl.sample_trace(guide, *args, **kwargs)
            log_w = ppl.log_density(model, tr, *args, **kwargs) - ppl.log_density(
                guide, tr, *args, **kwargs
            )
        return 0.5 * ppl.logmeanexp(2.0 * log_w)

    params = ppl.init_params(jax.random.PRNGKey(0), gauss_model, gauss_guide, X)
    v, _ = batched(chi2_upper, gauss_model, gauss_guide, 2000, seed=9)(params, X)
    assert float(np.mean(v)) > -4.0949628  # an upper bound on log p(x)
    v, g = jax.jit(ppl.value_and_grad(tempered, gauss_model, gauss_guide))(
        params, jax.random.PRNGKey(0), X
    )
    assert np.isfinite(v) and set(g) == {"m", "s"}


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------


def test_unknown_site_in_estimator_map_is_named():
    params = ppl.init_params(jax.random.PRNGKey(0), gauss_model, gauss_guide, X)
    g = estimators(gauss_guide, {"zz": MVD()})
    with pytest.raises(ValueError, match="zz"):
        ppl.value_and_grad(ppl.objectives.elbo, gauss_model, g)(params, jax.random.PRNGKey(0), X)


def test_param_missing_from_params_is_named():
    with pytest.raises(ValueError, match="param 'm' is not in params"):
        ppl.value_and_grad(ppl.objectives.elbo, gauss_model, gauss_guide)(
            {"s": jnp.array(0.0)}, jax.random.PRNGKey(0), X
        )


def test_guide_missing_latent_site_is_named():
    def model(x):
        numpyro.sample("w", dist.Normal(0, 1))
        gauss_model(x)

    params = {"m": jnp.array(0.0), "s": jnp.array(0.0)}
    with pytest.raises(ValueError, match="'w'"):
        ppl.value_and_grad(ppl.objectives.elbo, model, gauss_guide)(
            params, jax.random.PRNGKey(0), X
        )


def test_reparam_on_discrete_site_and_enum_on_continuous_and_mvd_without_rule():
    def model():
        numpyro.sample("c", dist.Bernoulli(0.3))
        numpyro.sample("g", dist.Beta(2.0, 1.0))  # no measure-valued rule for Beta

    def guide():
        numpyro.sample("c", dist.Bernoulli(0.4))
        numpyro.sample("g", dist.Beta(2.0, 1.0))

    for mapping, culprit in [
        ({"c": REPARAM()}, "'c'"),
        ({"g": ENUM()}, "'g'"),
        ({"g": MVD()}, "'g'"),
    ]:
        g = estimators(guide, mapping)
        with pytest.raises(ValueError, match=culprit):
            ppl.value_and_grad(ppl.objectives.elbo, model, g)({}, jax.random.PRNGKey(0))


def test_non_finite_data_and_bad_counts():
    bad = X.at[1].set(jnp.nan)
    params = ppl.init_params(jax.random.PRNGKey(0), gauss_model, gauss_guide, X)
    with pytest.raises(ValueError, match="argument 0"):
        ppl.value_and_grad(ppl.objectives.elbo, gauss_model, gauss_guide)(
            params, jax.random.PRNGKey(0), bad
        )
    for factory in [ppl.objectives.iwelbo, ppl.objectives.wake_theta, ppl.objectives.wake_phi]:
        with pytest.raises(ValueError, match=">= 1"):
            factory(0)
    with pytest.raises(ValueError, match=">= 1"):
        ppl.objectives.renyi(0.5, 0)
    with pytest.raises(ValueError, match="baseline"):
        REINFORCE(baseline="median")


def test_constructs_outside_an_objective_are_an_error():
    with pytest.raises(RuntimeError, match="inside an objective"):
        ppl.sample_trace(gauss_guide, X)


def test_unmodified_numpyro_program_with_nested_plates_module_factor_deterministic():
    import equinox as eqx
    from numpyro.contrib.module import eqx_module

    x = jax.random.normal(jax.random.PRNGKey(0), (20, 3))
    y = x.sum(-1) > 0

    def model(x, y):
        net = eqx_module("net", eqx.nn.MLP(3, 1, 8, 1, key=jax.random.PRNGKey(1)))
        scale = numpyro.sample("scale", dist.HalfNormal(1.0))
        with numpyro.plate("groups", 2, dim=-2):
            off = numpyro.sample("off", dist.Normal(0, scale))
            with numpyro.plate("data", 20, subsample_size=5, dim=-1) as i:
                logits = numpyro.deterministic("logits", jax.vmap(net)(x[i])[..., 0] + off)
                numpyro.sample("y", dist.Bernoulli(logits=logits), obs=y[i])
        numpyro.factor("penalty", -0.1 * scale**2)

    def guide(x, y):
        a = numpyro.param("a", 1.0, constraint=dist.constraints.positive)
        numpyro.sample("scale", dist.LogNormal(0.0, a))
        with numpyro.plate("groups", 2, dim=-2):
            numpyro.sample("off", dist.Normal(numpyro.param("loc", jnp.zeros((2, 1))), 0.5))

    params = ppl.init_params(jax.random.PRNGKey(0), model, guide, x, y)
    assert set(params) == {"a", "loc", "net$params"}
    for objective in [ppl.objectives.elbo, ppl.objectives.iwelbo(3), ppl.objectives.renyi(0.5, 3)]:
        f = jax.jit(ppl.value_and_grad(objective, model, guide))
        value, grads = f(params, jax.random.PRNGKey(1), x, y)
        assert np.isfinite(value)
        assert jax.tree.structure(grads) == jax.tree.structure(params)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_callable_baseline_is_a_learned_control_variate():
    # b(x) = w: a user baseline with its own param; init_params creates it, the surrogate
    # trains it towards E[F] and the gradient of the guide stays unbiased.
    def baseline(x):
        return numpyro.param("b_w", 0.0)

    g = estimators(gauss_guide, {"z": REINFORCE(baseline=baseline)})
    params = ppl.init_params(jax.random.PRNGKey(0), gauss_model, g, X)
    assert "b_w" in params
    params["b_w"] = jnp.array(-4.18)  # ≈ E[F]: the ELBO at this guide
    values, grads = batched(ppl.objectives.elbo, gauss_model, g, 20000, seed=12)(params, X)
    m, se = mean_and_se(grads["m"])
    assert abs(m - 0.6) < 4 * se
    # d/db of −½ E(F − b)² is E[F] − b
    m, se = mean_and_se(grads["b_w"])
    assert abs(m - (float(np.mean(values)) + 4.18)) < 4 * se + 1e-3
    _, plain = batched(
        ppl.objectives.elbo,
        gauss_model,
        estimators(gauss_guide, {"z": "reinforce"}),
        20000,
        seed=12,
    )(params, X)
    assert np.std(grads["m"]) < 0.5 * np.std(plain["m"])
