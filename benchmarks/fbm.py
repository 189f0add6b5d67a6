"""fBM latent-SDE benchmarks (issue 5): bridge, Hurst recovery, solver speed, mini-video.

Spec: ``../shared/specs/fbm.md`` (§3 bridge setup, §5 B1-B3). Printed markdown tables:

* **B1: the fBM bridge.** X₀ = 0, dX = dB^H (θ = 0, σ = 1, type I, K = 5, γ_max = 20), X₂ = 0
  observed with sd 0.1, Euler dt = 0.01, a 2×128 control MLP, batch 32, 2000 Adam steps at
  3e-3 (the spec's port uses 1e-3; the reference uses a 2×1000 MLP), for the paper's
  drift-only guide and the guide with a learned noise scale (``noise_scale=True``). The ELBO
  (2048 sequences) against the exact log evidence of the same Euler-discretised linear model
  (X is linear in the increments and Y₀: a Jacobian gives it exactly) and of the continuous
  MA model (Kalman, :func:`ppl.inference.fbm.kalman_log_likelihood`); the smallest gap each
  guide family can reach at all (:func:`family_gaps`, exact); the max over the grid of |sd
  of 2048 posterior paths − exact posterior sd|, as a fraction of the peak exact sd. Goals
  (H ≥ ½): gap < 0.3 nats, sd error < 10 % of the peak; H < ½ is reported separately. The
  ω horizon is the window T = 2 (the reference optimises ω on [0, 6]).
* **B2: Hurst recovery by VI.** 64 fOU paths (θ = 1, σ = 1, 48 observations on (0, 2.4] with
  sd 0.05, type I, :func:`ppl.models.fbm_sde.simulate_fou`) for H ∈ {0.3, 0.5, 0.7}; a
  :class:`~ppl.models.fbm_sde.LatentSDE` with an OU drift (θ learned), a learned σ and a
  learned H (γ_max = 10, dt = 1/40: every observation on the grid; the spec's 1/30 puts
  half of them mid-step, where X is interpolated linearly, which biases H; ``--dt-steps``),
  8000 Adam steps at 1e-2 (the last 4000 on a cosine
  decay to 1e-3) on the DSL ELBO (with ``kl_gradient="expected"``, as everywhere below
  unless a row says otherwise), drift-only and noise-scale guides, against the exact-BM
  model (``hurst="bm"``) on the held-out ELBO and IWELBO(32) of 32 new paths, next to the
  exact evidence and each family's exact smallest gap. Goal: |Ĥ − H| ≤ 0.05; MA-fBM beats
  BM on held-out ELBO (by two standard errors) when H ≠ ½. The no-network references: the
  Kalman MLE of H of the continuous model (θ, σ fixed at the truth), the joint MLE of θ, σ,
  H of the discretised model that VI fits (its exact evidence; :func:`euler_mle`), and
  the exact held-out difference of the MA-fBM and BM models, each at its own MLE: the
  difference that a guide with no gap would show. ``--known-params`` fixes θ = σ = 1 (the
  data's) in every model, so that only H and the guide are learned (θ, σ and H trade off
  on 64 paths of length 2.4: the joint MLE of H is 0.249 at H = 0.3, against 0.296 with
  θ, σ known, both of the model VI fits at dt = 1/40); ``--ou-step exact``
  uses the exact OU transition (:meth:`~ppl.transforms.fbm.MarkovSDE.ou_transition`).
* **Speed** (the B2 problem at H = 0.7, batch 64): time per training step (value, gradient and
  Adam update, one jitted call; median of 200 steps timed in 20 interleaved rounds, so that
  load on a shared machine falls on all alike, and the ratio to ours as the median and
  quartiles of the rounds' ratios; compile time apart) of ours (the DSL
  ELBO through :class:`~ppl.inference.SVI`: Euler in ``lax.scan`` with the exact Girsanov
  density ratio of the controlled increments, the model reusing the guide's path), of the
  reference loss with Euler and an integrated KL, and of the reference design (diffrax
  Stratonovich–Milstein, virtual Brownian tree, KL as an ODE state). Equal
  accuracy: the reference design is trained for the same number of steps and its Ĥ and
  held-out ELBO printed next to ours. Goal ≥ 3× faster.
* **B3: mini-video** (:mod:`ppl.models.fbm_video`): a blob following a 2-d fOU process
  (H ∈ {0.3, 0.7}), 32×32, 20 frames; a conv encoder/decoder latent SDE (D = 2, K = 5,
  γ_max = 10, 3 sub-steps per frame) trained on 128 clips in minibatches of 16; MA-fBM
  (learned H) vs BM on the test ELBO (32 clips) and the reconstruction MSE of the posterior
  paths' frames against the clean frames. Goal: learned H within ±0.1.

Run: ``python benchmarks/fbm.py`` (all four; on 2 idle CPU cores B2 takes about 8
minutes, ``b2-seeds`` 16 and the speed table 1, but B3 took about 5 s per step on 2 loaded
cores, so an hour or more for its 4 × 300 steps: run it on a GPU or with ``--steps``),
``--quick`` (a smoke run), ``--only b1|b2|b2-seeds|speed|b3`` (repeatable; ``b2-seeds``
repeats B2's model comparison over ``--seeds`` seeds of the networks and training keys, not
part of the default run), ``--steps N`` (override every training length), ``--decay N``
(B2: the length of the cosine tail), ``--known-params`` (B2: θ = σ = 1 fixed),
``--ou-step euler|exact`` and ``--dt-steps N`` (B2: the OU step and dt = 1/N).
Nothing is CPU-specific: on a GPU the same script runs as it is.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
from _report import fmt, header, machine_line, secs, table, timed
from numpyro import handlers

import ppl
from ppl.dsl import constrain
from ppl.inference import SVI
from ppl.inference.fbm import hurst_mle, kalman_log_likelihood
from ppl.models.fbm_sde import LatentSDE, simulate_fou
from ppl.models.fbm_video import simulate_video, video_sde
from ppl.transforms.fbm import interpolate, markov_sde

# ------------------------------------------------------------------------------ shared


def train(sde, ts, ys, steps, lr, seed=0, batches=None):
    """SVI on the DSL ELBO with Adam at ``lr`` (a float or a schedule; or a whole optax
    optimizer). Returns ``(result, compile seconds, seconds per step)``."""
    opt = lr if isinstance(lr, optax.GradientTransformation) else optax.adam(lr)
    svi = SVI(sde.model, sde.guide, opt)
    first = batches[0] if batches is not None else (ts, ys)
    state = svi.init(jax.random.PRNGKey(seed), *first)
    (state, _), t_first = timed(svi.update, state, *first)
    start = time.perf_counter()
    if batches is None:
        res = svi.run(None, steps - 1, ts, ys, init_state=state, progress_bar=False)
    else:
        res = svi.run(None, steps - 1, init_state=state, progress_bar=False,
                      batches=iter(batches[1:]))  # fmt: skip
    jax.block_until_ready(res.losses)
    per_step = (time.perf_counter() - start) / max(steps - 1, 1)
    return res, max(t_first - per_step, 0.0), per_step


def elbo_per_sequence(sde, params, ts, ys, keys=8, seed=100, objective=ppl.objectives.elbo):
    """Mean and standard error of the ELBO (or another bound, e.g.
    ``ppl.objectives.iwelbo(32)``) per sequence over ``keys`` independent draws."""
    f = jax.jit(ppl.value_and_grad(objective, sde.model, sde.guide))
    vals = [
        float(f(params, jax.random.PRNGKey(seed + i), ts, ys)[0]) / ys.shape[0] for i in range(keys)
    ]
    return float(np.mean(vals)), float(np.std(vals, ddof=1) / math.sqrt(keys))


def held_out_bounds(sde, params, ts, ys, particles=32):
    """The held-out ELBO (32 draws) and IWELBO(``particles``) (8 draws) per sequence, each
    ``(mean, standard error)``, with fixed evaluation keys."""
    iwelbo = ppl.objectives.iwelbo(particles)
    return (
        elbo_per_sequence(sde, params, ts, ys, keys=32),
        elbo_per_sequence(sde, params, ts, ys, keys=8, seed=200, objective=iwelbo),
    )


# ------------------------------------------------------------------------------ B1


def family_gaps(a, obs_sd, ys, num_fixed):
    """Exact log evidence and the smallest ELBO gap each guide family can reach (float64).

    A linear-Gaussian model in standardised coordinates: z = (ε, ξ) ~ N(0, I) with ε
    ``[num_fixed]`` (Y₀, whose law the guide keeps) and ξ ``[n]`` (the Brownian increments
    over √dt, in time order); o = a z + obs_sd·noise with ``a [T, num_fixed + n]``; ``ys
    [P, T]``. The posterior is N(m, Λ⁻¹). A guide draws ξ_n given the past with the law
    N(μ_n(past), s_n²), and for a linear model an affine μ_n is optimal, so the family is
    N(μ, S Sᵀ) with S lower-triangular, S_εε = I, μ_ε = 0, and diag S = 1 (the drift-only
    guide) or free (``noise_scale``). The KL to the posterior is minimised column by column:
    column j with free entries F contributes the Schur complement c_j = Λ_jj − Λ_jF Λ_FF⁻¹
    Λ_Fj, times s_j² − log s_j² (minimised at s_j² = 1/c_j).

    :return: per-path means ``(log evidence, gap of the drift-only guide, gap with
        noise_scale)``.
    """
    a, ys = np.asarray(a, np.float64), np.asarray(ys, np.float64)
    n_all = a.shape[1]
    lam = np.eye(n_all) + a.T @ a / obs_sd**2
    mean = np.linalg.solve(lam, a.T @ ys.T / obs_sd**2)[:num_fixed]  # [num_fixed, P]
    cov_fixed = np.linalg.inv(lam)[:num_fixed, :num_fixed]
    mean_term = np.einsum("ip,ij,jp->p", mean, np.linalg.inv(cov_fixed), mean)
    unit, free = 0.0, 0.0
    for j in range(n_all):
        rest = np.arange(num_fixed if j < num_fixed else j + 1, n_all)
        c = lam[j, j] - lam[j, rest] @ np.linalg.solve(lam[np.ix_(rest, rest)], lam[rest, j])
        unit += c
        free += c if j < num_fixed else 1.0 + math.log(c)
    base = mean_term - n_all - np.linalg.slogdet(lam)[1]
    return (
        log_evidence(a, obs_sd, ys),
        float(np.mean(0.5 * (unit + base))),
        float(np.mean(0.5 * (free + base))),
    )


def log_evidence(a, obs_sd, ys):
    """Exact mean log evidence per sequence of o = a z + obs_sd·noise, z ~ N(0, I), at
    ``ys [P, T]`` (``a [T, n]``; float64)."""
    a, ys = np.asarray(a, np.float64), np.asarray(ys, np.float64)
    chol = np.linalg.cholesky(a @ a.T + obs_sd**2 * np.eye(a.shape[0]))
    white = np.linalg.solve(chol, ys.T)  # [T, P]
    log_ev = (-0.5 * np.sum(white**2, 0) - np.sum(np.log(np.diag(chol)))
              - 0.5 * a.shape[0] * math.log(2 * math.pi))  # fmt: skip
    return float(log_ev.mean())


def linear_observations(sde, hurst, ts, x0=0.0, theta=1.0, sigma=1.0):
    """The Jacobian ``[T, K + n]`` of X at ``ts`` with respect to z = (ε, ξ) (see
    :func:`family_gaps`) for a LatentSDE whose drift is linear (a callable, or ``"ou"`` at
    ``theta``) and whose diffusion is constant (a callable, or ``"constant"`` at ``sigma``).
    With ``ou_step="exact"`` z = (ε, ζ, ξ), ``[T, K + nK + n]``: the residual noise ζ of the
    OU steps joins the coordinates whose law the guide keeps (so the floors computed from it
    let the guide see all of ζ, not only its past: lower bounds)."""
    drift = sde.drift if callable(sde.drift) else (lambda t, x: -theta * x)
    diffusion = sde.diffusion if callable(sde.diffusion) else (lambda t, x: sigma + 0.0 * x)
    bm = sde.hurst == "bm"  # exact Brownian motion: one state with γ = 0 and Y₀ = 0
    m = markov_sde(drift, diffusion, 0.5 if bm else hurst, num_ou=sde.num_ou,
                   gamma_max=sde.gamma_max, horizon=sde.horizon, fbm_type=sde.fbm_type,
                   exact_bm=bm, ou_step=sde.ou_step)  # fmt: skip
    n, dt = num_steps(sde), sde.dt
    k = m.num_ou
    nr = n * k if sde.ou_step == "exact" else 0
    tril = jnp.zeros((k, k)) if bm else m.y0_scale_tril()

    def x_at(z):
        y0 = (tril @ z[:k])[None, :]
        resid = z[k : k + nr].reshape(n, 1, k) if nr else None
        dw = z[k + nr :, None] * math.sqrt(dt)
        xs = m.euler(jnp.full((1,), x0), y0, dw, dt, resid=resid)[0]
        return interpolate(xs, jnp.asarray(ts), dt).reshape(-1)

    with jax.enable_x64(True):
        return np.asarray(jax.jacfwd(x_at)(jnp.zeros(k + nr + n, jnp.float64)))


def num_steps(sde):
    """N, the number of steps of ``sde`` (a LatentSDE with a ``horizon``)."""
    return int(math.ceil(sde.horizon / sde.dt - 1e-9))


def bridge(hurst, width, kl_gradient="expected", noise_scale=False):
    return LatentSDE(
        dim=1, hurst=hurst, drift=lambda t, x: 0.0 * x,
        diffusion=lambda t, x: jnp.ones_like(x), x0=0.0, horizon=2.0, dt=0.01,
        gamma_max=20.0, obs_sd=0.1, width=width, kl_gradient=kl_gradient,
        noise_scale=noise_scale,
    )  # fmt: skip


def bridge_exact(sde, hurst):
    """Exact posterior sd of X on the Euler grid of the discretised bridge ``[n + 1]``.

    X on the grid is linear in z = (ε, ξ): X = A z, o = A[-1] z + 0.1 ξ_o.
    """
    grid = sde.dt * np.arange(round(2.0 / sde.dt) + 1)
    a = linear_observations(sde, hurst, grid)  # [n+1, K+n]
    var_t = float(a[-1] @ a[-1]) + sde.obs_sd**2
    prior_var = np.sum(a * a, axis=1)
    post_var = prior_var - (a @ a[-1]) ** 2 / var_t
    return np.sqrt(np.maximum(post_var, 0.0))


def posterior_paths(sde, params, num, seed=7):
    """``num`` guide paths of the bridge on the Euler grid ``[n + 1, num]``."""
    ts, ys = jnp.array([2.0]), jnp.zeros((num, 1, 1))
    con = ppl.constrain_params(params, sde.model, sde.guide, ts, ys)
    return np.asarray(sde.paths(con, jax.random.PRNGKey(seed), ts, ys)[1][..., 0])


def b1(hursts, steps, width=128, lr=3e-3, batch=32):
    header(
        "B1: fBM bridge (θ = 0, σ = 1, type I, K = 5, γ_max = 20, dt = 0.01, X₂ = 0 ± 0.1)",
        [
            f"control MLP 2×{width}, batch {batch}, {steps} Adam steps at {lr:g}; ELBO per "
            "sequence from 8 × 256 sequences (± s.e.); sd error from 2048 guide paths.",
            "guide: 'drift' (the paper's: the control shifts the increments' mean) or "
            "'drift + scale' (noise_scale=True: also a per-step noise scale).",
            "exact (Euler): evidence of the discretised model the ELBO bounds; exact (cont.): "
            "Kalman evidence of the continuous MA model; floor: the smallest gap the guide "
            "family can reach at all (computed exactly, benchmarks/fbm.py family_gaps).",
            "kl_gradient 'expected' (the reference's gradient; unbiased for the ELBO).",
        ],
    )
    rows = []
    cases = [(h, "expected", ns) for h in hursts for ns in (False, True)]
    for h, kl_gradient, noise_scale in cases:
        sde = bridge(h, width, kl_gradient, noise_scale)
        ts = jnp.array([2.0])
        res, t_comp, t_step = train(sde, ts, jnp.zeros((batch, 1, 1)), steps, lr)
        params = res.state.params  # unconstrained
        elbo, se = elbo_per_sequence(sde, params, ts, jnp.zeros((256, 1, 1)))
        ev, floor_drift, floor_scale = family_gaps(
            linear_observations(sde, h, [2.0]), sde.obs_sd, np.zeros((1, 1)), sde.num_ou
        )
        sd_exact = bridge_exact(sde, h)
        with jax.enable_x64(True):
            ev_c = float(kalman_log_likelihood(np.array([2.0]), np.zeros((1, 1)), 0.1, h,
                         fbm_type="I", gamma_max=20.0, horizon=2.0)[0])  # fmt: skip
        sd_emp = np.std(posterior_paths(sde, params, 2048), axis=1)
        err = float(np.max(np.abs(sd_emp - sd_exact)) / np.max(sd_exact))
        gap = ev - elbo
        ok = "yes" if gap < 0.3 and err < 0.1 else "NO"
        rows.append([
            f"{h:g}", "drift + scale" if noise_scale else "drift", kl_gradient,
            f"{t_step * 1e3:.1f} ms", f"{elbo:.3f} ± {se:.3f}", f"{ev:.3f}", f"{ev_c:.3f}",
            f"{gap:.3f}", f"{floor_scale if noise_scale else floor_drift:.3f}",
            f"{100 * err:.1f} %", ok if h >= 0.5 else f"({ok}; H < ½, reported only)",
        ])  # fmt: skip
    table(
        ["H", "guide", "kl_gradient", "step", "ELBO", "exact (Euler)", "exact (cont.)",
         "gap (nats)", "floor", "max sd error / peak", "goal met"],
        rows,
    )  # fmt: skip


# ------------------------------------------------------------------------------ B2


def unit_ou_drift(t, x):
    """The fOU drift −θx at the data's θ = 1 (B2 with ``--known-params``)."""
    return -x


