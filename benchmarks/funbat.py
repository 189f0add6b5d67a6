"""FunBaT benchmarks (spec funbat.md §5): printed tables, medians over repeats, compile apart.

1. Accuracy on the spec's synthetic sets G(2,0) (ν=½, ℓ=0.2, 60 sweeps) and G(3,0) (ν=3/2,
   ℓ=0.3, best of 3 restarts): test RMSE/MAE against the oracle and the spec's [NUM]
   reference figures; fit time (first call, with compilation) and steady-state time.
2. CEP + Kalman against the same CEP with the dense-GP factor update (``smoother="dense"``).
3. Smoother scaling: ``ppl.inference.kalman.smoother`` sequential vs parallel (and dynamax's
   ``lgssm_smoother`` / ``parallel_inference.lgssm_smoother`` when dynamax is importable; it is
   not a dependency of ppl) for n unique indexes, state dimension D = R·d, float64.

The official PyTorch code is not run here (not installed; spec §5 B3), so the wall-time
comparison is against the dense-GP version of the same model.

Usage: ``python benchmarks/funbat.py [--quick] [--repeats N] [--only accuracy|dense|smoother]``
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

from ppl.inference import funbat, kalman  # noqa: E402
from ppl.models import funbat as fm  # noqa: E402
from ppl.transforms.state_space import Matern, discretize, lti_sde, stack_sde  # noqa: E402


def _timed(fn, repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return out, first, statistics.median(times)


def _metrics(res, d):
    mean, var = funbat.predict(res, d["test_indexes"])
    err = np.asarray(mean) - d["test_y"]
    cover = np.mean(np.abs(err) <= 1.96 * np.sqrt(np.asarray(var)))
    return np.sqrt(np.mean(err**2)), np.mean(np.abs(err)), cover


def accuracy(repeats, quick):
    print("\n## 1. Test accuracy on the spec's synthetic sets (CEP + Kalman, float64)\n")
    print(
        "| data | settings | oracle RMSE | test RMSE | spec ref. RMSE | test MAE | 95% cover "
        "| sweeps | first fit (s) | fit, median (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    cases = [("synthetic2", Matern(0.5, 0.2, 1.0), 60, 1, False, "0.1019 (T7)")]
    if not quick:
        cases += [
            ("synthetic2", Matern(0.5, 0.2, 1.0), 60, 1, True, "0.1016 (T10, D3+D4)"),
            ("synthetic3", Matern(0.5, 0.2, 1.0), 60, 1, False, "0.135 (T9: local opt.)"),
            ("synthetic3", Matern(1.5, 0.3, 1.0), 100, 3, False, "0.1054-0.1057 (T8)"),
        ]
    for name, kern, iters, restarts, compat, ref in cases:
        d = fm.load_default(name)
        model = functools.partial(fm.model, ranks=2, kernels=kern)
        cfg = funbat.FunBaTConfig(
            num_iters=iters, tol=0.0, num_restarts=restarts, reference_compat=compat
        )
        run = lambda: (
            funbat.fit(  # noqa: E731
                jax.random.PRNGKey(0), model, d["train_indexes"], d["train_y"], cfg
            ).state
        )
        _, first, med = _timed(run, repeats)
        res = funbat.fit(jax.random.PRNGKey(0), model, d["train_indexes"], d["train_y"], cfg)
        rmse, mae, cover = _metrics(res, d)
        oracle = np.sqrt(np.mean((d["test_f"] - d["test_y"]) ** 2))
        print(
            f"| {name} | ν={kern.nu}, ℓ={kern.lengthscale}, R=2, {restarts} restart(s) | "
            f"{oracle:.4f} | {rmse:.4f} | {ref} | {mae:.4f} | {cover:.3f} | {res.n_iter} | "
            f"{first:.2f} | {med:.3f} |"
        )


def dense_vs_kalman(repeats, quick):
    print("\n## 2. CEP with Kalman smoothing vs the same CEP with dense-GP factor updates\n")
    print("| data | unique idx / mode | smoother | train RMSE | first fit (s) | fit, median (s) |")
    print("|---|---|---|---|---|---|")
    d = fm.load_default("synthetic2")
    x, y = d["train_indexes"], d["train_y"]
    decimals = [None] if quick else [None, 2, 3]
    for dec in decimals:
        if dec is not None:  # finer grids: jittered indexes rounded to `dec` decimals
            rng = np.random.default_rng(0)
            x = np.clip(d["train_indexes"] + rng.uniform(-0.005, 0.005, x.shape), 0, 1)
            x = x.round(dec)
        model = functools.partial(fm.model, ranks=2, kernels=Matern(0.5, 0.2, 1.0))
        for sm in ("sequential", "parallel", "dense"):
            cfg = funbat.FunBaTConfig(num_iters=30, tol=0.0, smoother=sm)
            run = lambda: funbat.fit(jax.random.PRNGKey(0), model, x, y, cfg)  # noqa: E731
            res, first, med = _timed(lambda: run().state, repeats)
            rmse = float(np.sqrt(np.mean((np.asarray(res.pred) - y) ** 2)))
            nu = len(np.unique(x[:, 0]))
            print(
                f"| synthetic2 (30 sweeps) | {nu} | {sm} | {rmse:.5f} | {first:.2f} | {med:.3f} |"
            )


def _dynamax():
    try:
        from dynamax.linear_gaussian_ssm import inference as seq
        from dynamax.linear_gaussian_ssm import parallel_inference as par

        return seq, par
    except Exception:
        return None


def _dynamax_smoothers(dyn, A, Q, H, Pinf, R, y):
    """dynamax's sequential and parallel LGSSM smoothers on the same chain (time-varying
    parameters with a leading dimension n; entry t is the transition into step t, entry 0 is
    ignored, as in ``discretize``). Returns two jitted functions of ``y`` giving the smoothed
    means."""
    seq, par = dyn
    n, D = A.shape[0], A.shape[-1]
    p = H.shape[0]

    def params(weights, cov):
        return seq.ParamsLGSSM(
            initial=seq.ParamsLGSSMInitial(mean=jnp.zeros(D), cov=jnp.asarray(Pinf)),
            dynamics=seq.ParamsLGSSMDynamics(
                weights=weights, bias=jnp.zeros((n, D)), input_weights=jnp.zeros((n, D, 0)), cov=cov
            ),
            emissions=seq.ParamsLGSSMEmissions(
                weights=jnp.asarray(H), bias=jnp.zeros(p), input_weights=jnp.zeros((p, 0)), cov=R
            ),
        )

    A, Q, R = jnp.asarray(A), jnp.asarray(Q), jnp.asarray(R)
    into = params(A, Q)
    f_seq = jax.jit(lambda y: seq.lgssm_smoother(into, y).smoothed_means)
    f_par = jax.jit(lambda y: par.lgssm_smoother(into, y).smoothed_means)
    return f_seq, f_par


def smoother_scaling(repeats, quick):
    print("\n## 3. Smoother scaling (Matérn-3/2, irregular grid, float64)\n")
    dyn = _dynamax()
    note = "" if dyn else " dynamax is not installed here: its columns are skipped."
    print(
        f"Times: median of {repeats} steady-state calls; compile = first call minus one run.{note}"
    )
    if dyn:
        print(
            "dynamax 1.0.3 (`lgssm_smoother`, `parallel_inference.lgssm_smoother`) is run at "
            "n <= 10^4 (at 10^5 its parallel smoother did not finish in 9 minutes, spec §5)."
        )
    print()
    print(
        "| n | D | ours seq (ms) | ours par (ms) | dynamax seq (ms) | dynamax par (ms) | "
        "compile ours seq / par (s) | compile dynamax seq / par (s) | max |Δ mean| |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    ns = [100, 1000] if quick else [100, 1000, 10000, 100000]
    ranks = [1] if quick else [1, 3]
    for R in ranks:
        for n in ns:
            rng = np.random.default_rng(0)
            t = np.sort(rng.uniform(0, n / 10, n))
            sde = stack_sde(lti_sde(Matern(1.5, 1.0, 1.0)), R)
            A, Q = discretize(sde, t)
            lam = np.broadcast_to(np.eye(R) / 0.09, (n, R, R))
            y = rng.normal(size=(n, R))
            eta = y / 0.09
            runs = {}
            for par in (False, True):
                f = jax.jit(functools.partial(kalman.smoother, parallel=par))
                res, first, med = _timed(lambda f=f: f(A, Q, sde.H, lam, eta), repeats)
                runs[f"ours {par}"] = (res[0], first - med, med)
            if dyn and n <= 10000:
                f_seq, f_par = _dynamax_smoothers(dyn, A, Q, sde.H, sde.Pinf, 0.09 * np.eye(R), y)
                for name, f in (("dyn False", f_seq), ("dyn True", f_par)):
                    res, first, med = _timed(lambda f=f: f(y), repeats)
                    runs[name] = (res, first - med, med)
            ref = np.asarray(runs["ours False"][0])
            diff = max(float(np.abs(np.asarray(v[0]) - ref).max()) for v in runs.values())
            cell = lambda k, i, s=1e3: f"{s * runs[k][i]:.2f}" if k in runs else "—"  # noqa: E731
            print(
                f"| {n} | {A.shape[-1]} | {cell('ours False', 2)} | {cell('ours True', 2)} | "
                f"{cell('dyn False', 2)} | {cell('dyn True', 2)} | "
                f"{cell('ours False', 1, 1)} / {cell('ours True', 1, 1)} | "
                f"{cell('dyn False', 1, 1)} / {cell('dyn True', 1, 1)} | {diff:.1e} |"
            )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one data set")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=("accuracy", "dense", "smoother"), default=None)
    args = ap.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    if args.only in (None, "accuracy"):
        accuracy(args.repeats, args.quick)
    if args.only in (None, "dense"):
        dense_vs_kalman(args.repeats, args.quick)
    if args.only in (None, "smoother"):
        smoother_scaling(args.repeats, args.quick)


if __name__ == "__main__":
    main()
