"""ppl.transforms.kronecker and ppl.inference.sbl: structure, transforms, drivers, ArviZ.

The spec's numbered checks (T1-T8) live in ``test_spec_krosbl.py`` (written independently
from the spec); this file tests the pieces around them against exact computations.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from numpyro.distributions import constraints

from ppl.inference import sbl, to_inference_data
from ppl.transforms.kronecker import (
    KronOperator,
    KronSBLMarginal,
    kron_vector,
    kronecker_prior,
    mode_product,
)


def _problem(seed, ns, ms, k, snr_db=20.0, cplx=False):
    rng = np.random.default_rng(seed)
    fs = [rng.normal(size=(m, n)) for m, n in zip(ms, ns, strict=True)]
    if cplx:
        fs = [(a + 1j * rng.normal(size=a.shape)) / np.sqrt(2) for a in fs]
    xs = []
    for n in ns:
        v = np.zeros(n, complex if cplx else float)
        v[rng.choice(n, k, replace=False)] = rng.normal(size=k)
        xs.append(v)
    x = functools.reduce(np.kron, xs)
    y0 = functools.reduce(np.kron, fs) @ x
    s2 = np.mean(np.abs(y0) ** 2) * 10 ** (-snr_db / 10)
    noise = rng.normal(size=y0.shape)
    if cplx:
        noise = (noise + 1j * rng.normal(size=y0.shape)) / np.sqrt(2)
    return fs, x, y0 + np.sqrt(s2) * noise, s2


# ---------------------------------------------------------------- KronOperator


def test_mode_product_matches_einsum():
    rng = np.random.default_rng(0)
    t, a = rng.normal(size=(2, 3, 4)), rng.normal(size=(5, 3))
    np.testing.assert_allclose(
        mode_product(t, a, 1), np.einsum("ijk,mj->imk", t, a), rtol=1e-5, atol=1e-5
    )


def test_kron_operator_is_a_pytree_under_jit_and_vmap():
    rng = np.random.default_rng(1)
    fs = [rng.normal(size=(3, 4)), rng.normal(size=(2, 5))]
    op = KronOperator(fs)
    xs = rng.normal(size=(7, 20))
    dense = np.kron(*fs)
    out = jax.jit(lambda o, v: jax.vmap(o.matvec)(v))(op, xs)
    np.testing.assert_allclose(out, xs @ dense.T, rtol=1e-4, atol=1e-4)
    leaves, tree = jax.tree_util.tree_flatten(op)
    assert len(leaves) == 2
    assert jax.tree_util.tree_unflatten(tree, leaves).shape == (6, 20)


def test_kron_operator_validation_and_dense_limit():
    with pytest.raises(ValueError, match=r"factors\[1\] must be a 2-D"):
        KronOperator([np.ones((2, 2)), np.ones(3)])
    with pytest.raises(ValueError, match="at least one"):
        KronOperator([])
    big = KronOperator([np.ones((100, 100))] * 2)  # 10^4 x 10^4 = 1e8 entries
    with pytest.raises(ValueError, match="force=True"):
        big.to_dense()
    with pytest.raises(ValueError, match=r"matvec expects an array \[\.\.\., 10000\]"):
        big.matvec(np.ones(9))


def test_kron_vector_is_c_order():
    g = [np.array([1.0, 2.0]), np.array([1.0, 3.0, 5.0])]
    np.testing.assert_allclose(kron_vector(g), np.kron(*g))


# ---------------------------------------------------------------- E-step extras


def test_snapshots_share_gamma_and_costs_add():
    fs, _, y, s2 = _problem(2, (5, 6), (4, 4), 2)
    rng = np.random.default_rng(3)
    ys = np.stack([y, rng.normal(size=y.shape)])
    g = [rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 6)]
    mu, var, cost = sbl.estep(fs, g, s2, ys)
    single = [sbl.estep(fs, g, s2, row) for row in ys]
    np.testing.assert_allclose(mu, np.stack([s[0] for s in single]), atol=1e-12)
    np.testing.assert_allclose(var, single[0][1], atol=1e-12)
    np.testing.assert_allclose(cost, single[0][2] + single[1][2], rtol=1e-12)


def test_concrete_calls_run_in_float64_and_return_numpy():
    fs, _, y, s2 = _problem(4, (4, 5), (3, 3), 1)
    mu, var, cost = sbl.estep(fs, [np.ones(4), np.ones(5)], s2, y)
    assert isinstance(mu, np.ndarray) and mu.dtype == np.float64
    assert not jax.config.jax_enable_x64  # enabled locally only


def test_pruned_entries_have_zero_mean_and_variance():
    fs, _, y, s2 = _problem(5, (4, 5), (3, 4), 2)
    g = [np.array([1.0, 0.0, 2.0, 0.5]), np.ones(5)]
    for form in ("measurement", "parameter"):
        mu, var, _ = sbl.estep(fs, g, s2, y, form=form)
        assert np.all(mu.reshape(4, 5)[1] == 0) and np.all(var.reshape(4, 5)[1] == 0)


# ---------------------------------------------------------------- marginal distribution


def test_marginal_sample_covariance_matches_c():
    fs = [np.array([[1.0, 0.5], [0.0, 1.0]]), np.array([[1.0, -1.0]])]
    g = [np.array([1.0, 2.0]), np.array([0.5, 1.5])]
    d = KronSBLMarginal(KronOperator(fs), g, 0.3)
    draws = np.asarray(d.sample(jax.random.PRNGKey(0), (200_000,)))
    phi = np.kron(*fs)
    cov = 0.3 * np.eye(2) + phi @ np.diag(np.kron(*g)) @ phi.T
    # 200k draws: the s.e. of a covariance entry is below 0.01 here; 0.05 is 5 s.e.
    np.testing.assert_allclose(np.cov(draws.T), cov, atol=0.05)


def test_marginal_log_prob_is_differentiable_in_gammas():
    fs, _, y, s2 = _problem(6, (4, 5), (3, 4), 2)

    def lp(logg1):
        d = KronSBLMarginal(KronOperator(fs), [jnp.exp(logg1), jnp.ones(5)], s2)
        return d.log_prob(y)

    with jax.enable_x64(True):
        x0 = jnp.zeros(4)
        grad = jax.grad(lp)(x0)
        lp = jax.jit(lp)
        eps = 1e-6
        fd = [(lp(x0.at[i].add(eps)) - lp(x0.at[i].add(-eps))) / (2 * eps) for i in range(4)]
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- kronecker_prior


def _flat_sbl(y, factors, noise_var, hyper=False):
    op = KronOperator(factors)
    n = op.shape[1]
    if hyper:
        gamma = numpyro.sample("gamma", dist.InverseGamma(2.0, 1.0).expand([n]).to_event(1))
    else:
        gamma = numpyro.param("gamma", jnp.full(n, 2.0), constraint=constraints.positive)
    x = numpyro.sample("x", dist.Normal(0.0, jnp.sqrt(gamma)).to_event(1))
    numpyro.sample("y", dist.Normal(op.matvec(x), jnp.sqrt(noise_var)).to_event(1), obs=y)


def test_kronecker_prior_param_sites_give_the_kronecker_model():
    fs, _, y, s2 = _problem(7, (3, 4), (2, 3), 1)
    kmodel = kronecker_prior(_flat_sbl, site="gamma", shape=(3, 4))
    tr = handlers.trace(handlers.seed(kmodel, 0)).get_trace(y, fs, s2)
    assert tr["gamma_1"]["type"] == "param" and tr["gamma_1"]["value"].shape == (3,)
    assert tr["gamma_2"]["type"] == "param" and tr["gamma_2"]["value"].shape == (4,)
    assert tr["gamma"]["type"] == "deterministic"
    np.testing.assert_allclose(tr["gamma"]["value"], np.full(12, 2.0), rtol=1e-6)
    assert tr["gamma_1"]["kwargs"]["constraint"] is constraints.positive
    # substituted factors reach the likelihood as their Kronecker product
    g1, g2 = jnp.array([1.0, 2.0, 3.0]), jnp.array([0.5, 1.0, 1.5, 2.0])
    sub = handlers.substitute(kmodel, {"gamma_1": g1, "gamma_2": g2})
    tr2 = handlers.trace(handlers.seed(sub, 1)).get_trace(y, fs, s2)
    np.testing.assert_allclose(tr2["x"]["fn"].base_dist.scale ** 2, np.kron(g1, g2), rtol=1e-6)


def test_kronecker_prior_sample_sites_and_errors():
    fs, _, y, s2 = _problem(8, (3, 4), (2, 3), 1)
    kmodel = kronecker_prior(functools.partial(_flat_sbl, hyper=True), shape=(3, 4))
    tr = handlers.trace(handlers.seed(kmodel, 0)).get_trace(y, fs, s2)
    assert tr["gamma_2"]["type"] == "sample"
    assert tr["gamma_2"]["fn"].event_shape == (4,)
    assert isinstance(tr["gamma_2"]["fn"].base_dist.base_dist, dist.InverseGamma)
    np.testing.assert_allclose(
        tr["gamma"]["value"], np.kron(tr["gamma_1"]["value"], tr["gamma_2"]["value"])
    )
    bad = kronecker_prior(_flat_sbl, site="gamma", shape=(5, 4))
    with pytest.raises(ValueError, match="needs 20"):
        handlers.trace(handlers.seed(bad, 0)).get_trace(y, fs, s2)
    with pytest.raises(ValueError, match="n_i >= 1"):
        kronecker_prior(_flat_sbl, shape=(0, 3))


# ---------------------------------------------------------------- EM driver


def test_step_is_jittable_and_matches_run():
    fs, _, y, s2 = _problem(9, (6, 6), (4, 5), 2)
    with jax.enable_x64(True):
        op = KronOperator([jnp.asarray(a) for a in fs])
        yj = jnp.asarray(y)
        state = sbl.init(op, yj, noise_var=s2)
        jstep = jax.jit(functools.partial(sbl.step, mstep="am", prune_ratio=0.0))
        costs = []
        for _ in range(5):
            state = jstep(state, op, yj)
            costs.append(float(state.cost))
    res = sbl.fit(fs, y, noise_var=s2, max_iter=5, tol=1e-300, prune_ratio=0.0)
    np.testing.assert_allclose(res.history, costs, rtol=1e-12)


def test_block_coupling_helps_contiguous_blocks():
    """A 2-mode problem whose support is a contiguous block in each mode: PC coupling
    (block_sizes=3) recovers it better than plain AM on the median of 8 seeds."""
    rng = np.random.default_rng(10)
    errs = {"am": [], "pc": []}
    for _ in range(8):
        fs = [rng.normal(size=(8, 20)), rng.normal(size=(8, 20))]
        xs = []
        for _n in range(2):
            v = np.zeros(20)
            s = rng.integers(0, 18)
            v[s : s + 3] = rng.normal(size=3) + np.sign(rng.normal(size=3))
            xs.append(v)
        x = np.kron(*xs)
        y0 = np.kron(*fs) @ x
        s2 = np.mean(y0**2) / 10  # 10 dB
        y = y0 + np.sqrt(s2) * rng.normal(size=y0.shape)
        for name, kw in (("am", {}), ("pc", {"block_sizes": (3, 3)})):
            xh = sbl.fit(fs, y, noise_var=s2, **kw).mean
            errs[name].append(np.sum((xh - x) ** 2) / np.sum(x**2))
    assert np.median(errs["pc"]) < np.median(errs["am"])


def test_learned_noise_is_close_and_floored():
    fs, x, y, s2 = _problem(11, (8, 8), (6, 7), 2, snr_db=15.0)
    res = sbl.fit(fs, y, noise_var=None, max_iter=300)
    assert 0.4 < res.noise_var / s2 < 2.5  # 42 measurements: a loose but failing bound
    res0 = sbl.fit(fs, np.kron(*fs) @ x, noise_var=None, max_iter=50)
    floor = 1e-12 * np.sum((np.kron(*fs) @ x) ** 2) / 42
    assert res0.noise_var >= floor * (1 - 1e-9)


def test_fit_validation_errors():
    fs, _, y, s2 = _problem(12, (4, 5), (3, 4), 1)
    with pytest.raises(ValueError, match="Π m_i = 12"):
        sbl.fit(fs, y[:-1], noise_var=s2)
    with pytest.raises(ValueError, match="noise_var must be a finite number > 0"):
        sbl.fit(fs, y, noise_var=0.0)
    with pytest.raises(ValueError, match="NaN"):
        sbl.fit(fs, np.where(np.arange(12) == 3, np.nan, y), noise_var=s2)
    with pytest.raises(ValueError, match="m_step must be one of"):
        sbl.fit(fs, y, m_step="em")
    with pytest.raises(ValueError, match="needs m_step='am'"):
        sbl.fit(fs, y, m_step="svd", block_sizes=(3, 1))
    with pytest.raises(TypeError, match="is_complex"):
        sbl.fit(fs, y + 1j, is_complex=False)
    with pytest.raises(ValueError, match=r"factors\[0\] contains NaN"):
        sbl.fit([np.full((3, 4), np.nan), fs[1]], y)


def test_result_to_inference_data_round_trips_netcdf(tmp_path):
    fs, _, y, s2 = _problem(13, (5, 6), (4, 4), 2, cplx=True)
    res = sbl.fit(fs, y, noise_var=s2, max_iter=20)
    idata = to_inference_data(res, num_samples=4, key=jax.random.PRNGKey(1))
    assert idata.posterior["x_re"].shape == (1, 1, 30)
    np.testing.assert_allclose(
        idata.posterior["x_re"].values[0, 0] + 1j * idata.posterior["x_im"].values[0, 0],
        res.mean,
    )
    assert idata.posterior["gamma_2"].shape == (1, 1, 6)
    np.testing.assert_allclose(idata.sample_stats["cost"].values, res.history)
    assert idata.posterior_predictive["x_re"].shape == (1, 4, 30)
    np.testing.assert_allclose(idata.observed_data["y_im"].values, y.imag)
    path = tmp_path / "sbl.nc"
    idata.to_netcdf(str(path))
    import arviz as az

    back = az.from_netcdf(str(path))
    np.testing.assert_allclose(back.posterior["x_im"].values, idata.posterior["x_im"].values)


def test_kronecker_prior_param_init_traces_under_jit():
    def model():
        numpyro.param("gamma", 2.0 * jnp.ones(6), constraint=constraints.positive)

    kmodel = kronecker_prior(model, site="gamma", shape=(2, 3))
    get = jax.jit(lambda: handlers.trace(handlers.seed(kmodel, 0)).get_trace()["gamma"]["value"])
    np.testing.assert_allclose(get(), np.full(6, 2.0))
