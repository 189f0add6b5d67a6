"""FunBaT: CEP + Kalman on data from the model (spec funbat.md §4 T6, T7, T8, T12) and bad
input. Fixed seeds; tolerances are the spec's, relative to the oracle (noise-free truth)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers

from ppl.inference import funbat
from ppl.models import funbat as fm
from ppl.transforms.state_space import GaussianProcess, Matern, state_space


def _rmse(a, b):
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


@pytest.fixture(scope="module")
def g20_fit():
    """G(2, 0), ν=½, ℓ=0.2, ρ=0.5, §1.4 initialisation, 150 sweeps (tol 0: no early stop)."""
    d = fm.load_default("synthetic2")
    model = functools.partial(fm.model, ranks=2, kernels=Matern(0.5, 0.2, 1.0))
    cfg = funbat.FunBaTConfig(num_iters=150, tol=0.0)
    res = funbat.fit(jax.random.PRNGKey(0), model, d["train_indexes"], d["train_y"], cfg)
    return d, res


def test_cep_reaches_fixed_point(g20_fit):
    """T6: train RMSE moves < 1e-3 after sweep 20; max|Δ train prediction| < 2e-4 by 150."""
    d, res = g20_fit
    rmse = res.history["train_rmse"]
    assert res.n_iter == 150
    assert rmse[19:].max() - rmse[19:].min() < 1e-3
    delta = res.history["max_delta"] * np.std(d["train_y"])  # back to the data's units
    assert delta[-1] < 2e-4
    assert rmse[-1] < 0.1  # the noise sd is 0.1: not the all-zero fixed point (0.369)


def test_recovery_two_modes(g20_fit):
    """T7: test RMSE <= 1.05 × oracle (seen and unseen indexes); noise sd estimate near 0.1;
    95% predictive intervals cover 93-99% of the 600 test values."""
    d, res = g20_fit
    mean, var = funbat.predict(res, d["test_indexes"])
    oracle = _rmse(d["test_f"], d["test_y"])
    assert _rmse(mean, d["test_y"]) <= 1.05 * oracle
    unseen = d["test_unseen"]
    assert _rmse(mean[unseen], d["test_y"][unseen]) <= 1.10 * _rmse(
        d["test_f"][unseen], d["test_y"][unseen]
    )
    assert abs(res.history["noise_sd"][-1] - 0.1) < 0.01
    assert np.all(np.asarray(var) > res.history["noise_sd"][-1] ** 2 * 0.99)
    cover = np.mean(np.abs(np.asarray(mean) - d["test_y"]) <= 1.96 * np.sqrt(np.asarray(var)))
    assert 0.93 <= cover <= 0.99


def test_predict_at_train_indexes_matches_state(g20_fit):
    """Bridging at grid indexes returns the smoothed marginals: predict = the sweep's train
    predictions (1e-10)."""
    d, res = g20_fit
    mean, _ = funbat.predict(res, d["train_indexes"][:600])  # (600 rows: compiled once)
    np.testing.assert_allclose(mean, res.state.pred[:600], atol=1e-10)


def _permuted(res, order):
    """The same posterior with the modes (and the core's axes) listed in ``order``."""
    s, K = res.state, len(order)
    ranks = tuple(res.config.ranks[k] for k in order)
    M = s.mW.reshape(res.config.ranks)
    SW = s.SW.reshape(res.config.ranks * 2)
    SW = jnp.transpose(SW, list(order) + [K + k for k in order]).reshape(M.size, M.size)
    pick = lambda xs: tuple(xs[k] for k in order)
    state = s._replace(
        mu=pick(s.mu), V=pick(s.V), ms=pick(s.ms), Ps=pick(s.Ps), cross=pick(s.cross),
        mW=jnp.transpose(M, order).reshape(-1), SW=SW,
    )  # fmt: skip
    data = res.data._replace(
        grids=pick(res.data.grids), A=pick(res.data.A), Q=pick(res.data.Q), H=pick(res.data.H)
    )
    cfg = dataclasses.replace(res.config, ranks=ranks, kernels=pick(res.config.kernels))
    return dataclasses.replace(res, state=state, data=data, config=cfg, grids=pick(res.grids))


def test_mode_permutation_and_cp(g20_fit):
    """T12: permuting the modes and W's axes leaves predictions unchanged (1e-10), so one core
    axis order is used throughout (no D1); CP = Tucker with a superdiagonal W."""
    d, res = g20_fit
    x = d["test_indexes"]  # the 600 of test_recovery_two_modes: compiled once
    m1, v1 = funbat.predict(res, x)
    m2, v2 = funbat.predict(_permuted(res, (1, 0)), x[:, ::-1])
    np.testing.assert_allclose(m1, m2, atol=1e-10)
    np.testing.assert_allclose(v1, v2, atol=1e-10)
    # CP: W superdiagonal with ones, no W site
    model = functools.partial(fm.model, ranks=2, kernels=Matern(0.5, 0.2, 1.0))
    x = x[:40]
    tr = handlers.trace(handlers.substitute(handlers.seed(model, 0), {"W": jnp.eye(2)}))
    tr_cp = handlers.trace(handlers.seed(functools.partial(model, cp=True), 0))
    a = tr.get_trace(x, y=None)
    b = tr_cp.get_trace(x, y=None)
    assert "W" not in b
    np.testing.assert_allclose(a["y"]["fn"].mean, b["y"]["fn"].mean, atol=1e-10)


@pytest.mark.slow
def test_model_state_space_density_equals_dense():
    """The model's u_k sites: the state_space transform keeps the joint log density (1e-8)."""
    from numpyro.infer.util import log_density

    d = fm.generate_synthetic(2, 1)
    x, y = d["train_indexes"][:30], d["train_y"][:30]
    model = functools.partial(fm.model, ranks=2, kernels=Matern(1.5, 0.3, 1.0))
    with jax.enable_x64(True):
        params = handlers.trace(handlers.seed(model, 3)).get_trace(x, y=y)
        params = {k: v["value"] for k, v in params.items() if v["type"] == "sample"}
        dense, _ = log_density(model, (x,), {"y": y}, params)
        ss, _ = log_density(state_space(model), (x,), {"y": y}, params)
    assert abs(float(dense) - float(ss)) < 1e-8 * max(1.0, abs(float(dense)))


@pytest.mark.slow  # ~15 s; the notebook test and `ppl fit funbat` run it too
def test_to_inference_data(g20_fit):
    d, res = g20_fit
    idata = funbat.to_inference_data(res, jax.random.PRNGKey(1), num_samples=10)
    post = idata.posterior
    assert post["u_0"].shape == (1, 10, 2, 40)
    assert "rank_0" in post["u_0"].dims and "mode_0_index" in post["u_0"].dims
    assert post["W"].shape == (1, 10, 2, 2)
    assert "train_rmse" in idata.sample_stats
    assert idata.posterior_predictive["y"].shape == (1, 10, 2000)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"y": np.zeros(5)}, "length mismatch"),
        ({"y": np.array([0.0, np.nan, 1.0, 2.0])}, "y must be finite"),
        ({"indexes": np.array([[0.0, np.nan]] * 4)}, "indexes must be finite"),
        ({"ranks": (2, 0)}, "ranks"),
        ({"kernels": "nu"}, "nu"),
    ],
)
def test_bad_input(kwargs, match):
    x = kwargs.get("indexes", np.array([[0.0, 0.1], [0.2, 0.3], [0.4, 0.5], [0.6, 0.7]]))
    y = kwargs.get("y", np.arange(4.0))
    with pytest.raises(ValueError, match=match):
        kernels = Matern(1.0) if kwargs.get("kernels") == "nu" else Matern(0.5)
        model = functools.partial(fm.model, ranks=kwargs.get("ranks", 2), kernels=kernels)
        funbat.fit(jax.random.PRNGKey(0), model, x, y, funbat.FunBaTConfig(num_iters=2))


