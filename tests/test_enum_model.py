"""Model-side enumeration (ppl/enum.py) against NumPyro's TraceEnum_ELBO and brute force.

References: ``numpyro.infer.TraceEnum_ELBO`` for ELBO values and gradients (mixture, HMM
written as a ``markov`` loop, subsampled plate); for marginal likelihoods a NumPy forward
algorithm (T = 20) and a sum over all 2^T state paths (T = 10), both in float64.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.contrib.control_flow import scan
from numpyro.contrib.funsor import config_enumerate, markov
from numpyro.handlers import seed, substitute, trace
from numpyro.infer import TraceEnum_ELBO

from ppl.enum import enum_log_density, enumerated_sites

# ---------------------------------------------------------------------------
# Gaussian mixture: locs sampled by the guide, assignments enumerated
# ---------------------------------------------------------------------------

K, N = 3, 30


def _mixture_data():
    rs = np.random.RandomState(0)
    return jnp.asarray(np.concatenate([rs.randn(10) - 3, rs.randn(10), rs.randn(10) + 3]))


@config_enumerate
def mixture(x):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=dist.constraints.simplex)
    with numpyro.plate("components", K):
        locs = numpyro.sample("locs", dist.Normal(0.0, 5.0))
    with numpyro.plate("data", N):
        a = numpyro.sample("assignment", dist.Categorical(w))
        numpyro.sample("obs", dist.Normal(locs[a], 1.0), obs=x)


def mixture_guide(x):
    m = numpyro.param("m", jnp.zeros(K))
    s = numpyro.param("s", jnp.ones(K), constraint=dist.constraints.positive)
    with numpyro.plate("components", K):
        numpyro.sample("locs", dist.Normal(m, s))


def _mixture_params():
    return {
        "w": jnp.array([0.2, 0.3, 0.5]),
        "m": jnp.array([-2.0, 0.5, 2.0]),
        "s": jnp.array([0.5, 0.7, 0.9]),
    }


def _elbo_fn(model, guide, data, rng_key, **kw):
    """The ELBO with the guide's values drawn as TraceEnum_ELBO draws them (same key
    split), reparameterised from ``params``, and the model scored by enum_log_density."""
    model_key, guide_key = jax.random.split(rng_key)

    def elbo(params):
        with trace() as gt, substitute(data=params), seed(rng_seed=guide_key):
            guide(data)
        values = {n: s["value"] for n, s in gt.items() if s["type"] == "sample"}
        log_q = sum(
            (s["fn"].log_prob(s["value"]) * (s["scale"] or 1.0)).sum()
            for s in gt.values()
            if s["type"] == "sample"
        )
        subsamples = {n: s["value"] for n, s in gt.items() if s["type"] == "plate"}
        log_p = enum_log_density(
            model,
            values,
            (data,),
            params=params,
            rng_key=model_key,
            plate_subsamples=subsamples,
            **kw,
        )
        return log_p - log_q

    return elbo


def _trace_enum_elbo(model, guide, data, rng_key):
    return lambda params: -TraceEnum_ELBO().loss(rng_key, params, model, guide, data)


def _jit_eld(model, values, args=(), *, params, rng_key, plate_subsamples=None, **static):
    """enum_log_density compiled once (eager JAX compiles every small op separately)."""

    def f(values, args, params, rng_key, subsamples):
        return enum_log_density(
            model,
            values,
            args,
            params=params,
            rng_key=rng_key,
            plate_subsamples=subsamples,
            **static,
        )

    return jax.jit(f)(values, args, params, rng_key, plate_subsamples)


def _value_and_grad(f):
    return jax.jit(jax.value_and_grad(f))


def _max_abs_diff(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(la, lb, strict=True))


def test_enumerated_sites_lists_marked_latent_sites():
    x = _mixture_data()
    with trace() as tr, substitute(data=_mixture_params()), seed(rng_seed=0):
        mixture(x)
    assert enumerated_sites(tr) == ("assignment",)

    def explicit():
        numpyro.sample("a", dist.Bernoulli(0.3), infer={"enumerate": "parallel"})
        numpyro.sample("b", dist.Bernoulli(0.3))
        numpyro.sample("c", dist.Bernoulli(0.3), obs=1.0, infer={"enumerate": "parallel"})

    tr = trace(seed(explicit, 0)).get_trace()
    assert enumerated_sites(tr) == ("a",)


@pytest.mark.parametrize("seed_", [0, 1])
def test_mixture_elbo_value_and_grad_equal_trace_enum(seed_):
    with jax.enable_x64(True):
        x = _mixture_data()
        params = _mixture_params()
        key = jax.random.key(seed_)
        ours = _elbo_fn(mixture, mixture_guide, x, key)
        ref = _trace_enum_elbo(mixture, mixture_guide, x, key)
        v, g = _value_and_grad(ours)(params)
        v_ref, g_ref = _value_and_grad(ref)(params)
        assert v.dtype == jnp.float64
        assert abs(float(v - v_ref)) < 1e-5, (v, v_ref)
        assert _max_abs_diff(g, g_ref) < 1e-5, (g, g_ref)
        # every gradient component is informative (not identically zero)
        assert all(float(jnp.min(jnp.abs(leaf))) > 1e-3 for leaf in jax.tree.leaves(g))


def _mixture_hand(locs, w, x):
    """log p(x, locs) = log p(locs) + Σ_i log Σ_k w_k N(x_i | locs_k, 1), by hand."""
    return dist.Normal(0.0, 5.0).log_prob(locs).sum() + jax.nn.logsumexp(
        jnp.log(w) + dist.Normal(locs, 1.0).log_prob(x[:, None]), axis=1
    ).sum(0)


def test_mixture_matches_hand_marginal_eager_and_jit():
    x = _mixture_data()
    params = _mixture_params()
    locs = jnp.array([-3.0, 0.2, 2.5])

    def f(locs, params):
        return enum_log_density(
            mixture, {"locs": locs}, (x,), params=params, rng_key=jax.random.key(0)
        )

    hand = _mixture_hand(locs, params["w"], x)
    assert abs(float(f(locs, params) - hand)) < 1e-4  # eager
    assert abs(float(jax.jit(f)(locs, params) - hand)) < 1e-4
    g = jax.jit(jax.grad(f, argnums=(0, 1)))(locs, params)
    g_hand = jax.grad(_mixture_hand, argnums=(0, 1))(locs, params["w"], x)
    np.testing.assert_allclose(g[0], g_hand[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g[1]["w"], g_hand[1], rtol=1e-5, atol=1e-5)
    # an explicit max_plate_nesting gives the same value (enumeration dims further left)
    deeper = enum_log_density(
        mixture,
        {"locs": locs},
        (x,),
        params=params,
        rng_key=jax.random.key(0),
        max_plate_nesting=3,
    )
    assert abs(float(deeper - hand)) < 1e-4


def test_vmap_over_particles_and_iwelbo():
    """Under jax.vmap (how particles run) each particle gets its own marginal; the IWELBO
    over the continuous latents, discrete ones summed out, is a logmeanexp of them."""
    x = _mixture_data()
    params = _mixture_params()
    locs = jnp.stack([jnp.array([-3.0, 0.2, 2.5]) + 0.3 * k for k in range(4)])

    def f(lc):
        return enum_log_density(
            mixture, {"locs": lc}, (x,), params=params, rng_key=jax.random.key(0)
        )

    batched = jax.jit(jax.vmap(f))(locs)
    hand = jnp.stack([_mixture_hand(lc, params["w"], x) for lc in locs])
    np.testing.assert_allclose(batched, hand, rtol=1e-5)
    assert len(set(np.asarray(batched).tolist())) == 4
    log_q = dist.Normal(params["m"], params["s"]).log_prob(locs).sum(-1)
    iwelbo = jax.nn.logsumexp(batched - log_q) - jnp.log(4.0)
    iwelbo_hand = jax.nn.logsumexp(hand - log_q) - jnp.log(4.0)
    assert abs(float(iwelbo - iwelbo_hand)) < 1e-4
    grads = jax.jit(jax.vmap(jax.grad(f)))(locs)
    grads_hand = jax.vmap(jax.grad(_mixture_hand), in_axes=(0, None, None))(locs, params["w"], x)
    np.testing.assert_allclose(grads, grads_hand, rtol=1e-5, atol=1e-5)


def test_guide_sampled_discrete_site_is_scored_not_enumerated():
    """A site marked for enumeration that ``values`` does give is scored at that value."""
    x = _mixture_data()
    params = _mixture_params()
    locs = jnp.array([-3.0, 0.2, 2.5])
    a = jnp.asarray(np.random.RandomState(1).randint(0, K, N))
    got = _jit_eld(
        mixture, {"locs": locs, "assignment": a}, (x,), params=params, rng_key=jax.random.key(0)
    )
    want, _ = numpyro.infer.util.log_density(
        mixture, (x,), {}, {**params, "locs": locs, "assignment": a}
    )
    assert abs(float(got - want)) < 1e-4


# ---------------------------------------------------------------------------
# Two-state HMM: python markov loop and scan
# ---------------------------------------------------------------------------

INIT = np.array([0.6, 0.4])
TRANS = np.array([[0.9, 0.1], [0.3, 0.7]])
LOC = np.array([-1.0, 1.5])


def _hmm_data(T):
    return jnp.asarray(np.random.RandomState(T).randn(T))


def hmm_markov(y):
    trans = numpyro.param("trans", jnp.asarray(TRANS), constraint=dist.constraints.simplex)
    loc = numpyro.sample("loc", dist.Normal(jnp.zeros(2), 2.0).to_event(1))
    z = None
    for t in markov(range(len(y))):
        p = jnp.asarray(INIT) if t == 0 else trans[z]
        z = numpyro.sample(f"z_{t}", dist.Categorical(p), infer={"enumerate": "parallel"})
        numpyro.sample(f"y_{t}", dist.Normal(loc[z], 1.0), obs=y[t])


def hmm_scan(y):
    trans = numpyro.param("trans", jnp.asarray(TRANS), constraint=dist.constraints.simplex)
    loc = numpyro.sample("loc", dist.Normal(jnp.zeros(2), 2.0).to_event(1))
    z0 = numpyro.sample("z0", dist.Categorical(jnp.asarray(INIT)), infer={"enumerate": "parallel"})
    numpyro.sample("y0", dist.Normal(loc[z0], 1.0), obs=y[0])

    def step(z, y_t):
        z = numpyro.sample("z", dist.Categorical(trans[z]))
        numpyro.sample("y", dist.Normal(loc[z], 1.0), obs=y_t)
        return z, None

    scan(step, z0, y[1:])


def hmm_guide(y):
    m = numpyro.param("m", jnp.array([-1.0, 1.0]))
    s = numpyro.param("s", jnp.array([0.3, 0.4]), constraint=dist.constraints.positive)
    numpyro.sample("loc", dist.Normal(m, s).to_event(1))


def _log_prior(loc):
    return float(dist.Normal(np.zeros(2), 2.0).to_event(1).log_prob(np.asarray(loc)))


def _forward(y, loc):
    """NumPy forward algorithm: log Σ_z p(y, z | loc) (float64)."""
    y = np.asarray(y, dtype=np.float64)

    def emit(t):
        return -0.5 * (y[t] - loc) ** 2 - 0.5 * np.log(2 * np.pi)

    alpha = np.log(INIT) + emit(0)
    for t in range(1, len(y)):
        alpha = np.logaddexp.reduce(alpha[:, None] + np.log(TRANS), axis=0) + emit(t)
    return np.logaddexp.reduce(alpha)


def _brute_force(y, loc):
    """log Σ over all 2^T state paths of p(y, z | loc), one path at a time (float64)."""
    y = np.asarray(y, dtype=np.float64)
    T = len(y)
    terms = []
    for path in itertools.product((0, 1), repeat=T):
        z = np.asarray(path)
        lp = np.log(INIT[z[0]]) + np.log(TRANS[z[:-1], z[1:]]).sum()
        lp += (-0.5 * (y - loc[z]) ** 2 - 0.5 * np.log(2 * np.pi)).sum()
        terms.append(lp)
    return np.logaddexp.reduce(np.asarray(terms))


@pytest.mark.parametrize("model", [hmm_markov, hmm_scan], ids=["markov", "scan"])
def test_hmm_marginal_equals_forward_algorithm_T20(model):
    with jax.enable_x64(True):
        y = _hmm_data(20)
        loc = jnp.asarray(LOC)
        got = _jit_eld(
            model,
            {"loc": loc},
            (y,),
            params={"trans": jnp.asarray(TRANS)},
            rng_key=jax.random.key(0),
        )
        assert got.dtype == jnp.float64
        want = _forward(y, LOC) + _log_prior(LOC)
        assert abs(float(got) - want) < 1e-6, (float(got), want)


@pytest.mark.parametrize("model", [hmm_markov, hmm_scan], ids=["markov", "scan"])
def test_hmm_marginal_equals_brute_force_T10(model):
    with jax.enable_x64(True):
        y = _hmm_data(10)
        loc = jnp.asarray(LOC)
        got = jax.jit(
            lambda loc: enum_log_density(
                model,
                {"loc": loc},
                (y,),
                params={"trans": jnp.asarray(TRANS)},
                rng_key=jax.random.key(0),
            )
        )(loc)
        want = _brute_force(y, LOC) + _log_prior(LOC)
        assert abs(float(got) - want) < 1e-6, (float(got), want)
        assert abs(_forward(y, LOC) + _log_prior(LOC) - want) < 1e-9  # the two references agree


def test_hmm_markov_elbo_value_and_grad_equal_trace_enum():
    with jax.enable_x64(True):
        y = _hmm_data(20)
        params = {
            "trans": jnp.asarray(TRANS),
            "m": jnp.array([-1.0, 1.0]),
            "s": jnp.array([0.3, 0.4]),
        }
        key = jax.random.key(3)
        v, g = _value_and_grad(_elbo_fn(hmm_markov, hmm_guide, y, key))(params)
        v_ref, g_ref = _value_and_grad(_trace_enum_elbo(hmm_markov, hmm_guide, y, key))(params)
        assert abs(float(v - v_ref)) < 1e-5, (v, v_ref)
        assert _max_abs_diff(g, g_ref) < 1e-5, (g, g_ref)


def test_hmm_scan_elbo_equals_markov_elbo():
    """The scan HMM is the markov HMM (same value and gradient); NumPyro's TraceEnum_ELBO
    does not eliminate scan's time dimension, so the markov version is the reference."""
    with jax.enable_x64(True):
        y = _hmm_data(20)
        params = {
            "trans": jnp.asarray(TRANS),
            "m": jnp.array([-1.0, 1.0]),
            "s": jnp.array([0.3, 0.4]),
        }
        key = jax.random.key(3)
        v, g = _value_and_grad(_elbo_fn(hmm_scan, hmm_guide, y, key))(params)
        v_ref, g_ref = _value_and_grad(_elbo_fn(hmm_markov, hmm_guide, y, key))(params)
        assert abs(float(v - v_ref)) < 1e-8
        assert _max_abs_diff(g, g_ref) < 1e-8


