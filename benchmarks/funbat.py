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

Usage: ``python benchmarks/funbat.py [--quick] [--repeats N]``
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
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
            ("synthetic3", Matern(0.5, 0.2, 1.0), 60, 1, False, "0.135 (T9, local optimum)"),
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
        from dynamax.linear_gaussian_ssm import inference as lg  # noqa: F401
        from dynamax.linear_gaussian_ssm import parallel_inference as plg  # noqa: F401

        return lg, plg
    except Exception:
        return None


def smoother_scaling(repeats, quick):
    print("\n## 3. Smoother scaling (Matérn-3/2, irregular grid, float64)\n")
    dyn = _dynamax()
    note = "" if dyn else " (dynamax is not installed here: its columns are skipped)"
    print(f"Times: median of {repeats} steady-state calls; compile = first call.{note}\n")
    print(
        "| n | D | sequential (ms) | parallel (ms) | compile seq (s) | compile par (s) | "
        "max |Δ| seq vs par |"
    )
    print("|---|---|---|---|---|---|---|")
    ns = [100, 1000] if quick else [100, 1000, 10000, 100000]
    ranks = [1] if quick else [1, 3]
    for R in ranks:
        for n in ns:
            rng = np.random.default_rng(0)
            t = np.sort(rng.uniform(0, n / 10, n))
            sde = stack_sde(lti_sde(Matern(1.5, 1.0, 1.0)), R)
            A, Q = discretize(sde, t)
            lam = np.broadcast_to(np.eye(R) / 0.09, (n, R, R))
            eta = rng.normal(size=(n, R)) / 0.09
            out = {}
            for par in (False, True):
                f = jax.jit(functools.partial(kalman.smoother, parallel=par))
                res, first, med = _timed(lambda f=f: f(A, Q, sde.H, lam, eta), repeats)
                out[par] = (res, first, med)
            diff = max(
                float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(out[False][0], out[True][0], strict=True)
            )
            print(
                f"| {n} | {A.shape[-1]} | {1e3 * out[False][2]:.2f} | {1e3 * out[True][2]:.2f}"
                f" | {out[False][1]:.2f} | {out[True][1]:.2f} | {diff:.1e} |"
            )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one data set")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    accuracy(args.repeats, args.quick)
    dense_vs_kalman(args.repeats, args.quick)
    smoother_scaling(args.repeats, args.quick)


if __name__ == "__main__":
    main()