def unit_diffusion(t, x):
    """The data's σ = 1 (B2 with ``--known-params``)."""
    return jnp.ones_like(x)


def fou_model(hurst, width=64, noise_scale=False, seed=0, known=False, ou_step="euler",
              dt=1 / 30):  # fmt: skip
    """B2's model: an OU drift with θ and σ learned, or (``known``) fixed at the data's 1."""
    drift, diffusion = (unit_ou_drift, unit_diffusion) if known else ("ou", "constant")
    return LatentSDE(dim=1, hurst=hurst, drift=drift, diffusion=diffusion, horizon=2.4,
                     width=width, obs_sd=0.05, kl_gradient="expected", noise_scale=noise_scale,
                     seed=seed, ou_step=ou_step, dt=dt)  # fmt: skip


def decayed(lr, steps, decay):
    """``lr`` held for ``steps − decay`` steps, then a cosine decay to ``lr / 10``."""
    if decay <= 0:
        return lr
    decay = min(decay, steps)
    tail = optax.cosine_decay_schedule(lr, decay, alpha=0.1)
    return optax.join_schedules([optax.constant_schedule(lr), tail], [steps - decay])


def euler_mle(sde, ts, ys):
    """The maximum-likelihood θ, σ and H of the discretised OU model ``sde`` (X₀ = 0) on
    ``ys [P, T]``, from its exact evidence (:func:`log_evidence`), by Nelder–Mead on those of
    (log θ, log σ, logit H) that ``sde`` learns (θ = σ = 1 when its drift and diffusion are
    fixed callables, H = ½ for ``hurst="bm"``): the values VI converges to when the guide's gap
    depends on none of them. Returns ``(theta, sigma, hurst)``."""
    from scipy.optimize import minimize

    free = [name for name, learned in (("theta", sde.drift == "ou"),
                                       ("sigma", sde.diffusion == "constant"),
                                       ("hurst", sde.hurst is None)) if learned]  # fmt: skip

    fixed_h = 0.5 if sde.hurst in (None, "bm") else float(sde.hurst)

    def unpack(p):
        v = dict(zip(free, p, strict=True))
        h = 1.0 / (1.0 + math.exp(-v["hurst"])) if "hurst" in v else fixed_h
        return math.exp(v.get("theta", 0.0)), math.exp(v.get("sigma", 0.0)), h

    def neg_evidence(p):
        theta, sigma, h = unpack(p)
        a = linear_observations(sde, h, ts, theta=theta, sigma=sigma)
        return -log_evidence(a, sde.obs_sd, ys)

    p0 = np.zeros(len(free))  # θ = σ = 1, H = ½; a simplex of side 0.5 around it
    if not free:
        return unpack(p0)
    simplex = np.vstack([p0, p0 + 0.5 * np.eye(p0.size)])
    res = minimize(neg_evidence, p0, method="Nelder-Mead",
                   options={"xatol": 1e-3, "fatol": 1e-5, "maxiter": 600,
                            "initial_simplex": simplex})  # fmt: skip
    return unpack(res.x)