S, L = 3, 8


def hmm_markov_plated(y):
    """S independent sequences (plate at dim -1), each with its own offset latent."""
    trans = jnp.asarray(TRANS)
    with numpyro.plate("seqs", S, dim=-1):
        offset = numpyro.sample("offset", dist.Normal(0.0, 1.0))
        z = None
        for t in markov(range(L)):
            p = jnp.asarray(INIT) if t == 0 else trans[z]
            z = numpyro.sample(f"z_{t}", dist.Categorical(p), infer={"enumerate": "parallel"})
            numpyro.sample(f"y_{t}", dist.Normal(jnp.asarray(LOC)[z] + offset, 1.0), obs=y[t])


def hmm_scan_plated(y):
    trans = jnp.asarray(TRANS)
    with numpyro.plate("seqs", S, dim=-1):
        offset = numpyro.sample("offset", dist.Normal(0.0, 1.0))
        z0 = numpyro.sample(
            "z0", dist.Categorical(jnp.asarray(INIT)), infer={"enumerate": "parallel"}
        )
        numpyro.sample("y0", dist.Normal(jnp.asarray(LOC)[z0] + offset, 1.0), obs=y[0])

    def step(z, y_t):
        with numpyro.plate("seqs", S, dim=-1):
            z = numpyro.sample("z", dist.Categorical(trans[z]))
            numpyro.sample("y", dist.Normal(jnp.asarray(LOC)[z] + offset, 1.0), obs=y_t)
        return z, None

    scan(step, z0, y[1:])


