"""Overhead of ``ppl.inference.SVI`` against ``numpyro.infer.SVI`` (issue 4 §5).

Same model, guide and optax optimiser, ELBO with one particle, for a small Bayesian
linear regression (N = 500, D = 5) and for the VAE of ``ppl fit vae`` (batch 64):

* ``update``: one jitted step per Python call; median over ``--repeats`` runs of the mean
  time per step (compile time reported apart, from the first call);
* ``run``: the driver's own loop (ppl: ``lax.scan`` chunks; NumPyro: its jitted loop),
  per-step time from ``(T(2n) − T(n)) / n`` so that compilation cancels out, median over
  repeats.

Goal: ppl ≤ 1.0× NumPyro. Run: ``python benchmarks/svi_overhead.py`` (about 2 minutes).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.infer import SVI as NumPyroSVI
from numpyro.infer import Trace_ELBO

import ppl
from ppl.inference import SVI
from ppl.models import vae


def regression(x, y=None):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(x @ w, sigma), obs=y)


def regression_guide(x, y=None):
    loc = numpyro.param("w_loc", jnp.zeros(x.shape[1]))
    scale = numpyro.param(
        "w_scale", 0.1 * jnp.ones(x.shape[1]), constraint=dist.constraints.positive
    )
    numpyro.sample("w", dist.Normal(loc, scale).to_event(1))
    s_loc = numpyro.param("s_loc", 0.0)
    numpyro.sample("sigma", dist.LogNormal(s_loc, 0.1))


def problems():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 5)).astype(np.float32)
    y = (x @ np.arange(1.0, 6.0) + rng.normal(size=500)).astype(np.float32)
    yield (
        "regression (N=500, D=5)",
        regression,
        regression_guide,
        (jnp.asarray(x), jnp.asarray(y)),
        {},
    )
    xv = jnp.asarray(vae.load_digits_binarised("train"))
    yield "VAE (batch 64)", vae.vae_model, vae.vae_guide, (xv, 64), {}


def time_update(svi, state, args, calls, repeats, numpyro_style):
    update = jax.jit(
        svi.update, static_argnums=(2,) if len(args) > 1 and isinstance(args[1], int) else ()
    )
    if not numpyro_style:
        update = svi.update  # ppl's update is itself a compiled step (static Python args)
    start = time.perf_counter()
    state, _ = update(state, *args)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - start
    per = []
    for _ in range(repeats):
        start = time.perf_counter()
        s = state
        for _ in range(calls):
            s, _ = update(s, *args)
        jax.block_until_ready(s)
        per.append((time.perf_counter() - start) / calls * 1e3)
    return compile_s, float(np.median(per))


def time_run(run, n, repeats):
    """Per-step ms of ``run`` from ``(T(2n) − T(n)) / n``, both lengths called once first
    (so that whatever the driver caches is warm); ``nan`` when noise swamps the difference."""
    jax.block_until_ready(run(0, n))
    jax.block_until_ready(run(0, 2 * n))
    per = []
    for r in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(r, n))
        t1 = time.perf_counter() - start
        start = time.perf_counter()
        jax.block_until_ready(run(r, 2 * n))
        t2 = time.perf_counter() - start
        per.append((t2 - t1) / n * 1e3)
    median = float(np.median(per))
    return median if median > 0 else float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.calls, args.steps, args.repeats = 20, 50, 2
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; Adam 1e-3, ELBO (1 particle); "
        f"median of {args.repeats} repeats"
    )
    print("| problem | driver | compile (s) | update ms/step | run ms/step | ratio update / run |")
    print("|---|---|---|---|---|---|")
    for name, model, guide, data, _kw in problems():
        opt = optax.adam(1e-3)
        key = jax.random.PRNGKey(0)
        ours = SVI(model, guide, opt, ppl.objectives.elbo)
        theirs = NumPyroSVI(model, guide, opt, Trace_ELBO())
        c_ours, u_ours = time_update(
            ours, ours.init(key, *data), data, args.calls, args.repeats, False
        )
        c_np, u_np = time_update(
            theirs, theirs.init(key, *data), data, args.calls, args.repeats, True
        )

        def run_ours(seed, n):
            return ours.run(jax.random.PRNGKey(seed), n, *data, progress_bar=False).losses

        def run_np(seed, n):
            return theirs.run(jax.random.PRNGKey(seed), n, *data, progress_bar=False).losses

        r_ours = time_run(run_ours, args.steps, args.repeats)
        r_np = time_run(run_np, args.steps, args.repeats)
        print(f"| {name} | NumPyro SVI | {c_np:.2f} | {u_np:.3f} | {r_np:.3f} | 1.00 / 1.00 |")
        print(
            f"| {name} | ppl SVI | {c_ours:.2f} | {u_ours:.3f} | {r_ours:.3f} | "
            f"{u_ours / u_np:.2f} / {r_ours / r_np:.2f} |"
        )


if __name__ == "__main__":
    main()