def bounds_at(sde, fit, ts, ys):
    """The OU model ``sde`` at ``fit = (theta, sigma, hurst)`` (e.g. its :func:`euler_mle`) on
    ``ys [P, T]``: ``(exact log evidence, best ELBO)`` per path, the best ELBO being the
    evidence minus the floor of the noise-scale guide family (:func:`family_gaps`; for
    MA-fBM the floor comes from Y₀, whose prior law the guide keeps)."""
    theta, sigma, hurst = fit
    a = linear_observations(sde, hurst, ts, theta=theta, sigma=sigma)
    evidence, _, floor = family_gaps(a, sde.obs_sd, ys, a.shape[1] - num_steps(sde))
    return evidence, evidence - floor


def b2(hursts, steps, lr=1e-2, decay=4000, particles=32, known=False, ou_step="euler",
       dt=1 / 40):  # fmt: skip
    learned = "θ and σ fixed at the data's 1" if known else "θ and σ learned"
    scheme = "" if ou_step == "euler" else ", exact OU step"
    header(
        "B2: Hurst recovery by VI (64 fOU paths, θ = σ = 1, 48 obs on (0, 2.4], sd 0.05)",
        [
            f"LatentSDE(OU drift, {learned}, H learned; γ_max = 10, dt = 1/{1 / dt:.0f}"
            f"{scheme}), "
            f"{steps} Adam "
            f"steps at {lr:g} (the last {decay} on a cosine decay to {lr / 10:g}); held-out "
            f"ELBO and IWELBO({particles}) per sequence on 32 new paths (32 and 8 draws, "
            "± s.e.).",
            "guide 'drift' (the paper's) or 'drift + scale' (noise_scale=True); the BM model "
            "uses 'drift + scale'. exact: log evidence per held-out path of the Euler model at "
            "the true θ, σ, H with X₀ = 0; floor: the smallest gap per path each guide family "
            "can reach there (exact; benchmarks/fbm.py family_gaps). Ĥ (Kalman MLE): the "
            "continuous MA model, θ and σ at the truth; Ĥ (Euler MLE): the MLE of H (jointly "
            "with θ and σ when they are learned) of the discretised model VI fits (its "
            "exact evidence), VI's target.",
            "MA-fBM − BM rows: the two models' held-out bounds, and 'exact': the difference "
            "of their exact held-out log evidence, each at its own Euler MLE of θ, σ (and H) "
            "on the training paths: the difference a perfect guide would show; in brackets, "
            "the difference of the best ELBOs the noise-scale guide family can reach there "
            "(benchmarks/fbm.py bounds_at).",
        ],
    )
    rows = []
    for h in hursts:
        d, held = simulate_fou(1, hurst=h, num_paths=64), simulate_fou(2, hurst=h, num_paths=32)
        ts, ys = jnp.asarray(d["ts"]), jnp.asarray(d["ys"])
        ys_h = jnp.asarray(held["ys"])
        truth = fou_model(h, ou_step=ou_step, dt=dt)
        a_true = linear_observations(truth, h, d["ts"])
        ev, floor_drift, floor_scale = family_gaps(
            a_true, 0.05, held["ys"][..., 0], a_true.shape[1] - num_steps(truth)
        )
        h_mle = hurst_mle(d["ts"], d["ys"][..., 0], 0.05, fbm_type="I", gamma_max=10.0,
                          drift_rate=1.0)  # fmt: skip
        refs = {m: fou_model(m, known=known, ou_step=ou_step, dt=dt) for m in (None, "bm")}
        mle = {m: euler_mle(sde, d["ts"], d["ys"][..., 0]) for m, sde in refs.items()}
        at_mle = {m: bounds_at(sde, mle[m], d["ts"], held["ys"][..., 0])
                  for m, sde in refs.items()}  # fmt: skip
        fits = {}
        for label, hurst, noise_scale in (("drift", None, False), ("drift + scale", None, True),
                                          ("BM, drift + scale", "bm", True)):  # fmt: skip
            sde = fou_model(hurst, noise_scale=noise_scale, known=known, ou_step=ou_step,
                            dt=dt)  # fmt: skip
            res, _, t_step = train(sde, ts, ys, steps, decayed(lr, steps, decay))
            (elbo, se), (iw, se_iw) = held_out_bounds(sde, res.state.params, ts, ys_h, particles)
            fits[label] = (elbo, se, iw, se_iw)
            h_vi = sde.hurst_value(res.params)
            floor = floor_scale if noise_scale else floor_drift
            if hurst == "bm":
                h_cell, ok, floor_cell = "(½)", "—", "—"
            else:
                h_cell, ok = fmt(h_vi, 3), "yes" if abs(h_vi - h) <= 0.05 else "NO"
                floor_cell = f"{floor:.1f}"
            rows.append([
                f"{h:g}", label, h_cell, ok, fmt(h_mle, 3), fmt(mle[hurst][2], 3),
                f"{elbo:.2f} ± {se:.2f}", f"{iw:.2f} ± {se_iw:.2f}",
                f"{ev:.2f}", f"{ev - elbo:.1f}", floor_cell, f"{t_step * 1e3:.1f} ms",
            ])  # fmt: skip
        ma, bm = fits["drift + scale"], fits["BM, drift + scale"]
        cells = []
        for k in (0, 2):  # ELBO, IWELBO
            diff, se_diff = ma[k] - bm[k], math.hypot(ma[k + 1], bm[k + 1])
            better = diff > 2 * se_diff
            verdict = "" if h == 0.5 else (" (better)" if better else " (NOT better by 2 s.e.)")
            cells.append(f"{diff:+.2f} ± {se_diff:.2f}{verdict}")
        exact, best = (at_mle[None][k] - at_mle["bm"][k] for k in (0, 1))
        rows.append([f"{h:g}", "MA-fBM − BM (drift + scale)", "", "", "", "", *cells,
                     f"{exact:+.2f} (floors {best:+.2f})", "", "", ""])  # fmt: skip
    table(
        ["H", "guide", "Ĥ (VI)", "|Ĥ − H| ≤ 0.05", "Ĥ (Kalman MLE)", "Ĥ (Euler MLE)",
         "held-out ELBO / path", f"IWELBO({particles}) / path",
         "exact", "gap", "floor", "step"],
        rows,
    )  # fmt: skip