@pytest.mark.parametrize("model", [hmm_markov_plated, hmm_scan_plated], ids=["markov", "scan"])
def test_plated_hmm_keep_plates_per_sequence_forward_algorithm(model):
    """keep_plates on a plate of sequences: one forward-algorithm marginal per sequence."""
    with jax.enable_x64(True):
        y = jnp.asarray(np.random.RandomState(4).randn(L, S))
        offset = jnp.array([0.3, -0.5, 1.1])
        kw = dict(params={}, rng_key=jax.random.key(0))
        per = _jit_eld(
            model, {"offset": offset}, (y,), keep_plates={"seqs": -1}, batch_rank=1, **kw
        )
        scalar = _jit_eld(model, {"offset": offset}, (y,), **kw)
        want = np.array(
            [
                _forward(np.asarray(y[:, s]) - float(offset[s]), LOC)
                + float(dist.Normal(0.0, 1.0).log_prob(offset[s]))
                for s in range(S)
            ]
        )
        assert per.shape == (S,)
        np.testing.assert_allclose(per, want, rtol=0, atol=1e-6)
        assert abs(float(scalar) - want.sum()) < 1e-6


def test_unplated_batch_dims_are_summed():
    @config_enumerate
    def model():
        u = numpyro.sample("u", dist.Normal(jnp.zeros(3), 1.0))  # batch (3,), no plate
        a = numpyro.sample("a", dist.Bernoulli(0.3))
        numpyro.sample("obs", dist.Normal(u.sum() + a, 1.0), obs=0.7)

    u = jnp.array([0.1, -0.4, 0.2])
    got = _jit_eld(model, {"u": u}, params={}, rng_key=jax.random.key(0))
    want = dist.Normal(0.0, 1.0).log_prob(u).sum() + jax.nn.logsumexp(
        jnp.log(jnp.array([0.7, 0.3])) + dist.Normal(u.sum() + jnp.arange(2.0), 1.0).log_prob(0.7)
    )
    assert abs(float(got - want)) < 1e-5