def test_bad_config():
    with pytest.raises(ValueError, match="damping"):
        funbat.FunBaTConfig(damping=(1.0, 0.0, 0.0)).validate()
    with pytest.raises(ValueError, match="num_iters"):
        funbat.FunBaTConfig(num_iters=0).validate()
    with pytest.raises(ValueError, match="smoother"):
        funbat.FunBaTConfig(smoother="fast").validate()
    with pytest.raises(ValueError, match="ranks"):
        funbat.FunBaTConfig(ranks=(0, 1)).validate()
    with pytest.raises(TypeError, match="kernel"):
        GaussianProcess("matern", np.zeros(3))


@pytest.mark.slow
def test_recovery_three_modes():
    """T8: G(3, 0), ν=3/2, ℓ=0.3, best of 3 initialisations: test RMSE <= 1.10 × oracle,
    95% coverage in [0.93, 0.98]."""
    d = fm.load_default("synthetic3")
    model = functools.partial(fm.model, ranks=2, kernels=Matern(1.5, 0.3, 1.0))
    cfg = funbat.FunBaTConfig(num_iters=100, num_restarts=3)
    res = funbat.fit(jax.random.PRNGKey(0), model, d["train_indexes"], d["train_y"], cfg)
    mean, var = funbat.predict(res, d["test_indexes"])
    assert _rmse(mean, d["test_y"]) <= 1.10 * _rmse(d["test_f"], d["test_y"])
    cover = np.mean(np.abs(np.asarray(mean) - d["test_y"]) <= 1.96 * np.sqrt(np.asarray(var)))
    assert 0.93 <= cover <= 0.98


