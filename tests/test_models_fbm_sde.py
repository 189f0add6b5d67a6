"""The fBM latent-SDE family (issue 5): Girsanov density ratio, KL, ELBO bound, solvers, input.

Spec ``fbm.md`` §4 tests 6 (KL), 7 (ELBO ≤ exact log evidence), 11 (Itô = Stratonovich for
constant σ) and the bad-input list; the other spec tests are in ``test_spec_fbm.py`` and
``test_inference_fbm.py``.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpyro.handlers import replay as numpyro_replay
from numpyro.handlers import seed, substitute, trace

import ppl
from ppl.models.fbm_sde import LatentSDE, simulate_fou
from ppl.transforms.fbm import ControlledIncrements, GridControl, fbm_sde, markov_fbm, markov_sde

ZERO = staticmethod(lambda t, x: 0.0 * x)


def _bridge(hurst=0.7, dt=0.02, width=16, noise_scale=False):
    """Spec B1: X₀ = 0, dX = σ dB^H (σ = 1), X_T = 0 observed with sd 0.1 at T = 2."""
    return LatentSDE(
        dim=1, hurst=hurst, drift=lambda t, x: 0.0 * x,
        diffusion=lambda t, x: jnp.ones_like(x), x0=0.0, horizon=2.0, dt=dt,
        gamma_max=20.0, obs_sd=0.1, width=width, noise_scale=noise_scale,
    )  # fmt: skip


def _exact_bridge_evidence(sde, hurst=0.7):
    """log N(0; 0, Var X_T + 0.1²) of the Euler-discretised MA model (X_T is linear in ΔW, Y₀)."""
    m = markov_sde(sde.drift, sde.diffusion, hurst, num_ou=5, gamma_max=20.0, horizon=2.0)
    n = int(round(2.0 / sde.dt))

    def x_end(dw, y0):
        return m.euler(jnp.zeros(1), y0, dw, sde.dt)[0][-1, 0]

    a, c = jax.grad(x_end, argnums=(0, 1))(jnp.zeros((n, 1)), jnp.zeros((1, 5)))
    var = sde.dt * float(jnp.sum(a**2)) + float(np.sum((np.asarray(c)[0] @ m.y0_scale_tril()) ** 2))
    return -0.5 * math.log(2 * math.pi * (var + 0.01))


def _init_params(sde, ts, ys):
    """``ppl.init_params`` (key 0) compiled as one program: op by op, tracing the Euler scans
    of the model and the guide takes seconds per call."""

    @eqx.filter_jit
    def init(ts, ys):
        return ppl.init_params(jax.random.PRNGKey(0), sde.model, sde.guide, ts, ys)

    return init(ts, ys)


def _guide_and_model_on_the_guides_draw(sde, ts, ys, site):
    """Trace the guide (seed 0), then the model (seed 1) on the guide's values; return
    ``(log q, log p)`` of the guide's draw at ``site`` and both traces' ``x``. Compiled as one
    program (op-by-op, the Euler scans dominate these tests' time)."""

    @jax.jit
    def run(ts, ys):
        gt = trace(seed(sde.guide, 0)).get_trace(ts, ys)
        data = {k: v["value"] for k, v in gt.items()}
        mt = trace(substitute(seed(sde.model, 1), data=data)).get_trace(ts, ys)
        v = gt[site]["value"]
        return (
            gt[site]["fn"].log_prob(v),
            mt[site]["fn"].log_prob(v),
            gt["x"]["value"],
            mt["x"]["value"],
        )

    return run(ts, ys)


def test_zero_control_gives_zero_path_kl():
    """Spec test 6: the zero-initialised control makes the guide's increments the prior's."""
    sde = LatentSDE(dim=2, hurst=0.3, drift="ou", horizon=1.0, dt=0.04, width=8)
    ts = jnp.linspace(0.1, 1.0, 10)
    ys = jnp.asarray(np.random.default_rng(0).normal(size=(3, 10, 2)))
    log_q, log_p, x_q, x_p = _guide_and_model_on_the_guides_draw(sde, ts, ys, "x.dW")
    np.testing.assert_allclose(log_q, log_p, rtol=0, atol=1e-4 * float(jnp.abs(log_p).max()))
    np.testing.assert_allclose(x_q, x_p, atol=1e-6)


def test_constant_control_kl_and_mean_shift():
    """Spec test 6: u ≡ c gives KL = ½c²T per dimension and (θ = 0) E X_T shifts by
    c Σ_k ω_k (1 − e^{−γ_k T})/γ_k (the Euler mean with ΔW = 0 is that shift up to O(dt))."""
    c, t_end, dt = 0.7, 2.0, 1e-3
    m = markov_sde(
        lambda t, x: 0.0 * x, lambda t, x: jnp.ones_like(x), 0.7, gamma_max=20.0,
        horizon=t_end, fbm_type="II",
    )  # fmt: skip
    n = int(round(t_end / dt))
    with jax.enable_x64(True):
        xs, _, kl = m.euler(
            jnp.zeros(2), jnp.zeros((2, 5)), jnp.zeros((n, 2)), dt,
            control=lambda t, x, y: c * jnp.ones_like(x),
        )  # fmt: skip
        g, w = np.asarray(m.gammas), np.asarray(m.omega, dtype=float)
    assert float(kl) == pytest.approx(2 * 0.5 * c**2 * t_end, rel=1e-9)
    shift = c * np.sum(w * (1 - np.exp(-g * t_end)) / g)
    np.testing.assert_allclose(np.asarray(xs[-1]), shift, rtol=2e-2)


def test_controlled_increments_density_ratio_is_girsanov():
    """log q − log p of the increments = −Σ u ΔW̃ + ½ Σ u² dt exactly, and the cached
    density of a draw equals the recomputed one."""
    m = markov_sde(lambda t, x: -x, lambda t, x: 1.0 + 0.0 * x, 0.6, gamma_max=10.0, horizon=1.0)
    u = lambda t, x, y: jnp.tanh(x + y.sum(-1)) + t  # noqa: E731
    law = ControlledIncrements(m, jnp.zeros((4, 1)), jnp.zeros((4, 1, 5)), 25, 0.04, u)
    value = law.rsample(jax.random.PRNGKey(0))
    cached = law.log_prob(value)
    fresh = law.log_prob(value + 0.0)  # a new array: recomputed
    np.testing.assert_allclose(cached, fresh, rtol=1e-5, atol=1e-4)
    # u along the path, recomputed by the augmented Euler scheme
    xs, ys, kl = m.euler(jnp.zeros((4, 1)), jnp.zeros((4, 1, 5)), jnp.moveaxis(value, 1, 0), 0.04)
    ts = jnp.arange(25) * 0.04
    us = jax.vmap(u)(ts, xs[:-1], ys[:-1])  # [N, 4, 1]
    dw = jnp.moveaxis(value, 1, 0)
    log_p = jnp.sum(-0.5 * dw**2 / 0.04 - 0.5 * math.log(2 * math.pi * 0.04), axis=(0, 2))
    expected = jnp.sum(-us * dw + 0.5 * us**2 * 0.04, axis=(0, 2))
    np.testing.assert_allclose(fresh - log_p, -expected, rtol=1e-4, atol=1e-4)


def test_scaled_increments_density_is_the_sequential_normal():
    """A control returning (u, s): log q of a draw = Σ log N(ΔW̃_n; u_n dt, s_n² dt) along its
    own path (cached and recomputed), and the draw's noise part has sd s_n √dt."""
    m = markov_sde(lambda t, x: -x, lambda t, x: 1.0 + 0.0 * x, 0.4, gamma_max=10.0, horizon=1.0)

    def ctrl(t, x, y):
        return jnp.tanh(x + y.sum(-1)) + t, jnp.exp(0.5 * jnp.tanh(x) - 0.3)

    law = ControlledIncrements(m, jnp.zeros((4, 1)), jnp.zeros((4, 1, 5)), 25, 0.04, ctrl)
    value = law.rsample(jax.random.PRNGKey(0))
    cached, fresh = law.log_prob(value), law.log_prob(value + 0.0)
    np.testing.assert_allclose(cached, fresh, rtol=1e-5, atol=1e-4)
    xs, ys, _ = m.euler(jnp.zeros((4, 1)), jnp.zeros((4, 1, 5)), jnp.moveaxis(value, 1, 0), 0.04)
    us, ss = jax.vmap(ctrl)(jnp.arange(25) * 0.04, xs[:-1], ys[:-1])  # [N, 4, 1] each
    dw = jnp.moveaxis(value, 1, 0)
    by_hand = jnp.sum(
        -0.5 * (dw - us * 0.04) ** 2 / (ss**2 * 0.04) - 0.5 * jnp.log(2 * math.pi * ss**2 * 0.04),
        axis=(0, 2),
    )
    np.testing.assert_allclose(fresh, by_hand, rtol=1e-5, atol=1e-4)


def test_constant_scaled_control_kl():
    """u ≡ c, s ≡ s₀: E[log q − log p] of the increments = N[½(s₀² − 1 − log s₀²) + ½c²dt]
    (the discrete-time KL), within 4 standard errors over 4000 draws (seed 0)."""
    c, s0, n, dt = 0.8, 0.6, 20, 0.05
    m = markov_sde(lambda t, x: -x, lambda t, x: 1.0 + 0.0 * x, 0.5, gamma_max=5.0, horizon=1.0)
    const = lambda t, x, y: (c * jnp.ones_like(x), s0 * jnp.ones_like(x))  # noqa: E731
    law = ControlledIncrements(m, jnp.zeros((4000, 1)), jnp.zeros((4000, 1, 5)), n, dt, const)
    value = law.rsample(jax.random.PRNGKey(0))
    log_p = jnp.sum(-0.5 * value**2 / dt - 0.5 * math.log(2 * math.pi * dt), axis=(-2, -1))
    ratio = np.asarray(law.log_prob(value) - log_p)
    kl = n * (0.5 * (s0**2 - 1 - math.log(s0**2)) + 0.5 * c**2 * dt)
    se = ratio.std() / math.sqrt(ratio.size)
    assert abs(ratio.mean() - kl) < 4 * se, (ratio.mean(), kl, se)
    np.testing.assert_allclose(np.std(np.asarray(value - c * dt)), s0 * math.sqrt(dt), rtol=0.02)


@pytest.mark.slow  # 60 SVI steps on 2 × 256 sequences, ~25 s
def test_noise_scale_guide_starts_at_the_prior_and_bounds_the_evidence():
    """noise_scale=True: the zero-initialised control gives s = 1 (guide = prior); after 60
    steps (the scale has moved) the ELBO of the bridge is still ≤ the exact evidence of the
    discretised model (a missing −Σ log s in log q would break the bound), and closer to it
    than the drift-only guide's after the same steps (seed 0, 2 × 256 sequences)."""
    ts, ys = jnp.array([2.0]), jnp.zeros((256, 1, 1))
    sde = _bridge(noise_scale=True)
    log_q, log_p, _, _ = _guide_and_model_on_the_guides_draw(sde, ts, ys, "x.dW")
    np.testing.assert_allclose(log_q, log_p, rtol=1e-5)
    exact = _exact_bridge_evidence(sde)
    gaps = {}
    for scaled in (True, False):
        sde = _bridge(noise_scale=scaled)
        svi = ppl.inference.SVI(sde.model, sde.guide, optax.adam(1e-2))
        res = svi.run(jax.random.PRNGKey(0), 60, ts, ys[:32], progress_bar=False)
        f = jax.jit(ppl.value_and_grad(ppl.objectives.elbo, sde.model, sde.guide))
        vals = [float(f(res.state.params, jax.random.PRNGKey(10 + i), ts, ys)[0]) / 256
                for i in range(2)]  # fmt: skip
        gaps[scaled] = exact - np.mean(vals)
    assert gaps[True] > -0.02, gaps
    assert gaps[True] < gaps[False], gaps


def test_elbo_and_iwelbo_below_exact_bridge_evidence():
    """Spec test 7: on the linear bridge, ELBO ≤ IWELBO(8) ≤ log p(o) (discretised model),
    up to 3 standard errors (512 sequences = independent estimates, seed 0)."""
    sde = _bridge()
    ts, ys = jnp.array([2.0]), jnp.zeros((512, 1, 1))
    params = _init_params(sde, ts, ys)
    exact = _exact_bridge_evidence(sde)
    for objective in (ppl.objectives.elbo, ppl.objectives.iwelbo(8)):
        f = jax.jit(ppl.value_and_grad(objective, sde.model, sde.guide))
        per_seq = []
        for i in range(2):
            val, _ = f(params, jax.random.PRNGKey(10 + i), ts, ys)
            per_seq.append(float(jnp.sum(val)) / 512)
        est = np.mean(per_seq)
        assert est <= exact + 0.05, (objective, est, exact)
    # at the prior (u = 0) the ELBO is E log N(0; X_T, 0.1²) < log p(o) by a wide margin
    assert per_seq[0] < exact


def test_milstein_matches_euler_for_constant_sigma():
    """Spec test 11: for constant σ the Stratonovich–Milstein (diffrax) and Itô–Euler laws
    agree: Var X_t at three times, 3000 paths each, within 6 % (≈ 4 standard errors)."""
    m = markov_sde(lambda t, x: -x, lambda t, x: jnp.ones_like(x), 0.7, gamma_max=10.0,
                   horizon=2.0, fbm_type="II")  # fmt: skip
    b, dt, ts = 3000, 0.02, jnp.array([0.5, 1.0, 2.0])
    xs_m, kl = m.milstein(jnp.zeros((b, 1)), jnp.zeros((b, 1, 5)), ts, jax.random.PRNGKey(0), dt)
    dw = jax.random.normal(jax.random.PRNGKey(1), (100, b, 1)) * math.sqrt(dt)
    xs_e, _, _ = m.euler(jnp.zeros((b, 1)), jnp.zeros((b, 1, 5)), dw, dt)
    var_m = np.var(np.asarray(xs_m[..., 0]), axis=1)
    var_e = np.var(np.asarray(xs_e[np.array([25, 50, 100]), :, 0]), axis=1)
    np.testing.assert_allclose(var_m, var_e, rtol=0.06)
    assert float(jnp.max(kl)) == 0.0


def test_simulate_fou_recovers_its_hurst_index_by_kalman_mle():
    """The embedded data generator is what it says: the Kalman MLE of its H (no drift model,
    θ = 0 paths) lands within 0.03."""
    from ppl.inference.fbm import hurst_mle

    d = simulate_fou(3, hurst=0.3, num_paths=32, theta=0.0, obs_sd=0.01, substeps=1)
    h = hurst_mle(d["ts"], d["ys"][..., 0], 0.01, fbm_type="I", gamma_max=20.0)
    assert abs(h - 0.3) <= 0.03


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dt=0.1, gamma_max=10.0), "dt"),
        (dict(hurst=1.2), "hurst"),
        (dict(hurst=0.0), "hurst"),
        (dict(num_ou=0), "num_ou"),
        (dict(fbm_type="III"), "fbm_type"),
        (dict(obs_sd=0.0), "obs_sd"),
        (dict(drift="spline"), "drift"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LatentSDE(**kwargs)


@pytest.mark.parametrize(
    "ts, ys, match",
    [
        ([0.1, 0.3, 0.2], np.zeros((2, 3, 1)), "times"),
        ([0.1, 0.2, 0.3], np.zeros((2, 4, 1)), "ys"),
        ([0.1, 0.2, 0.3], np.full((2, 3, 1), np.nan), "ys"),
    ],
)
def test_bad_data(ts, ys, match):
    sde = LatentSDE(dim=1, hurst=0.6, drift="ou")
    with pytest.raises(ValueError, match=match):
        trace(seed(sde.model, 0)).get_trace(jnp.asarray(ts), jnp.asarray(ys))


def test_cli_rejects_bad_step_before_building(tmp_path, capsys):
    from ppl import cli

    code = cli.main(["fit", "fbm-sde", "--dt", "0.1", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "--dt" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "flags, noise_scale, gain_schedule",
    [([], False, True), (["--noise-scale", "--no-gain-schedule"], True, False)],
)
def test_cli_guide_flags_reach_the_latent_sde(flags, noise_scale, gain_schedule):
    """``--noise-scale`` and ``--no-gain-schedule`` set the guide family of the built model
    (and with them the nets it has: the gain MLP and the control's output size)."""
    from ppl import cli
    from ppl.models.fbm_sde import _build

    sde = _build(cli.build_parser().parse_args(["fit", "fbm-sde", *flags])).data["sde"]
    assert (sde.noise_scale, sde.gain_schedule) == (noise_scale, gain_schedule)
    assert ("gains" in sde.nets) == gain_schedule
    assert sde.nets["control"].layers[-1].weight.shape[0] == (2 if noise_scale else 1)


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    from ppl import cli

    out = tmp_path / "run"
    code = cli.main(["fit", "fbm-sde", "--steps", "30", "--num-samples", "8", "--out", str(out),
                     "--no-progress"])  # fmt: skip
    assert code == 0
    for f in ("posterior.nc", "paths.png", "hurst.png", "summary.txt", "loss.png"):
        assert (out / f).exists()
    assert "Hurst index (VI" in (out / "summary.txt").read_text()


@pytest.mark.parametrize("hurst", ["bm", pytest.param(None, marks=pytest.mark.slow)])
def test_every_hurst_option_gives_a_finite_elbo_in_two_dims(hurst):
    """Learned, fixed and exact-BM models build (the control sees the right state size) and
    their ELBO and gradients are finite; the exact-BM prior has Var X_t = t (σ = 1, no drift),
    checked on 4000 prior paths within 4 standard errors (seed 0)."""
    sde = LatentSDE(dim=2, hurst=hurst, drift=ZERO, x0=0.0, horizon=1.0, dt=0.025, width=8)
    ts = jnp.array([0.5, 1.0])
    ys = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2, 2)))
    params = _init_params(sde, ts, ys)
    value, grads = jax.jit(ppl.value_and_grad(ppl.objectives.elbo, sde.model, sde.guide))(
        params, jax.random.PRNGKey(1), ts, ys
    )
    assert np.isfinite(float(value))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    if hurst == "bm":
        sigma = {"sigma": jnp.ones(2)}
        prior_x = jax.jit(
            lambda ts: trace(seed(substitute(sde.model, sigma), 2)).get_trace(
                ts, num_sequences=4000
            )["x"]["value"]
        )
        var = np.var(np.asarray(prior_x(ts)), axis=0)  # [T, D]
        np.testing.assert_allclose(var, np.array([[0.5, 0.5], [1.0, 1.0]]),
                                   rtol=4 * math.sqrt(2 / 4000))  # fmt: skip