# ---------------------------------------------------------------------------
# Subsampled plate, keep_plates
# ---------------------------------------------------------------------------

M, B = 40, 10


@config_enumerate
def local_model(x):
    locs = numpyro.param("locs", jnp.array([-2.0, 2.0]))
    w = numpyro.param("w", jnp.array([0.4, 0.6]), constraint=dist.constraints.simplex)
    with numpyro.plate("data", M, subsample_size=B) as idx:
        c = numpyro.sample("c", dist.Categorical(w))
        z = numpyro.sample("z", dist.Normal(locs[c], 1.0))
        numpyro.sample("obs", dist.Normal(z, 0.5), obs=x[idx])


def local_guide(x):
    m = numpyro.param("m", x * 0.8)
    s = numpyro.param("s", 0.4 * jnp.ones(M), constraint=dist.constraints.positive)
    with numpyro.plate("data", M, subsample_size=B) as idx:
        numpyro.sample("z", dist.Normal(m[idx], s[idx]))


def _local_setup():
    x = jnp.asarray(np.random.RandomState(0).randn(M) * 2)
    params = {
        "locs": jnp.array([-2.0, 2.0]),
        "w": jnp.array([0.4, 0.6]),
        "m": x * 0.8,
        "s": 0.4 * jnp.ones(M),
    }
    return x, params


