"""B1: VAE on binarised 8×8 digits — ppl vs hand-written JAX vs NumPyro (issue 3 §4).

Same architecture (``ppl.models.vae``: 64→128→8 encoder, 8→128→64 Bernoulli-logit
decoder), same data split, batch 64 drawn without replacement each step, Adam 1e-3, the
jitted step includes the optax update. For ELBO and IWELBO(5):

* compile time (first call, compile + one step), then the median over ``--repeats`` runs of
  the mean time per step, (a) one jitted step per Python call (what users see at this tiny
  size: dispatch-dominated) and (b) a ``lax.scan`` of 100 steps (pure compute);
* held-out IWELBO(K=100) in nats/image on the 297 test images after ``--steps`` steps, all
  three implementations from the same initial weights and seed.

Run: ``python benchmarks/vae_objectives.py`` (about 3 minutes on 2 CPU cores; ``--quick``
for a smoke run).
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
from numpyro.infer import SVI, RenyiELBO, Trace_ELBO

import ppl
from ppl.models import vae

BATCH = 64


def handwritten_loss(num_particles: int):
    """−IWELBO(K) of a random minibatch written directly in JAX (K = 1: −ELBO)."""

    def loss(params, key, x):
        k_idx, k_eps = jax.random.split(key)
        xb = x[jax.random.choice(k_idx, x.shape[0], (BATCH,), replace=False)]
        loc, scale = vae.encoder(params, xb)
        z = loc + scale * jax.random.normal(k_eps, (num_particles,) + loc.shape)
        log_px = dist.Bernoulli(logits=vae.decoder(params, z)).log_prob(xb).sum(-1)
        log_pz = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_qz = dist.Normal(loc, scale).log_prob(z).sum(-1)
        log_w = log_px + log_pz - log_qz
        bound = jax.scipy.special.logsumexp(log_w, 0) - math.log(num_particles)
        return -bound.sum() * x.shape[0] / BATCH

    return loss


def heldout_iwelbo(params, x, key, num_particles=100):
    """Mean over test images of IWELBO(K) (nats/image), the same code for every method."""
    loc, scale = vae.encoder(params, x)
    z = loc + scale * jax.random.normal(key, (num_particles,) + loc.shape)
    log_w = (
        dist.Bernoulli(logits=vae.decoder(params, z)).log_prob(x).sum(-1)
        + dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        - dist.Normal(loc, scale).log_prob(z).sum(-1)
    )
    return float((jax.scipy.special.logsumexp(log_w, 0) - math.log(num_particles)).mean())


def make_steps(method, num_particles, optimizer, x):
    """(init_state, step(state, key) -> state, params(state)) for one implementation."""
    init = {k: jnp.asarray(v) for k, v in vae.init_params().items()}
    if method == "hand-written JAX":
        grad = jax.grad(handwritten_loss(num_particles))

        def step(state, key):
            params, opt_state = state
            updates, opt_state = optimizer.update(grad(params, key, x), opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        return (init, optimizer.init(init)), step, lambda s: s[0]
    if method == "ppl":
        objective = ppl.objectives.elbo if num_particles == 1 else ppl.objectives.iwelbo(5)
        f = ppl.value_and_grad(objective, vae.vae_model, vae.vae_guide)

        def step(state, key):
            params, opt_state = state
            _, grads = f(params, key, x, BATCH)
            grads = jax.tree.map(jnp.negative, grads)  # the objective is maximised
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        return (init, optimizer.init(init)), step, lambda s: s[0]
    if method == "NumPyro":
        loss = Trace_ELBO() if num_particles == 1 else RenyiELBO(alpha=0, num_particles=5)
        svi = SVI(vae.vae_model, vae.vae_guide, optimizer, loss)
        state = svi.init(jax.random.PRNGKey(0), x, BATCH, init_params=init)

        def step(state, key):
            state = state._replace(rng_key=key)
            return svi.update(state, x, BATCH)[0]

        return state, step, svi.get_params
    raise ValueError(method)


def time_method(method, num_particles, x, steps, repeats, calls):
    optimizer = optax.adam(1e-3)
    state, step, get_params = make_steps(method, num_particles, optimizer, x)
    key = jax.random.PRNGKey(1)
    one = jax.jit(step)
    scan100 = jax.jit(lambda s, k: jax.lax.scan(lambda c, kk: (step(c, kk), None), s, k)[0])

    start = time.perf_counter()
    state = jax.block_until_ready(one(state, key))
    compile_s = time.perf_counter() - start
    jax.block_until_ready(scan100(state, jax.random.split(key, 100)))

    per_call = []
    for r in range(repeats):
        keys = jax.random.split(jax.random.fold_in(key, r), calls)
        start = time.perf_counter()
        s = state
        for k in keys:
            s = one(s, k)
        jax.block_until_ready(s)
        per_call.append((time.perf_counter() - start) / calls * 1e3)
    per_scan = []
    for r in range(repeats):
        keys = jax.random.split(jax.random.fold_in(key, 100 + r), 100)
        start = time.perf_counter()
        jax.block_until_ready(scan100(state, keys))
        per_scan.append((time.perf_counter() - start) / 100 * 1e3)

    # training run for the held-out bound: same initial weights and key sequence
    state, _, _ = make_steps(method, num_particles, optimizer, x)
    keys = jax.random.split(jax.random.PRNGKey(2), steps)
    train = jax.jit(lambda s, k: jax.lax.scan(lambda c, kk: (step(c, kk), None), s, k)[0])
    state = train(state, keys)
    test = jnp.asarray(vae.load_digits_binarised("test"))
    bound = heldout_iwelbo(get_params(state), test, jax.random.PRNGKey(3))
    return compile_s, float(np.median(per_call)), float(np.median(per_scan)), bound


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="20 training steps, 2 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.calls = 20, 2, 20
    x = jnp.asarray(vae.load_digits_binarised("train"))
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; batch {BATCH}, Adam 1e-3, "
        f"median of {args.repeats} repeats, {args.steps} training steps"
    )
    print(
        "| objective | implementation | compile+1st step (s) | ms/step (jit call) | "
        "ms/step (scan) | held-out IWELBO(100) | ratio vs hand (call / scan) | "
        "ratio vs NumPyro (call / scan) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, k in [("ELBO", 1), ("IWELBO(5)", 5)]:
        rows = {
            m: time_method(m, k, x, args.steps, args.repeats, args.calls)
            for m in ("hand-written JAX", "NumPyro", "ppl")
        }
        hand, npy = rows["hand-written JAX"], rows["NumPyro"]
        for m, (comp, call, scan, bound) in rows.items():
            vs_hand = f"{call / hand[1]:.2f} / {scan / hand[2]:.2f}"
            vs_npy = f"{call / npy[1]:.2f} / {scan / npy[2]:.2f}"
            print(
                f"| {name} | {m} | {comp:.2f} | {call:.3f} | {scan:.3f} | {bound:.2f} | "
                f"{vs_hand} | {vs_npy} |"
            )


if __name__ == "__main__":
    main()