@pytest.mark.slow  # notebook 02 trains the video model in fast mode in the default suite
def test_video_model_elbo_runs_and_decoder_renders_frames():
    """The mini-video model (spec B3) at 16×16: data shapes, a finite ELBO and gradient, and
    decoded frames in (0, 1) of the data's shape."""
    from ppl.models.fbm_video import simulate_video, video_sde

    data = simulate_video(0, hurst=0.3, num_sequences=2, num_frames=4, size=16, scale=3.0)
    assert data["ys"].shape == (2, 4, 256) and data["xs"].shape == (2, 4, 2)
    # the clean frame peaks at the blob's centre: max pixel of frame 0 is ≈ 1 at the
    # rounded centre when the centre is inside the canvas
    centre = 7.5 + 3.0 * data["xs"][0, 0]
    if np.all((centre > 0) & (centre < 15)):
        r, c = divmod(int(np.argmax(data["frames"][0, 0])), 16)
        assert abs(r - centre[0]) <= 1 and abs(c - centre[1]) <= 1
    ts, ys = jnp.asarray(data["ts"]), jnp.asarray(data["ys"])
    sde = video_sde(size=16, horizon=float(ts[-1]), width=8, features=8)
    params = _init_params(sde, ts, ys)
    f = jax.jit(ppl.value_and_grad(ppl.objectives.elbo, sde.model, sde.guide))
    value, grads = f(params, jax.random.PRNGKey(1), ts, ys)
    assert np.isfinite(float(value))
    assert float(jnp.abs(grads["hurst_raw"])) > 0  # H is learned from the frames
    frames = jax.vmap(sde.nets["decoder"])(jnp.zeros((3, 2)))
    assert frames.shape == (3, 256) and bool(jnp.all((frames > 0) & (frames < 1)))