def test_subsampled_plate_elbo_equals_trace_enum():
    """Subsample scale N/B applied to each data point's summed-out log density. NumPyro's
    enum plate leaves no plate site in the guide trace, so TraceEnum_ELBO's model would
    draw its own subsample: both programs get the same indices by substitution."""
    with jax.enable_x64(True):
        x, params = _local_setup()
        key = jax.random.key(5)
        _, guide_key = jax.random.split(key)
        with trace() as gt, substitute(data=params), seed(rng_seed=guide_key):
            local_guide(x)
        idx = gt["data"]["value"]
        assert idx.shape == (B,)
        fixed = {"data": idx}
        ref = _trace_enum_elbo(
            substitute(local_model, data=fixed), substitute(local_guide, data=fixed), x, key
        )
        ours = _elbo_fn(
            substitute(local_model, data=fixed), substitute(local_guide, data=fixed), x, key
        )
        v, g = _value_and_grad(ours)(params)
        v_ref, g_ref = _value_and_grad(ref)(params)
        assert abs(float(v - v_ref)) < 1e-5, (v, v_ref)
        assert _max_abs_diff(g, g_ref) < 1e-5
        # and by hand: (M/B) Σ_{i ∈ batch} log Σ_c w_c N(z_i | locs_c, 1) N(x_i | z_i, 0.5)
        z = gt["z"]["value"]
        per_point = jax.nn.logsumexp(
            jnp.log(params["w"])
            + dist.Normal(params["locs"], 1.0).log_prob(z[:, None])
            + dist.Normal(z, 0.5).log_prob(x[idx])[:, None],
            axis=1,
        )
        log_p = _jit_eld(
            local_model, {"z": z}, (x,), params=params, rng_key=key, plate_subsamples=fixed
        )
        assert abs(float(log_p - M / B * per_point.sum())) < 1e-9