@pytest.mark.slow
def test_parallel_smoother_gives_same_fit():
    """smoother="parallel" runs the same CEP (predictions equal to 1e-8 after 10 sweeps)."""
    d = fm.load_default("synthetic2")
    model = functools.partial(fm.model, ranks=2, kernels=Matern(0.5, 0.2, 1.0))
    out = []
    for sm in ("sequential", "parallel"):
        cfg = funbat.FunBaTConfig(num_iters=10, tol=0.0, smoother=sm)
        res = funbat.fit(jax.random.PRNGKey(0), model, d["train_indexes"], d["train_y"], cfg)
        out.append(np.asarray(res.state.pred))
    np.testing.assert_allclose(out[0], out[1], atol=1e-8)


def test_cli_bad_option_exits_2(tmp_path, capsys):
    from ppl import cli

    assert cli.main(["fit", "funbat", "--rank", "0", "--out", str(tmp_path / "r")]) == 2
    assert "--rank" in capsys.readouterr().err
    assert cli.main(["fit", "funbat", "--nu", "1.0", "--out", str(tmp_path / "r")]) == 2
    assert "nu" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_cli_fit_funbat(tmp_path, capsys, monkeypatch):
    """`ppl fit funbat` in fast mode writes the posterior, the factor plot and the summary."""
    import arviz as az

    from ppl import cli

    monkeypatch.setenv("PPL_FAST", "1")
    out = tmp_path / "run"
    assert cli.main(["fit", "funbat", "--out", str(out)]) == 0, capsys.readouterr().err
    assert {p.name for p in out.iterdir()} >= {"posterior.nc", "factors.png", "summary.txt"}
    assert "test RMSE" in (out / "summary.txt").read_text()
    assert "u_0" in az.from_netcdf(out / "posterior.nc").posterior


@pytest.mark.slow
def test_restarts_pick_best_train_rmse():
    """T9: CEP has local optima; with num_restarts the kept run has the smallest final train
    RMSE of all restarts."""
    d = fm.load_default("synthetic3")
    model = functools.partial(fm.model, ranks=2, kernels=Matern(0.5, 0.2, 1.0))
    cfg = funbat.FunBaTConfig(num_iters=60, num_restarts=3)
    res = funbat.fit(jax.random.PRNGKey(0), model, d["train_indexes"], d["train_y"], cfg)
    assert len(res.restart_rmse) == 3
    assert res.history["train_rmse"][-1] == pytest.approx(min(res.restart_rmse))


@pytest.mark.slow
def test_reference_compat_variants():
    """T10: D3+D4 (reference_compat) with the §1.4 initialisation and D4-only-like reference
    initialisation (Σ_W = I, E[τ] = 1) stay within 1.15 × oracle on G(2, 0) (60 sweeps)."""
    d = fm.load_default("synthetic2")
    model = functools.partial(fm.model, ranks=2, kernels=Matern(0.5, 0.2, 1.0))
    oracle = _rmse(d["test_f"], d["test_y"])
    for kw in ({}, {"init_core_var": 1.0, "init_tau": 1.0}):
        cfg = funbat.FunBaTConfig(num_iters=60, tol=0.0, reference_compat=True, **kw)
        res = funbat.fit(jax.random.PRNGKey(0), model, d["train_indexes"], d["train_y"], cfg)
        mean, _ = funbat.predict(res, d["test_indexes"])
        assert _rmse(mean, d["test_y"]) <= 1.15 * oracle, kw