def _nonzero_control_params(sde, ts, ys, seed=2):
    """Constrained initial params with non-zero last layers of the control MLP and of the
    gain schedule (seeded)."""
    constrain = eqx.filter_jit(lambda p: ppl.constrain_params(p, sde.model, sde.guide, ts, ys))
    params = constrain(_init_params(sde, ts, ys))
    for i, name in enumerate(n for n in ("control$params", "gains$params") if n in params):
        last = params[name].layers[-1]
        params[name] = eqx.tree_at(
            lambda m: (m.layers[-1].weight, m.layers[-1].bias),
            params[name],
            tuple(
                0.3 * jax.random.normal(jax.random.PRNGKey(seed + 10 * i + j), a.shape)
                for j, a in enumerate((last.weight, last.bias))
            ),
        )
    return params


@pytest.mark.parametrize("fbm_type", ["I", pytest.param("II", marks=pytest.mark.slow)])
def test_paths_on_the_grid_reproduce_the_guide_at_observation_times(fbm_type):
    """``LatentSDE.paths`` (prior Euler driven by the guide's increments) equals the guide's
    own ``x`` at the observation times (same key): to float32 rounding."""
    sde = LatentSDE(dim=2, hurst=0.6, fbm_type=fbm_type, drift="ou", horizon=1.0, dt=0.02,
                    width=8)  # fmt: skip
    ts = jnp.array([0.2, 0.5, 1.0])
    ys = jnp.asarray(np.random.default_rng(1).standard_normal((4, 3, 2)))
    params = _nonzero_control_params(sde, ts, ys)  # increments that are not prior draws
    grid, xs = sde.paths(params, jax.random.PRNGKey(3), ts, ys)
    guide_x = jax.jit(
        lambda params, ts, ys: trace(
            seed(substitute(sde.guide, data=params), jax.random.PRNGKey(3))
        ).get_trace(ts, ys)["x"]["value"]
    )
    assert grid.shape == (51,) and xs.shape == (51, 4, 2)
    idx = np.array([10, 25, 50])
    np.testing.assert_allclose(np.moveaxis(np.asarray(xs[idx]), 0, 1), guide_x(params, ts, ys),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


_DRIFT_ONLY_FLOOR = pytest.mark.xfail(
    strict=True,
    reason="the drift-only Euler guide cannot reach it: its best possible ELBO (computed "
    "exactly, benchmarks/fbm.py family_gaps) peaks at H = 0.55 on H = 0.3 data and at 0.65 on "
    "H = 0.5 data (measured Ĥ 0.374 / 0.605 in benchmarks/fbm.py B2); with noise_scale=True "
    "the floor is < 0.3 nats per path and its peak is the evidence's",
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "true_h, noise_scale",
    [
        (0.3, True),
        (0.5, True),
        (0.7, True),
        pytest.param(0.3, False, marks=_DRIFT_ONLY_FLOOR),
        pytest.param(0.5, False, marks=_DRIFT_ONLY_FLOOR),
        (0.7, False),  # passes, but by cancellation: this family's peak is at 0.75 here
    ],
)
def test_vi_recovers_the_hurst_index(true_h, noise_scale):
    """Spec test 9: VI with a learnable H on 64 fOU paths (θ = σ = 1, 48 observations on
    (0, 2.4] with sd 0.05, type I, K = 5, γ_max = 10, dt = 1/30; seed 1): |Ĥ − H| ≤ 0.05
    after 4000 Adam steps at 1e-2, the last 1000 on a cosine decay to 1e-3 (OU drift and σ
    learned too). At H = 0.7 the target is tight: the dt = 1/30 Euler model's own MLE of H on
    these paths is 0.642 with θ = σ = 1 (0.612 jointly with θ and σ; exact, benchmarks/fbm.py
    euler_mle), and VI gets 0.66 (0.654 and 0.662 with the MLP control alone, 0.660 and 0.653
    with the gain schedule at two network seeds). This is the spec's 4000-step schedule, not
    convergence: trained 8000 steps (benchmarks/fbm.py B2), VI goes on toward that MLE and
    leaves the band at H = 0.3 and 0.7 (Ĥ 0.24-0.25 and 0.61-0.62 over four seeds)."""
    import optax

    from ppl.inference import SVI

    d = simulate_fou(1, hurst=true_h, num_paths=64)
    sde = LatentSDE(dim=1, hurst=None, drift="ou", horizon=2.4, obs_sd=0.05,
                    kl_gradient="expected", noise_scale=noise_scale)  # fmt: skip
    lr = optax.join_schedules(
        [optax.constant_schedule(1e-2), optax.cosine_decay_schedule(1e-2, 1000, alpha=0.1)],
        [3000],
    )
    svi = SVI(sde.model, sde.guide, optax.adam(lr))
    res = svi.run(jax.random.PRNGKey(0), 4000, jnp.asarray(d["ts"]), jnp.asarray(d["ys"]),
                  progress_bar=False)  # fmt: skip
    h_hat = sde.hurst_value(res.params)
    assert abs(h_hat - true_h) <= 0.05, h_hat


@pytest.mark.slow
def test_expected_kl_gradient_same_value_same_mean_lower_variance():
    """``kl_gradient="expected"`` keeps the ELBO's value (same key: equal to float32
    rounding) and its expected gradient (40 keys × 64 sequences: every coordinate of the
    two mean gradients within 4 combined standard errors), with a smaller total variance."""
    ts = jnp.array([0.5, 1.0])
    ys = jnp.asarray(np.random.default_rng(0).standard_normal((64, 2, 1)))
    out = {}
    for mode in ("exact", "expected"):
        sde = LatentSDE(dim=1, hurst=0.7, drift="ou", horizon=1.0, dt=0.05, gamma_max=5.0,
                        width=4, obs_sd=0.5, kl_gradient=mode)  # fmt: skip
        params = _init_params(sde, ts, ys)
        w = params["control$params"].layers[-1].weight
        params["control$params"] = eqx.tree_at(
            lambda m: m.layers[-1].weight, params["control$params"],
            0.5 * jax.random.normal(jax.random.PRNGKey(2), w.shape),
        )  # fmt: skip
        f = jax.jit(ppl.value_and_grad(ppl.objectives.elbo, sde.model, sde.guide))
        vals, grads = [], []
        for i in range(40):
            v, g = f(params, jax.random.PRNGKey(100 + i), ts, ys)
            vals.append(float(v))
            grads.append(np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g)]))
        out[mode] = np.array(vals), np.array(grads)
    np.testing.assert_allclose(out["exact"][0], out["expected"][0], rtol=1e-5)
    g_ex, g_en = out["exact"][1], out["expected"][1]
    se = np.sqrt((g_ex.var(0, ddof=1) + g_en.var(0, ddof=1)) / 40)
    assert np.all(np.abs(g_ex.mean(0) - g_en.mean(0)) <= 4 * se + 1e-6)
    assert g_en.var(0).sum() < g_ex.var(0).sum()
    assert not np.allclose(g_ex[0], g_en[0])  # the estimators differ sample by sample


