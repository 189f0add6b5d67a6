"""SSVI benchmarks (issue 6; spec ``../shared/specs/ssvi.md`` §5): dense mean-field VI
against sparse subspace VI on scikit-learn digits.

For the MLP (64→256→256→10, every weight matrix sparse) and the small CNN (conv 1→32 dense,
conv 32→64 and the 64→10 head sparse), dense MF-VI (``density 1``: plain dense ops) and
SSVI at densities 0.5, 0.2, 0.1, 0.05 (``snr_abs``, grow by gradient, α = 0.3, ΔT = 50,
T_end = 0.75 of the run, Adam with each sparse μ's step scaled by 1/density
(:func:`ppl.inference.ssvi.density_scaled`: the effective fan-in), batch 128, prior
N(0, 1), tempered ELBO with β ``--kl-weight``; uniform per-layer density as in the
reference, ``--allocation erk`` for ERK with the same total active count) are trained
with :func:`ppl.models.bnn.fit` (checkpoint selected on the validation split) and
evaluated on the test split with 32 posterior draws from ``InferenceData``:

* accuracy, NLL of the averaged probability, top-label ECE (15 equal-width bins), entropy
  on rotated test digits (OOD);
* time per epoch (9 steps of 128 from 1150 training digits) after compilation, the
  compile time apart, and the amortised cost of the support updates;
* peak memory of one compiled training step (XLA's ``memory_analysis``: arguments +
  outputs + temporaries) and the stored state (parameters + Adam moments + indices, bytes);
* the parameter count (variational parameters stored).

Medians over ``--repeats`` seeds; ratios are SSVI / dense. Nothing is asserted.

Run: ``python benchmarks/ssvi.py`` (full) or ``--quick`` (a smoke run: MLP and CNN, fewer
steps, densities 1 and 0.1, one seed). ``--arch mlp|cnn`` (repeatable), ``--steps N``.
"""

from __future__ import annotations

import argparse
import math
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ppl
from ppl.models import bnn

STEPS_PER_EPOCH = math.ceil(1150 / 128)


def _nbytes(tree) -> int:
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def step_memory(result, data, batch_size=128) -> int:
    """Peak bytes of one compiled training step (XLA memory analysis)."""
    guide, state = result.guide, result.state
    model_r, guide_r = guide.bind(state)
    opt = optax.adam(1e-3)
    vg = ppl.value_and_grad(ppl.objectives.elbo, model_r, guide_r)

    def step(params, opt_state, key, x, y):
        _, g = vg(params, key, x, y)
        upd, opt_state = opt.update(jax.tree.map(jnp.negative, g), opt_state, params)
        return optax.apply_updates(params, upd), opt_state

    x = jnp.asarray(data["x_train"][:batch_size])
    y = jnp.asarray(data["y_train"][:batch_size])
    params = result.params
    lowered = jax.jit(step).lower(params, opt.init(params), jax.random.PRNGKey(0), x, y)
    mem = lowered.compile().memory_analysis()
    if mem is None:
        return -1
    return int(
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - getattr(mem, "alias_size_in_bytes", 0)
    )