def b2_seeds(hursts, steps, seeds, lr=1e-2, decay=4000, particles=32, known=False,
             ou_step="euler", dt=1 / 40):  # fmt: skip
    """B2's MA-fBM − BM comparison (noise-scale guides) repeated over seeds of the networks
    and training keys: the spread between training runs, which the ± of one run's held-out
    bound leaves out."""
    header(
        f"B2 over training seeds: MA-fBM − BM on the held-out paths ({len(seeds)} seeds)",
        [
            f"as B2 (drift + scale guides, {steps} steps, θ and σ "
            f"{'fixed at 1' if known else 'learned'}, OU step {ou_step!r}, dt = "
            f"1/{1 / dt:.0f}); seed s initialises the networks "
            "(LatentSDE(seed=s)) and draws the training keys; the data and the evaluation keys "
            "are B2's (seed 0 is B2's run). Last rows: mean ± standard error over the seeds.",
        ],
    )
    rows = []
    for h in hursts:
        d, held = simulate_fou(1, hurst=h, num_paths=64), simulate_fou(2, hurst=h, num_paths=32)
        ts, ys, ys_h = jnp.asarray(d["ts"]), jnp.asarray(d["ys"]), jnp.asarray(held["ys"])
        diffs = []
        for s in seeds:
            bounds, h_vi = {}, {}
            for hurst in (None, "bm"):
                sde = fou_model(hurst, noise_scale=True, seed=s, known=known, ou_step=ou_step,
                                dt=dt)  # fmt: skip
                res, _, _ = train(sde, ts, ys, steps, decayed(lr, steps, decay), seed=s)
                elbo, iw = held_out_bounds(sde, res.state.params, ts, ys_h, particles)
                bounds[hurst], h_vi[hurst] = (elbo[0], iw[0]), sde.hurst_value(res.params)
            diff = [bounds[None][k] - bounds["bm"][k] for k in (0, 1)]
            diffs.append(diff)
            ma, bm = bounds[None][0], bounds["bm"][0]
            rows.append([f"{h:g}", str(s), fmt(h_vi[None], 3), f"{ma:.2f}", f"{bm:.2f}",
                         f"{diff[0]:+.2f}", f"{diff[1]:+.2f}"])  # fmt: skip
        mean = np.mean(diffs, 0)
        se = np.std(diffs, 0, ddof=1) / math.sqrt(len(seeds)) if len(seeds) > 1 else [np.nan] * 2
        rows.append([f"{h:g}", "mean", "", "", "", f"{mean[0]:+.2f} ± {se[0]:.2f}",
                     f"{mean[1]:+.2f} ± {se[1]:.2f}"])  # fmt: skip
    table(["H", "seed", "Ĥ (VI)", "MA-fBM ELBO", "BM ELBO", "MA − BM, ELBO",
           f"MA − BM, IWELBO({particles})"], rows)  # fmt: skip


