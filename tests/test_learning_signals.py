"""Per-element learning signals (``keep_plates="spread"`` and the dependency check).

A global site outside a data plate of local discrete sites: each ``z_i`` must see only the
costs that depend on it (as NumPyro's ``TraceGraph_ELBO``), ENUM on ``z`` must sum the plate
in one batched pass (as ``TraceEnum_ELBO``), and a term outside the plate that depends on
``z`` must bring the whole plate back into ``z``'s signal.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO

import ppl
from ppl.grad import _setup


def make(n, enumerate_z=False, total=None, subsample=None):
    """``mu ~ N(0,1)``; ``z_i ~ Bern(1/2)``, ``y_i ~ N(mu + z_i, 1)``; optionally an observed
    ``total ~ N(Σ z, 0.5)`` outside the plate (which makes ``z`` non-local)."""

    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", n, subsample_size=subsample) as i:
            z = numpyro.sample("z", dist.Bernoulli(0.5))
            numpyro.sample("y", dist.Normal(mu + z, 1.0), obs=y[i])
        if total is not None:
            numpyro.sample("total", dist.Normal(z.sum(), 0.5), obs=total)

    def guide(y):
        numpyro.sample("mu", dist.Normal(numpyro.param("m", 0.3), 1.0))
        p0 = jnp.linspace(0.2, 0.8, n)
        with numpyro.plate("data", n, subsample_size=subsample) as i:
            p = numpyro.param("p", p0, constraint=dist.constraints.unit_interval)
            infer = {"enumerate": "parallel"} if enumerate_z else {}
            numpyro.sample("z", dist.Bernoulli(p[i] if subsample else p), infer=infer)

    y = jax.random.normal(jax.random.PRNGKey(0), (n,)) + 1.0
    return model, guide, y


def numpyro_value_and_grad(elbo, model, guide, y):
    """NumPyro's ELBO, maximised, over ppl's unconstrained params."""

    def f(params, key):
        constrained = ppl.constrain_params(params, model, guide, y)
        return -elbo.loss(key, constrained, model, guide, y)

    return jax.jit(jax.value_and_grad(f))


@pytest.mark.parametrize("subsample, rtol", [(None, 1e-6), (10, 1e-5)])
def test_elbo_keeps_the_data_plate_and_spreads_the_global_terms(subsample, rtol):
    # The value is per data point; summed it equals NumPyro's Trace_ELBO under the same key
    # (with a subsampled plate the spread shares carry the subsample scale).
    model, guide, y = make(6 if subsample is None else 40, subsample=subsample)
    params = ppl.init_params(jax.random.PRNGKey(1), model, guide, y)
    if subsample is None:
        setup = _setup(model, guide, params, jax.random.PRNGKey(1), (y,), {})
        assert setup.nonlocal_plates == {}
    ours = jax.jit(ppl.value_and_grad(ppl.objectives.elbo, model, guide))
    theirs = numpyro_value_and_grad(Trace_ELBO(), model, guide, y)
    for k in range(3):
        key = jax.random.PRNGKey(k)
        value, _ = ours(params, key, y)
        ref, _ = theirs(params, key)
        np.testing.assert_allclose(value, ref, rtol=rtol)


def test_per_element_signal_variance_is_within_2x_trace_graph():
    # Before per-element signals each z_i saw the whole objective: sd ~ N times larger.
    model, guide, y = make(1000)
    params = ppl.init_params(jax.random.PRNGKey(1), model, guide, y)
    keys = jax.random.split(jax.random.PRNGKey(2), 100)
    ours = jax.jit(ppl.value_and_grad(ppl.objectives.elbo, model, guide))
    theirs = numpyro_value_and_grad(TraceGraph_ELBO(), model, guide, y)
    g_ours = jax.vmap(lambda k: ours(params, k, y)[1]["p"])(keys)
    g_theirs = jax.vmap(lambda k: theirs(params, k)[1]["p"])(keys)
    sd_ours = float(np.std(np.asarray(g_ours), axis=0).mean())
    sd_theirs = float(np.std(np.asarray(g_theirs), axis=0).mean())
    assert sd_ours < 2.0 * sd_theirs, (sd_ours, sd_theirs)
    # both unbiased: the mean gradients agree (4 standard errors, averaged over i)
    diff = np.asarray(g_ours - g_theirs).mean(axis=0)
    se = np.sqrt((sd_ours**2 + sd_theirs**2) / keys.shape[0])
    assert abs(float(diff.mean())) < 4 * se / np.sqrt(1000)


@pytest.mark.parametrize("n", [5, 200])
def test_enum_of_local_sites_equals_trace_enum(n):
    # one batched pass over the plate; value and gradient equal TraceEnum_ELBO's (same key)
    model, guide, y = make(n, enumerate_z=True)
    params = ppl.init_params(jax.random.PRNGKey(1), model, guide, y)
    key = jax.random.PRNGKey(3)
    value, grads = jax.jit(ppl.value_and_grad(ppl.objectives.elbo, model, guide))(params, key, y)
    ref, ref_grads = numpyro_value_and_grad(TraceEnum_ELBO(), model, guide, y)(params, key)
    np.testing.assert_allclose(value, ref, rtol=1e-5)
    for name in ("m", "p"):
        np.testing.assert_allclose(grads[name], ref_grads[name], rtol=1e-4, atol=1e-4)


def test_enum_replays_do_not_grow_with_the_plate():
    # O(N): the compiled program replays the site once per value (2), not per element
    model, guide, y = make(64, enumerate_z=True)
    params = ppl.init_params(jax.random.PRNGKey(1), model, guide, y)
    f = ppl.value_and_grad(ppl.objectives.elbo, model, guide)
    text = str(jax.make_jaxpr(f)(params, jax.random.PRNGKey(0), y)).replace(" ", "")
    assert "[2,64]" in text  # the two values of z, each over the whole plate
    assert re.search(r"\[(64,64|128)\b", text) is None


def test_a_term_outside_the_plate_that_depends_on_z_makes_it_non_local():
    model, guide, y = make(4, total=3.0)
    params = ppl.init_params(jax.random.PRNGKey(1), model, guide, y)
    found = _setup(model, guide, params, jax.random.PRNGKey(1), (y,), {}).nonlocal_plates
    assert found == {"z": frozenset({"data"})}
    # REINFORCE stays unbiased: its mean gradient matches the exact (ENUM) one within 4 s.e.
    _, guide_enum, _ = make(4, enumerate_z=True, total=3.0)
    exact = ppl.value_and_grad(ppl.objectives.elbo, model, guide_enum)
    f = jax.jit(ppl.value_and_grad(ppl.objectives.elbo, model, guide))
    keys = jax.random.split(jax.random.PRNGKey(4), 4000)
    g = np.asarray(jax.vmap(lambda k: f(params, k, y)[1]["p"])(keys))
    g_exact = np.asarray(jax.vmap(lambda k: exact(params, k, y)[1]["p"])(keys[:500]))
    se = np.sqrt(g.var(0) / g.shape[0] + g_exact.var(0) / g_exact.shape[0])
    assert np.all(np.abs(g.mean(0) - g_exact.mean(0)) < 4 * se), (g.mean(0), g_exact.mean(0), se)


def test_spread_log_density_sums_to_the_scalar_one():
    model, guide, y = make(6)

    def objective(model, guide, y):
        tr = ppl.sample_trace(guide, y)
        spread = ppl.log_density(model, tr, y, keep_plates="spread")
        assert spread.shape == (6,)
        total = ppl.log_density(model, tr, y)
        return spread.sum() - total  # zero up to rounding

    params = ppl.init_params(jax.random.PRNGKey(1), model, guide, y)
    value, _ = ppl.value_and_grad(objective, model, guide)(params, jax.random.PRNGKey(0), y)
    assert abs(float(value)) < 1e-3
