"""The exact OU step (``ou_step="exact"``): the OU states take their exact Gaussian transition
over each step, so the MA-fBM path on the grid has exactly the continuous MA law at any dt.

Checked against closed forms: the MA covariance (:func:`ma_covariance`), the mean shift of a
constant control (spec test 6), the H = ½ reduction, and the ELBO of the zero control.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.handlers import replay, seed, substitute, trace

import ppl
from ppl.models.fbm_sde import LatentSDE
from ppl.transforms.fbm import (
    ControlledIncrements,
    check_ou_step,
    ma_covariance,
    markov_fbm,
    markov_sde,
)


def _zero(t, x):
    return 0.0 * x


def _unit(t, x):
    return jnp.ones_like(x)


def _fbm(hurst, fbm_type, ou_step, gamma_max=10.0, horizon=2.4):
    """dX = dB^H (no drift, σ = 1): X_t − X_0 is the MA-fBM itself."""
    return markov_sde(
        _zero, _unit, hurst, num_ou=5, gamma_max=gamma_max, horizon=horizon,
        fbm_type=fbm_type, ou_step=ou_step,
    )  # fmt: skip


def _grid_covariance(sde, n, dt):
    """Cov of X on the grid 1..n·dt of an ``ou_step="exact"`` SDE, exactly: X is linear in
    (Y₀, ΔW, resid) [float64]."""
    k = sde.num_ou
    tril = np.asarray(sde.y0_scale_tril(), np.float64)

    def xs(z):
        y0 = (jnp.asarray(tril) @ z[:k])[None, None]
        dw = z[k : k + n].reshape(n, 1, 1) * math.sqrt(dt)
        resid = z[k + n :].reshape(n, 1, 1, k)
        return sde.euler(jnp.zeros((1, 1)), y0, dw, dt, resid=resid)[0][1:, 0, 0]

    jac = np.asarray(jax.jacfwd(xs)(jnp.zeros(k + n + n * k, jnp.float64)))
    return jac @ jac.T


@pytest.mark.parametrize("fbm_type", ["I", "II"])
@pytest.mark.parametrize("hurst", [0.3, 0.7])
def test_exact_step_has_the_continuous_ma_covariance(hurst, fbm_type):
    """At dt = 0.1 (γ_max·dt = 1, twice the Euler guard) the grid covariance of the exact
    scheme equals the continuous MA covariance to float64 round-off."""
    dt, n = 0.1, 24
    with jax.enable_x64(True):
        ts = dt * np.arange(1, n + 1)
        exact = _fbm(hurst, fbm_type, "exact")
        ref = np.asarray(
            ma_covariance(ts[:, None], ts[None, :], exact.gammas, exact.omega, fbm_type)
        )
        got = _grid_covariance(exact, n, dt)
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12 * np.max(ref))


def test_constant_control_shifts_the_mean_exactly():
    """Spec test 6 at a coarse step: u ≡ c gives E[X_T] = c Σ_k ω_k (1 − e^{−γ_k T})/γ_k and
    KL = ½c²T with ou_step="exact", whatever dt (no noise: the mean path itself)."""
    c, dt, n = 0.7, 0.12, 20
    t_end = dt * n
    with jax.enable_x64(True):
        sde = _fbm(0.7, "II", "exact", horizon=t_end)
        xs, _, kl = sde.euler(
            jnp.zeros(1), jnp.zeros((1, 5)), jnp.zeros((n, 1)), dt,
            control=lambda t, x, y: jnp.full_like(x, c), resid=jnp.zeros((n, 1, 5)),
        )  # fmt: skip
        g, w = np.asarray(sde.gammas), np.asarray(sde.omega)
        expected = c * np.sum(w * -np.expm1(-g * t_end) / g)
        np.testing.assert_allclose(float(xs[-1, 0]), expected, rtol=1e-12)
        np.testing.assert_allclose(float(kl), 0.5 * c * c * t_end, rtol=1e-12)


def test_exact_step_at_half_is_the_euler_brownian_motion():
    """exact_bm (γ = [0], ω = [1]): the exact OU step is the Euler step (no residual)."""
    key = jax.random.PRNGKey(0)
    drift = lambda t, x: -0.5 * x  # noqa: E731
    sig = lambda t, x: 1.0 + 0.0 * x  # noqa: E731
    euler = markov_sde(drift, sig, 0.5, exact_bm=True)
    exact = markov_sde(drift, sig, 0.5, exact_bm=True, ou_step="exact")
    dw = jax.random.normal(key, (30, 4, 2)) * 0.1
    r = jax.random.normal(key, (30, 4, 2, 1))
    a = euler.euler(jnp.ones((4, 2)), jnp.zeros((4, 2, 1)), dw, 0.01)[0]
    b = exact.euler(jnp.ones((4, 2)), jnp.zeros((4, 2, 1)), dw, 0.01, resid=r)[0]
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def _bridge(ou_step, dt=0.1):
    return LatentSDE(
        dim=1, hurst=0.3, drift=_zero, diffusion=_unit, x0=0.0,
        horizon=2.0, dt=dt, gamma_max=10.0, obs_sd=0.5, width=8, ou_step=ou_step,
    )  # fmt: skip


def _init_params(sde, ts, ys):
    """``ppl.init_params`` (key 0) compiled as one program (op by op, tracing the model's and
    the guide's scans takes seconds)."""

    @eqx.filter_jit
    def init(ts, ys):
        return ppl.init_params(jax.random.PRNGKey(0), sde.model, sde.guide, ts, ys)

    return init(ts, ys)


def test_guide_and_model_share_the_exact_path():
    """Under markov_fbm(ou_step="exact") both programs have the ``x.resid`` site, and the
    model replayed on a guide draw has the guide's path (the one the prior's scheme gives
    for those sites)."""
    sde = _bridge("exact")
    ts, ys = jnp.array([1.0, 2.0]), jnp.zeros((3, 2, 1))
    params = _init_params(sde, ts, ys)
    params = jax.tree.map(lambda v: v + 0.3, params)  # a non-zero control
    shared = {}

    @jax.jit  # one program; the identity of the replayed value is recorded while tracing
    def run(params, ts, ys):
        g_tr = trace(seed(substitute(sde.guide, data=params), 1)).get_trace(ts, ys)
        m_tr = trace(replay(substitute(sde.model, data=params), g_tr)).get_trace(ts, ys)
        shared["resid"] = m_tr["x.resid"]["value"] is g_tr["x.resid"]["value"]
        sde_m = sde.markov(params, 2.0)
        resid = jnp.moveaxis(g_tr["x.resid"]["value"], -3, 0)
        dw = jnp.moveaxis(g_tr["x.dW"]["value"], -2, 0)
        xs = sde_m.euler(jnp.zeros((3, 1)), g_tr["x.y0"]["value"], dw, 0.1, resid=resid)[0]
        return g_tr["x.resid"]["value"], m_tr["x"]["value"], xs

    g_resid, m_x, xs = run(params, ts, ys)
    assert g_resid.shape == (3, 20, 1, 5)
    assert shared["resid"]
    np.testing.assert_allclose(m_x[:, :, 0], xs[jnp.array([10, 20]), :, 0].T,
                               rtol=1e-5, atol=1e-6)  # fmt: skip


def test_zero_control_elbo_is_the_closed_form():
    """With u ≡ 0 (the guide at initialisation) the ELBO is E[log N(y; X_T, s²)] with X_T ~
    N(0, V), V the continuous MA variance at T = 2 (exact for ou_step="exact" at dt = 0.1):
    −½ log(2πs²) − (y² + V)/(2s²). 64 keys × 512 copies of the sequence (seeds 0–63), within 4
    standard errors of the 64 per-key means (the standard error is about 0.03 nats)."""
    sde = _bridge("exact")
    b = 512
    ts, ys = jnp.array([2.0]), jnp.full((b, 1, 1), 0.4)
    params = _init_params(sde, ts, ys)
    m = sde.markov(params, 2.0)
    v = float(ma_covariance(2.0, 2.0, m.gammas, m.omega, "I"))
    s2 = 0.25
    expected = -0.5 * math.log(2 * math.pi * s2) - (0.16 + v) / (2 * s2)
    f = jax.jit(ppl.value_and_grad(ppl.objectives.elbo, sde.model, sde.guide))
    vals = np.array([float(f(params, jax.random.PRNGKey(i), ts, ys)[0]) / b for i in range(64)])
    se = vals.std(ddof=1) / math.sqrt(vals.size)
    assert abs(vals.mean() - expected) < 4 * se, (vals.mean(), expected, se)
    assert se < 0.01 * abs(expected)


def test_exact_step_bad_input():
    with pytest.raises(ValueError, match="ou_step"):
        check_ou_step("rk4")
    with pytest.raises(ValueError, match="ou_step"):
        markov_sde(lambda t, x: x, lambda t, x: 1.0, 0.7, ou_step="milstein")
    with pytest.raises(ValueError, match="ou_step"):
        markov_fbm(ou_step="exp")
    with pytest.raises(ValueError, match="ou_step"):
        _bridge("implicit")
    with pytest.raises(ValueError, match="guard"):
        _bridge("euler", dt=0.1)  # γ_max·dt = 1
    sde = _bridge("exact", dt=0.1)  # no guard: the OU step is exact
    assert sde.dt == 0.1
    exact = _fbm(0.7, "I", "exact")
    with pytest.raises(ValueError, match="resid"):
        exact.step(0.0, jnp.zeros(1), jnp.zeros((1, 5)), jnp.zeros(1), 0.1)
    with pytest.raises(ValueError, match="resid"):
        _fbm(0.7, "I", "euler").step(
            0.0, jnp.zeros(1), jnp.zeros((1, 5)), jnp.zeros(1), 0.01, jnp.zeros((1, 5))
        )
    with pytest.raises(ValueError, match="resid"):
        ControlledIncrements(exact, jnp.zeros(1), jnp.zeros((1, 5)), 10, 0.1)


def test_cli_ou_step_and_default_grid():
    """``--ou-step exact`` reaches the LatentSDE and lifts the Euler guard (dt = 0.05 with
    γ_max = 10); the default dt puts the embedded data's observation times on the grid."""
    from ppl import cli
    from ppl.models.fbm_sde import _build

    def build(*flags):
        return _build(cli.build_parser().parse_args(["fit", "fbm-sde", *flags])).data

    data = build("--ou-step", "exact", "--dt", "0.05")
    assert (data["sde"].ou_step, data["sde"].dt) == ("exact", 0.05)
    default = build()
    pos = np.asarray(default["data"]["ts"]) / default["sde"].dt
    np.testing.assert_allclose(pos, np.round(pos), atol=1e-6)
    assert default["sde"].ou_step == "euler"