@pytest.mark.parametrize(
    "noise_scale, gain_schedule", [(False, False), (False, True), (True, False), (True, True)]
)
def test_grid_control_is_the_mlp_of_the_documented_features(noise_scale, gain_schedule):
    """The guide's control (a GridControl: time part computed for the whole grid) equals the
    control MLP applied to [x, y, context at the last/next/next-but-one observation, phase
    features] written out here, plus the gain schedule's (G·[x, y] + Σ_j G_j·c_j + g) / (4Δ̄)
    with the gains the gain MLP of the phase features, at grid times, between them and at
    the observation times."""
    sde = LatentSDE(dim=2, hurst=0.6, drift="ou", horizon=1.0, dt=0.02, width=8,
                    noise_scale=noise_scale, gain_schedule=gain_schedule)  # fmt: skip
    ts = jnp.array([0.2, 0.5, 1.0])
    ys = jnp.asarray(np.random.default_rng(1).standard_normal((4, 3, 2)))
    params = _nonzero_control_params(sde, ts, ys)
    with substitute(data=params):
        control = sde._control(sde._context(ys), ts)
    assert isinstance(control, GridControl)
    net = eqx.combine(params["control$params"], sde.nets["control"])
    if gain_schedule:
        gains = eqx.combine(params["gains$params"], sde.nets["gains"])
    else:
        assert "gains" not in sde.nets and "gains$params" not in params
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((4, 2)), rng.standard_normal((4, 2, 5))

    def reference(t):
        nxt = min(int(np.sum(np.asarray(ts) <= t)), 2)
        obs = np.asarray(ys)[:, [max(nxt - 1, 0), nxt, min(nxt + 1, 2)]].reshape(4, -1)
        to_next = max(float(ts[nxt]) - t, 0.0) / (1.0 / 3)
        phase = [to_next, math.log(to_next + 0.02 * 3), t, math.sin(math.pi * t)]
        state = np.concatenate([x, y.reshape(4, -1)], -1)  # [4, 12]
        feats = np.concatenate([state, obs, np.tile(phase, (4, 1))], -1)
        out = np.asarray(jax.vmap(net)(jnp.asarray(feats, jnp.float32)))
        u = out[:, :2]
        if gain_schedule:
            g = np.asarray(gains(jnp.asarray(phase, jnp.float32))) * 0.75  # 1/(4Δ̄) = 3/4
            g_state, g_obs, g0 = g[:24].reshape(2, 12), g[24:36].reshape(2, 6), g[36:]
            u = u + state @ g_state.T + obs @ g_obs.T + g0
        if not noise_scale:
            return u
        return u, np.exp(np.clip(out[:, 2:], -5, 5))

    grid = 0.02 * jnp.arange(50)  # float32: t = 0.2 may fall on either side of ts[0]
    grid_feats = control.features(grid)
    for t in (0.0, 0.13, 0.2, 0.5, 0.77, 1.0):
        got, want = control(t, jnp.asarray(x), jnp.asarray(y)), reference(t)
        np.testing.assert_allclose(np.hstack(got), np.hstack(want), rtol=1e-5, atol=1e-6)
    for n in (0, 10, 25, 31, 49):
        feats_n = jax.tree.map(lambda leaf, n=n: leaf[n], grid_feats)
        got = control.apply(feats_n, jnp.asarray(x), jnp.asarray(y))
        want = reference(float(grid[n]))
        np.testing.assert_allclose(np.hstack(got), np.hstack(want), rtol=1e-5, atol=1e-5)