def run_one(arch, density, steps, seed, kl_weight, lr, allocation="uniform"):
    data = bnn.load_digits(images=arch == "cnn")
    base = bnn.mlp if arch == "mlp" else bnn.cnn
    model = partial(base, kl_weight=kl_weight)
    dense_sites = ("first",) if arch == "cnn" and density < 1 else ()
    tic = time.perf_counter()
    result, best = bnn.fit(
        model,
        data,
        density=density,
        steps=steps,
        lr=lr,
        every=50,
        alpha=0.3,
        key=jax.random.PRNGKey(seed),
        eval_every=max(1, steps // 500),
        dense_sites=dense_sites,
        allocation=allocation,
    )
    wall = time.perf_counter() - tic
    idata = result.to_inference_data(
        key=jax.random.PRNGKey(100 + seed),
        num_samples=32,
        args=(jnp.asarray(data["x_test"]), jnp.asarray(data["y_test"])),
    )
    m = bnn.metrics(bnn.predictive_probs(idata), data["y_test"])
    rot = result.to_inference_data(
        key=jax.random.PRNGKey(200 + seed), num_samples=32, args=(jnp.asarray(data["x_rot"]),)
    )
    ood = bnn.metrics(bnn.predictive_probs(rot), np.zeros(len(data["x_rot"]), int))["entropy"]
    t = result.timing
    measured = max(1, steps - 50)  # the first block (50 steps) carries the compilation
    per_step = t["run_s"] / measured
    n_updates = sum(1 for h in result.history if "fraction" in h)
    state_bytes = _nbytes(result.params) + _nbytes(result.opt_state) + _nbytes(result.state.idx)
    return {
        "accuracy": m["accuracy"],
        "nll": m["nll"],
        "ece": m["ece"],
        "ood_entropy": ood,
        "epoch_s": per_step * STEPS_PER_EPOCH,
        "compile_s": t["compile_s"],
        "update_ms": 1e3 * t["update_s"] / max(1, n_updates - 1),
        "step_mem_mb": step_memory(result, data) / 2**20,
        "state_kb": state_bytes / 1024,
        "params": int(sum(np.size(v) for v in result.params.values())),
        "wall_s": wall,
        "val_accuracy": best["val_accuracy"],
    }


COLUMNS = [
    ("accuracy", "acc", "{:.4f}"),
    ("nll", "NLL", "{:.4f}"),
    ("ece", "ECE", "{:.4f}"),
    ("ood_entropy", "OOD H", "{:.3f}"),
    ("epoch_s", "s/epoch", "{:.4f}"),
    ("compile_s", "compile s", "{:.1f}"),
    ("update_ms", "update ms", "{:.1f}"),
    ("step_mem_mb", "step MB", "{:.2f}"),
    ("state_kb", "state KB", "{:.0f}"),
    ("params", "params", "{:d}"),
]


def table(arch, rows):
    dense = rows.get(1.0)
    head = "| density | " + " | ".join(c[1] for c in COLUMNS) + " | time ratio | mem ratio |"
    print(f"\n### {arch.upper()} (medians over seeds)\n")
    print(head)
    print("|" + "---|" * (len(COLUMNS) + 3))
    for density, r in rows.items():
        cells = [
            fmt.format(type(r[k])(r[k]) if k != "params" else int(r[k])) for k, _, fmt in COLUMNS
        ]
        tr = r["epoch_s"] / dense["epoch_s"] if dense else math.nan
        mr = r["step_mem_mb"] / dense["step_mem_mb"] if dense else math.nan
        label = "dense MFVI" if density == 1.0 else f"SSVI {density:g}"
        print(f"| {label} | " + " | ".join(cells) + f" | {tr:.2f} | {mr:.2f} |")
    if dense:
        for density, r in rows.items():
            if density < 1.0:
                drop = 100 * (dense["accuracy"] - r["accuracy"])
                print(
                    f"- density {density:g}: accuracy drop {drop:+.2f} points, state bytes "
                    f"{r['state_kb'] / dense['state_kb']:.3f}× dense"
                )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--arch", action="append", choices=("mlp", "cnn"), default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--kl-weight", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--densities", type=str, default=None, help="comma list")
    parser.add_argument(
        "--allocation",
        choices=("uniform", "erk"),
        default="uniform",
        help="per-layer density: uniform (default, the reference) or ERK (same total active "
        "count, small layers such as the 64→10 CNN head denser)",
    )
    opts = parser.parse_args(argv)
    archs = opts.arch or ["mlp", "cnn"]
    repeats = opts.repeats or (1 if opts.quick else 3)
    if opts.densities:
        densities = [float(d) for d in opts.densities.split(",")]
    else:
        densities = [1.0, 0.1] if opts.quick else [1.0, 0.5, 0.2, 0.1, 0.05]
    print(
        f"# SSVI benchmark (jax {jax.__version__}, {jax.default_backend()}, "
        f"{jax.device_count()} device(s)); β = {opts.kl_weight}, Adam {opts.lr}, batch 128, "
        f"allocation {opts.allocation}"
    )
    for arch in archs:
        steps = opts.steps or {("mlp", True): 300, ("cnn", True): 150}.get(
            (arch, opts.quick), 1500 if arch == "mlp" else 600
        )
        print(f"\n{arch}: {steps} steps ({steps / STEPS_PER_EPOCH:.0f} epochs), {repeats} seed(s)")
        rows = {}
        for density in densities:
            runs = [
                run_one(arch, density, steps, seed, opts.kl_weight, opts.lr, opts.allocation)
                for seed in range(repeats)
            ]
            rows[density] = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
            print(
                f"  density {density:g}: "
                + ", ".join(f"{k} {v:.4g}" for k, v in rows[density].items()),
                flush=True,
            )
        table(arch, rows)


if __name__ == "__main__":
    main()