@pytest.mark.parametrize("batch_rank", [1, 2])
def test_keep_plates_per_element_values_sum_to_scalar(batch_rank):
    x, params = _local_setup()
    key = jax.random.key(7)
    with trace() as gt, substitute(data=params), seed(rng_seed=key):
        local_guide(x)
    values, fixed = {"z": gt["z"]["value"]}, {"data": gt["data"]["value"]}
    kw = dict(params=params, rng_key=key, plate_subsamples=fixed)
    scalar = _jit_eld(local_model, values, (x,), **kw)
    per = _jit_eld(local_model, values, (x,), keep_plates={"data": -1}, batch_rank=batch_rank, **kw)
    assert per.shape == (1,) * (batch_rank - 1) + (B,)
    assert scalar.shape == ()
    np.testing.assert_allclose(per.sum() * M / B, scalar, rtol=1e-6)
    # per element: no subsample scale, element i's own marginal
    z = values["z"]
    want = jax.nn.logsumexp(
        jnp.log(params["w"])
        + dist.Normal(params["locs"], 1.0).log_prob(z[:, None])
        + dist.Normal(z, 0.5).log_prob(x[fixed["data"]])[:, None],
        axis=1,
    )
    np.testing.assert_allclose(per.reshape(B), want, rtol=1e-5, atol=1e-5)


def test_keep_plates_nested_plates_at_dim_minus_two():
    """Outer kept plate at dim -2 (subsampled), inner plate summed with its own scale."""

    @config_enumerate
    def model(x):
        with numpyro.plate("groups", 6, subsample_size=3, dim=-2) as g:
            mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
            with numpyro.plate("items", 4, dim=-1):
                c = numpyro.sample("c", dist.Bernoulli(0.3))
                numpyro.sample("obs", dist.Normal(mu + 2.0 * c, 1.0), obs=x[g])

    x = jnp.asarray(np.random.RandomState(2).randn(6, 4))
    g = jnp.array([4, 1, 3])
    mu = jnp.array([[0.5], [-0.2], [1.0]])
    kw = dict(params={}, rng_key=jax.random.key(0), plate_subsamples={"groups": g})
    scalar = _jit_eld(model, {"mu": mu}, (x,), **kw)
    per = _jit_eld(model, {"mu": mu}, (x,), keep_plates={"groups": -2}, batch_rank=2, **kw)
    assert per.shape == (3, 1)
    np.testing.assert_allclose(per.sum() * 2.0, scalar, rtol=1e-6)
    lp_c = jnp.stack([jnp.log(0.7), jnp.log(0.3)])
    items = jax.nn.logsumexp(
        lp_c + dist.Normal(mu[..., None] + 2.0 * jnp.arange(2), 1.0).log_prob(x[g][..., None]),
        axis=-1,
    ).sum(-1)
    want = dist.Normal(0.0, 1.0).log_prob(mu[:, 0]) + items
    np.testing.assert_allclose(per[:, 0], want, rtol=1e-5)