def test_shared_path_gives_the_same_elbo_and_gradient_with_one_scan_fewer():
    """share_path=True (LatentSDE's guide): the model reuses the guide's Euler path. The ELBO
    value and its gradient equal those of the model's own replay (share_path=False), and the
    compiled objective has one scan (forward) fewer."""
    sde = LatentSDE(dim=1, hurst=None, drift="ou", horizon=1.0, dt=0.02, width=8)
    ts = jnp.array([0.2, 0.5, 1.0])
    ys = jnp.asarray(np.random.default_rng(1).standard_normal((4, 3, 1)))
    params = _init_params(sde, ts, ys)
    nonzero = _nonzero_control_params(sde, ts, ys)
    params.update({k: nonzero[k] for k in ("control$params", "gains$params")})

    def unshared_guide(ts, ys):  # the same guide, with the model replaying the path
        def no_share(msg):
            if msg["type"] == "fbm_sde":
                msg["kwargs"]["share_path"] = False

        from numpyro.primitives import Messenger

        class _NoShare(Messenger):
            def process_message(self, msg):
                no_share(msg)

        with _NoShare():
            return sde.guide(ts, ys)

    out, scans = {}, {}
    for label, guide in (("shared", sde.guide), ("replayed", unshared_guide)):
        # the ELBO: inside ppl.particles each particle is its own vmapped execution, and
        # the model replays the path (the guide's law cannot leave the vmap)
        f = ppl.value_and_grad(ppl.objectives.elbo, sde.model, guide)
        out[label] = jax.jit(f)(params, jax.random.PRNGKey(7), ts, ys)
        jaxpr = jax.make_jaxpr(f)(params, jax.random.PRNGKey(7), ts, ys)
        scans[label] = str(jaxpr).count("scan[")
    np.testing.assert_allclose(out["shared"][0], out["replayed"][0], rtol=1e-6)
    for a, b in zip(
        jax.tree.leaves(out["shared"][1]), jax.tree.leaves(out["replayed"][1]), strict=True
    ):  # float32 sums in another order: an entry far below its leaf's largest (~200 for the
        # gain MLP's weights) carries rounding of that size, hence atol relative to the leaf
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(b))) + 1e-6)
    assert scans["replayed"] - scans["shared"] >= 1, scans