# ------------------------------------------------------------------------------ speed


def reference_step(sde, solver, lr, ts, ys):
    """A jitted (loss, grad, Adam) step of :meth:`LatentSDE.girsanov_loss` with ``solver``."""
    init = ppl.init_params(jax.random.PRNGKey(0), sde.model, sde.guide, ts, ys)
    positive = {"sigma", "theta", "x0_scale"}
    opt = optax.adam(lr)

    def loss(u, key):
        con = {k: constrain(v, dist.constraints.positive) if k in positive else v
               for k, v in u.items()}  # fmt: skip
        return sde.girsanov_loss(con, key, ts, ys, solver=solver)

    @jax.jit
    def step(u, opt_state, key):
        value, g = jax.value_and_grad(loss)(u, key)
        updates, opt_state = opt.update(g, opt_state, u)
        return optax.apply_updates(u, updates), opt_state, value

    return init, opt.init(init), step


def dsl_step(sde, lr, ts, ys):
    svi = SVI(sde.model, sde.guide, optax.adam(lr))
    state = svi.init(jax.random.PRNGKey(0), ts, ys)
    return state, jax.jit(svi.update)


class Stepper:
    """One training-step implementation: ``call(state) -> state``, its compile time (first
    call minus a steady one), the steady wall times collected by :func:`interleaved` and
    the median of each of its rounds."""

    def __init__(self, call, state):
        self.call, self.state, self.times, self.rounds = call, state, [], []
        self.state, t_first = timed(call, state)
        self.state, t_second = timed(call, self.state)
        self.compile = max(t_first - t_second, 0.0)

    def run(self, n):
        times = []
        for _ in range(n):
            self.state, dt = timed(self.call, self.state)
            times.append(dt)
        self.times += times
        self.rounds.append(float(np.median(times)))

    @property
    def median(self):
        return float(np.median(self.times))

    def ratio(self, other):
        """``other``'s time over ours, round by round: (median, first quartile, third
        quartile). A round's steps of both ran within a second of each other, so a burst
        of load moves both medians of a round alike."""
        r = np.asarray(other.rounds) / np.asarray(self.rounds)
        return tuple(float(q) for q in np.percentile(r, (50, 25, 75)))