def test_global_enumerated_site_with_subsampled_local_data():
    """A global enumerated site over a subsampled plate: the plate's product is raised to
    the scale where it is reduced, log Σ_e p(e) (Π_{i ∈ batch} p(x_i | e))^{N/B}."""

    @config_enumerate
    def model(x):
        e = numpyro.sample("e", dist.Categorical(jnp.array([0.3, 0.7])))
        with numpyro.plate("data", 8, subsample_size=4) as idx:
            numpyro.sample("obs", dist.Normal(jnp.array([-1.0, 1.0])[e], 1.0), obs=x[idx])

    x = jnp.asarray(np.random.RandomState(3).randn(8))
    idx = jnp.array([0, 5, 2, 7])
    got = _jit_eld(
        model, {}, (x,), params={}, rng_key=jax.random.key(0), plate_subsamples={"data": idx}
    )
    lik = dist.Normal(jnp.array([-1.0, 1.0]), 1.0).log_prob(x[idx][:, None]).sum(0)
    want = jax.nn.logsumexp(jnp.log(jnp.array([0.3, 0.7])) + 2.0 * lik)
    assert abs(float(got - want)) < 1e-5


def test_handler_scale_multiplies_the_contracted_marginal():
    x = _mixture_data()
    params = _mixture_params()
    locs = jnp.array([-3.0, 0.2, 2.5])
    kw = dict(params=params, rng_key=jax.random.key(0))
    base = _jit_eld(mixture, {"locs": locs}, (x,), **kw)
    scaled = _jit_eld(numpyro.handlers.scale(mixture, 0.25), {"locs": locs}, (x,), **kw)
    np.testing.assert_allclose(scaled, 0.25 * base, rtol=1e-6)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_enumerated_site_without_finite_support_is_named():
    def model():
        numpyro.sample("u", dist.Normal(0.0, 1.0), infer={"enumerate": "parallel"})

    with pytest.raises(ValueError, match="'u'.*no finite support"):
        enum_log_density(model, {}, params={}, rng_key=jax.random.key(0))


def test_missing_non_enumerated_site_is_named():
    x = _mixture_data()
    with pytest.raises(ValueError, match=r"'locs'.*guide must sample.*mark it for enumeration"):
        enum_log_density(mixture, {}, (x,), params=_mixture_params(), rng_key=jax.random.key(0))

    def model():  # a discrete site that is not marked for enumeration
        numpyro.sample("b", dist.Bernoulli(0.5))

    with pytest.raises(ValueError, match=r"'b'.*infer=\{'enumerate': 'parallel'\}"):
        enum_log_density(model, {}, params={}, rng_key=jax.random.key(0))


def test_missing_site_inside_scan_is_named():
    def model(y):
        def step(c, y_t):
            u = numpyro.sample("u", dist.Normal(0.0, 1.0))
            numpyro.sample("y", dist.Normal(u, 1.0), obs=y_t)
            return c, None

        scan(step, 0, y)

    with pytest.raises(ValueError, match="'u'.*guide must sample"):
        enum_log_density(model, {}, (jnp.zeros(5),), params={}, rng_key=jax.random.key(0))


def test_keep_plate_must_enclose_every_site():
    x = _mixture_data()
    with pytest.raises(ValueError, match="'locs' is not inside plate 'data'"):
        enum_log_density(
            mixture,
            {"locs": jnp.zeros(K)},
            (x,),
            params=_mixture_params(),
            rng_key=jax.random.key(0),
            keep_plates={"data": -1},
            batch_rank=1,
        )


def test_enumerated_terms_must_share_one_handler_scale():
    @config_enumerate
    def model(x):
        with numpyro.plate("data", 4):
            a = numpyro.sample("a", dist.Bernoulli(0.3))
            with numpyro.handlers.scale(scale=0.5):
                numpyro.sample("obs", dist.Normal(a * 1.0, 1.0), obs=x)

    with pytest.raises(ValueError, match="share one numpyro.handlers.scale"):
        enum_log_density(model, {}, (jnp.zeros(4),), params={}, rng_key=jax.random.key(0))


def test_value_for_a_discrete_site_enumerated_by_scan_is_an_error():
    with pytest.raises(
        ValueError, match="'z' is enumerated inside numpyro.contrib.control_flow.scan"
    ):
        enum_log_density(
            hmm_scan,
            {"loc": jnp.asarray(LOC), "z": jnp.zeros(9, dtype=jnp.int32)},
            (_hmm_data(10),),
            params={"trans": jnp.asarray(TRANS)},
            rng_key=jax.random.key(0),
        )