def test_shared_path_is_used_only_for_the_guides_own_draw_and_start():
    """The model reuses the guide's path only for the guide's own increments from the same
    start. To see which path the model used, its drift differs from the guide's (so that
    sharing, which promises equal dynamics, would give the guide's path): a substituted
    increment, an edited y0 or another x0 makes the model replay its own dynamics."""
    x0, times = jnp.zeros(1), jnp.array([0.5, 1.0])
    prior_drift = lambda t, x: -3.0 * x  # noqa: E731

    def prior(start=x0):
        return fbm_sde("x", prior_drift, lambda t, x: jnp.ones_like(x), start, hurst=0.7,
                       times=times, dt=0.05)  # fmt: skip

    def posterior():
        return fbm_sde("x", lambda t, x: -x, lambda t, x: jnp.ones_like(x), x0, hurst=0.7,
                       times=times, dt=0.05, control=lambda t, x, y: 1.0 + 0.0 * x,
                       share_path=True)  # fmt: skip

    def model_x(tr, start=x0):
        with trace() as mt, numpyro_replay(trace=tr):
            seed(markov_fbm(prior, gamma_max=5.0), 1)(start)
        return np.asarray(mt["x"]["value"])

    m = markov_sde(prior_drift, lambda t, x: jnp.ones_like(x), 0.7, horizon=1.0, gamma_max=5.0)

    def own(dw, y0, start=0.0):
        return np.asarray(m.euler(start + jnp.zeros(1), y0, dw, 0.05)[0][np.array([10, 20])])

    gt = trace(seed(markov_fbm(posterior, gamma_max=5.0), 0)).get_trace()
    dw, y0 = gt["x.dW"]["value"], gt["x.y0"]["value"]
    np.testing.assert_array_equal(model_x(gt), gt["x"]["value"])  # shared
    assert np.abs(own(dw, y0) - gt["x"]["value"]).max() > 0.05  # the detector works
    half = {**gt, "x.dW": {**gt["x.dW"], "value": dw * 0.5}}
    np.testing.assert_allclose(model_x(half), own(dw * 0.5, y0), rtol=1e-5, atol=1e-6)
    moved = {**gt, "x.y0": {**gt["x.y0"], "value": y0 + 1.0}}
    np.testing.assert_allclose(model_x(moved), own(dw, y0 + 1.0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model_x(gt, jnp.ones(1)), own(dw, y0, 1.0), rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match="share_path"):
        markov_fbm(lambda: fbm_sde("x", lambda t, x: -x, lambda t, x: 1.0, jnp.zeros(1),
                                   hurst=0.7, times=jnp.array([1.0]), dt=0.05,
                                   share_path=True))()  # fmt: skip