def interleaved(steppers, repeats, rounds=20):
    """Time the steppers in ``rounds`` alternating rounds of ``repeats / rounds`` steps each,
    so that a burst of load on a shared machine falls on all of them alike."""
    per = max(1, repeats // rounds)
    for _ in range(rounds):
        for st in steppers:
            st.run(per)


def speed(steps, repeats, lr=3e-3, rounds=20):
    per = max(1, repeats // rounds)
    header(
        "Speed: time per training step, the B2 problem (H = 0.7, 64 paths × 48 obs, "
        "dt = 1/30, 72 steps; the exact OU step: dt = 1/20, 48 steps)",
        [
            f"{rounds} interleaved rounds of {per} steps each after compilation: time / step "
            "is the median of all, 'time vs ours' the median of the rounds' ratios; equal "
            f"accuracy: each trained {max(steps, rounds * per + 2)} steps, Ĥ and the "
            "held-out ELBO (the DSL ELBO of the trained params on 32 new paths).",
        ],
    )
    steps = max(steps, rounds * per + 2)  # the reference design trains while it is timed
    d, held = simulate_fou(1, hurst=0.7, num_paths=64), simulate_fou(2, hurst=0.7, num_paths=32)
    ts, ys, ys_h = jnp.asarray(d["ts"]), jnp.asarray(d["ys"]), jnp.asarray(held["ys"])
    sde = fou_model(None)
    # ours: the DSL ELBO (Euler in lax.scan, exact Girsanov ratio of the increments)
    state, update = dsl_step(sde, lr, ts, ys)
    steppers = {"ours": Stepper(lambda s: update(s, ts, ys)[0], state)}
    # ours with the exact OU step at dt = 1/20: the observations (0.05 apart) on the grid,
    # which the Euler guard γ_max·dt < 0.5 forbids
    sde_x = fou_model(None, ou_step="exact", dt=1 / 20)
    state_x, update_x = dsl_step(sde_x, lr, ts, ys)
    steppers["exact"] = Stepper(lambda s: update_x(s, ts, ys)[0], state_x)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 4 * (steps + repeats) + 8))
    for solver in ("euler", "milstein"):
        u, opt_state, step = reference_step(sde, solver, lr, ts, ys)
        steppers[solver] = Stepper(lambda s, step=step: step(*s[:2], next(keys)),
                                   (u, opt_state, 0.0))  # fmt: skip
    interleaved(list(steppers.values()), repeats, rounds)
    ours = steppers["ours"]
    rows = []
    for name, model, label in (
        ("ours", sde, "ours: DSL ELBO, Euler + lax.scan"),
        ("exact", sde_x, "ours: DSL ELBO, exact OU step, dt = 1/20 + lax.scan"),
    ):
        res, _, _ = train(model, ts, ys, steps, lr)
        elbo = elbo_per_sequence(model, res.state.params, ts, ys_h)
        st = steppers[name]
        rows.append([label, f"{st.median * 1e3:.1f} ms", secs(st.compile),
                     f"{ours.ratio(st)[0]:.2f}×", fmt(model.hurst_value(res.params), 3),
                     f"{elbo[0]:.3f} ± {elbo[1]:.3f}"])  # fmt: skip
    for solver, label in (
        ("euler", "reference loss, Euler + integrated KL"),
        ("milstein", "reference design: diffrax Stratonovich–Milstein + VBT"),
    ):
        st = steppers[solver]
        cell_h, cell_e = "–", "–"
        if solver == "milstein":
            u, opt_state = st.state[0], st.state[1]
            for _ in range(steps - len(st.times) - 2):
                u, opt_state, _ = st.call((u, opt_state))
            h = float(jnp.clip(jax.nn.sigmoid(u["hurst_raw"]), 1e-3, 1 - 1e-3))
            e = elbo_per_sequence(sde, u, ts, ys_h)
            cell_h, cell_e = fmt(h, 3), f"{e[0]:.3f} ± {e[1]:.3f}"
        rows.append([label, f"{st.median * 1e3:.1f} ms", secs(st.compile),
                     f"{ours.ratio(st)[0]:.2f}×", cell_h, cell_e])  # fmt: skip
    table(["step", "time / step", "compile", "time vs ours", "Ĥ", "held-out ELBO"], rows)
    ref = steppers["milstein"]
    for name, label in (("ours", "Euler at the same dt"), ("exact", "exact OU step, dt = 1/20")):
        r = steppers[name].ratio(ref)
        print(f"\nthe reference design's time over ours, {label} (goal ≥ 3× at equal "
              f"accuracy): {r[0]:.2f}× (median of {len(ref.rounds)} rounds' ratios; quartiles "
              f"{r[1]:.2f}–{r[2]:.2f})")  # fmt: skip