@pytest.mark.slow
def test_nuts_agrees_with_cep():
    """T13: NUTS (2 chains × 300) on the model, G(2, 0) cut to 200 entries: the posterior
    predictive mean is within 2 posterior sd of the CEP mean for >= 90% of test entries."""
    from numpyro.infer import MCMC, NUTS

    d = fm.load_default("synthetic2")
    x, y = d["train_indexes"][:200], d["train_y"][:200]
    model = functools.partial(fm.model, ranks=2, kernels=Matern(0.5, 0.2, 1.0))
    res = funbat.fit(jax.random.PRNGKey(0), model, x, y, funbat.FunBaTConfig(num_iters=200))
    # test entries at indexes that are on the 200-entry grid (the model's GP sites)
    on_grid = np.all([np.isin(d["test_indexes"][:, k], x[:, k]) for k in range(2)], axis=0)
    xt = d["test_indexes"][on_grid]
    cep_mean, _ = funbat.predict(res, xt)
    with jax.enable_x64(True):
        mcmc = MCMC(
            NUTS(model),
            num_warmup=300,
            num_samples=300,
            num_chains=2,
            progress_bar=False,
            chain_method="sequential",
        )
        mcmc.run(jax.random.PRNGKey(1), x, y=y)
        samples = {k: np.asarray(v) for k, v in mcmc.get_samples().items()}
    # predictive f at test entries from the NUTS draws of u on the grid
    grids = [np.unique(x[:, k]) for k in range(2)]
    us = [samples[f"u_{k}"][:, :, np.searchsorted(grids[k], xt[:, k])] for k in range(2)]
    f = np.einsum("sab,san,sbn->sn", samples["W"], us[0], us[1])
    f_mean, f_sd = f.mean(0), f.std(0)
    ok = np.abs(f_mean - np.asarray(cep_mean)) <= 2 * f_sd + 1e-3
    assert ok.mean() >= 0.9


@pytest.mark.slow
def test_diagonal_rank_coupling_decouples_ranks(g20_fit):
    """rank_coupling="diagonal" (mean-field over ranks): the per-index posterior covariances of
    a mode's functions are diagonal (independent per-rank chains) and the fit still reaches
    <= 1.10 × oracle test RMSE on G(2, 0)."""
    d, _ = g20_fit
    model = functools.partial(fm.model, ranks=2, kernels=Matern(0.5, 0.2, 1.0))
    cfg = funbat.FunBaTConfig(num_iters=60, tol=0.0, rank_coupling="diagonal")
    res = funbat.fit(jax.random.PRNGKey(0), model, d["train_indexes"], d["train_y"], cfg)
    for V in res.state.V:
        assert np.abs(np.asarray(V)[:, 0, 1]).max() < 1e-12
    mean, _ = funbat.predict(res, d["test_indexes"])
    assert _rmse(mean, d["test_y"]) <= 1.10 * _rmse(d["test_f"], d["test_y"])


@pytest.mark.parametrize("chunk_floats", [1 << 22, 40])  # one chunk; many chunks (padded)
def test_kron_sums_equal_brute_force(monkeypatch, chunk_floats):
    """The summed messages (no per-entry storage, D8) equal per-entry Kronecker products
    summed by brute force, in C order (mode 1 slowest), grouped by a mode's index or totalled."""
    monkeypatch.setattr(funbat, "_CHUNK_FLOATS", chunk_floats)
    rng = np.random.default_rng(0)
    ranks, n, N = (2, 3, 2), (4, 5, 3), 23
    with jax.enable_x64(True):
        mu = [jnp.asarray(rng.normal(size=(n[k], ranks[k]))) for k in range(3)]
        V = []
        for k in range(3):
            B = rng.normal(size=(n[k], ranks[k], ranks[k]))
            V.append(jnp.asarray(B @ np.swapaxes(B, 1, 2)))
        pos = jnp.asarray(np.stack([rng.integers(0, n[k], N) for k in range(3)], -1))
        y = jnp.asarray(rng.normal(size=N))
        tot = jax.jit(lambda *a: funbat._kron_sums(*a, [0, 1, 2]))
        seg = jax.jit(lambda *a: funbat._kron_sums(*a, [0, 2], seg=a[2][:, 1], num_segments=5))
        S_tot, z_tot = tot(mu, V, pos, y)
        S_seg, z_seg = seg(mu, V, pos, y)
    p, yy = np.asarray(pos), np.asarray(y)
    mom = lambda k, i: np.asarray(V[k][i]) + np.outer(mu[k][i], mu[k][i])
    S_ref = sum(
        np.kron(np.kron(mom(0, p[i, 0]), mom(1, p[i, 1])), mom(2, p[i, 2])) for i in range(N)
    )
    z_ref = sum(yy[i] * np.kron(np.kron(mu[0][p[i, 0]], mu[1][p[i, 1]]), mu[2][p[i, 2]])
                for i in range(N))  # fmt: skip
    np.testing.assert_allclose(S_tot, S_ref, atol=1e-10)
    np.testing.assert_allclose(z_tot, z_ref, atol=1e-10)
    for s in range(5):
        rows = [i for i in range(N) if p[i, 1] == s]
        ref = sum((np.kron(mom(0, p[i, 0]), mom(2, p[i, 2])) for i in rows), np.zeros((4, 4)))
        np.testing.assert_allclose(S_seg[s], ref, atol=1e-10)