# ------------------------------------------------------------------------------ B3


def hurst_faster(lr, factor=10.0):
    """Adam at ``lr``, and at ``factor × lr`` for ``hurst_raw``. Adam moves a parameter by
    about its learning rate per step, so at 3e-3 a few hundred steps cannot take
    H = sigmoid(raw) from ½ to 0.7 (raw 0 → 0.85)."""
    return optax.partition(
        {"hurst": optax.adam(factor * lr), "rest": optax.adam(lr)},
        lambda params: {k: "hurst" if k == "hurst_raw" else "rest" for k in params},
    )


def b3(hursts, steps, batch=16, num_train=128, num_test=32):
    header(
        "B3: mini-video (blob on a 2-d fOU path, 32×32, 20 frames, frame dt 0.1)",
        [
            f"video_sde (conv encoder/decoder, D = 2, K = 5, γ_max = 10, dt = 1/30, guide "
            f"with a learned noise scale), {steps} "
            f"Adam steps at 3e-3 (3e-2 for H's raw parameter: benchmarks/fbm.py hurst_faster) "
            f"on minibatches of {batch} from {num_train} clips; test ELBO "
            f"per clip on {num_test} new clips; MSE of the frames of 16 posterior paths' "
            "mean against the clean test frames (per pixel).",
        ],
    )
    rows = []
    for h in hursts:
        tr = simulate_video(10, hurst=h, num_sequences=num_train)
        te = simulate_video(11, hurst=h, num_sequences=num_test)
        ts = jnp.asarray(tr["ts"])
        ys = np.asarray(tr["ys"])
        rng = np.random.default_rng(0)
        batches = [
            (ts, jnp.asarray(ys[rng.choice(num_train, batch, replace=False)])) for _ in range(steps)
        ]
        for label, hurst in (("MA-fBM", None), ("BM", "bm")):
            sde = video_sde(hurst=hurst, horizon=float(ts[-1]), kl_gradient="expected",
                            noise_scale=True)  # fmt: skip
            res, t_comp, t_step = train(sde, None, None, steps, hurst_faster(3e-3),
                                        batches=batches)  # fmt: skip
            params = res.state.params
            elbo, se = elbo_per_sequence(sde, params, ts, jnp.asarray(te["ys"]), keys=4)
            mse = reconstruction_mse(sde, res.params, ts, te)
            rows.append([
                f"{h:g}", label, fmt(sde.hurst_value(res.params), 3), f"{elbo:.1f} ± {se:.1f}",
                f"{mse:.2e}", f"{t_step * 1e3:.0f} ms", secs(t_comp),
            ])  # fmt: skip
    table(["H", "model", "Ĥ", "test ELBO / clip", "recon. MSE", "step", "compile"], rows)


def reconstruction_mse(sde, params_c, ts, data, draws=16):
    """Per-pixel MSE of the decoded mean of ``draws`` posterior paths vs the clean frames."""
    ys = jnp.asarray(data["ys"])

    @jax.jit
    def draw(key, params, ys):  # one compilation; arrays as arguments (no constant folding)
        guide = handlers.seed(handlers.substitute(sde.guide, params), key)
        return handlers.trace(guide).get_trace(ts, ys)["x"]["value"]

    xs = [draw(jax.random.PRNGKey(50 + i), params_c, ys) for i in range(draws)]
    mean_x = jnp.mean(jnp.stack(xs), axis=0)  # [B, T, D]
    with handlers.substitute(data=params_c):
        frames = sde._decode(mean_x)
    return float(jnp.mean((frames - jnp.asarray(data["frames"])) ** 2))


# ------------------------------------------------------------------------------ main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (short training)")
    parser.add_argument("--only", action="append",
                        choices=("b1", "b2", "b2-seeds", "speed", "b3"))  # fmt: skip
    parser.add_argument("--seeds", type=int, default=4, help="training seeds (b2-seeds)")
    parser.add_argument("--steps", type=int, default=None, help="override training lengths")
    parser.add_argument(
        "--decay",
        type=int,
        default=None,
        help="B2: the last N steps on a cosine decay (default 4000)",
    )
    parser.add_argument(
        "--known-params",
        action="store_true",
        help="B2: θ and σ fixed at the data's 1 (only H and the guide learned)",
    )
    parser.add_argument(
        "--ou-step",
        choices=("euler", "exact"),
        default="euler",
        help="B2: how the OU states advance over a step (LatentSDE(ou_step=...))",
    )
    parser.add_argument(
        "--dt-steps",
        type=int,
        default=40,
        help="B2: steps per unit time (dt = 1/N; 40 puts the observations, 0.05 apart, on "
        "the grid; the spec's 30 puts half of them mid-step)",
    )
    parser.add_argument("--repeats", type=int, default=200, help="timed steps (speed)")
    args = parser.parse_args(argv)
    only = set(args.only or ("b1", "b2", "speed", "b3"))
    q = args.quick
    print("# fBM latent-SDE benchmarks\n")
    print(machine_line())
    start = time.perf_counter()
    b2_steps = args.steps or (150 if q else 8000)
    b2_decay = min(b2_steps, args.decay if args.decay is not None else (100 if q else 4000))
    if "b1" in only:
        b1((0.7, 0.5, 0.3), args.steps or (200 if q else 2000))
    if "b2" in only:
        b2((0.3, 0.5, 0.7), b2_steps, decay=b2_decay, known=args.known_params,
           ou_step=args.ou_step, dt=1.0 / args.dt_steps)  # fmt: skip
    if "b2-seeds" in only:
        b2_seeds((0.3, 0.7), b2_steps, range(args.seeds), decay=b2_decay,
                 known=args.known_params, ou_step=args.ou_step,
                 dt=1.0 / args.dt_steps)  # fmt: skip
    if "speed" in only:
        speed(args.steps or (60 if q else 1500), 20 if q else args.repeats)
    if "b3" in only:
        b3((0.3, 0.7), args.steps or (20 if q else 300))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
