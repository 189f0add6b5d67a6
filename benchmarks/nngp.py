"""NNGP benchmarks: scale mixtures of neural-network Gaussian processes (issue 7).

Spec: ``../shared/specs/nngp.md`` (§5 B1-B3, §1.3-1.5). Printed markdown tables:

* **B1: regression** on scikit-learn ``load_diabetes`` with the spec's fixed protocol (X, y
  standardised; 353/89 split by ``default_rng(0).permutation``; ReLU depth 2, σ_w² = 2,
  σ_b² = 0.1, τ² = 0.1; variants clean / outliers / OOD(BMI), ``ppl.models.nngp.
  load_default``): test RMSE and NLL of the plain NNGP (σ² = β/N plug-in), the Student-t
  process (IG(2, 2), closed form), Burr XII(2, 2) (Gauss-Hermite, 32 nodes) and, as an extra
  column, a half-Cauchy on σ -- next to the spec's [NUM] table with the difference (goal:
  1e-3). Then the **paper protocol**: σ_w, σ_b, τ² (and a, b for the TP; σ_v² for the NNGP)
  by marginal likelihood (``fit_hyperparameters``, Adam 1e-2), n_train ∈ {30, 100, 353};
  the winner per row is reported, nothing asserted (the robustness claim is unverified).
* **B2: classification** on scikit-learn ``load_digits``: sparse variational GP vs
  Student-t process (IG(2, 2) prior, inverse-gamma q(σ²)) through
  ``ppl.models.nngp.classification`` + ``classification_guide`` trained by
  ``ppl.inference.SVI``: accuracy, NLL, ECE (15 equal-width bins, top label) on the clean and
  salt-and-pepper test sets, and (classes {1, 4, 8} dropped from training) the predictive
  entropy on the held-out classes.
* **B3: kernel speed**: ``kernel_fn`` of a ReLU depth-3 MLP (d = 20) for n = 1000...8000 in
  float32 and float64 against a plain NumPy implementation of the same recursion written
  here (max |difference| printed; goal 1e-6 in float64), first call (compile) and steady
  time (median) apart; the n = 20 000 row-batched kernel (a subprocess: time and peak
  memory); a depth-4 CNN-GP on 1000 digits (goal ≤ 10 s).
* **General-prior fit time** vs Gauss-Hermite nodes (8, 16, 32, 64) and importance samples
  (250, 1000, 4000) on the B1 data: time and log-evidence error against the closed form
  (IG(2, 2)), and against GH-128 for Burr XII(2, 2).

neural-tangents does not import on jax 0.10 (spec §0), so there is no neural-tangents
column. Nothing here is CPU-specific: on a GPU the same script runs as it is (the header
names the backend; the n = 20 000 row then reports the device's peak memory).

Run: ``python benchmarks/nngp.py`` (full), ``--quick`` (a smoke run, < 3 min on 2 cores),
``--only b1|paper|b2|b3|fit`` (repeatable), ``--single-thread`` (XLA on one thread too: a
like-for-like NumPy comparison), ``--hp-steps N`` (paper-protocol Adam steps),
``--epochs N`` (B2), ``--repeats N`` (timings), ``--b2-net mlp|cnn``.
"""

from __future__ import annotations

import os
import sys

# OpenBLAS (NumPy's and SciPy's; jaxlib's CPU Cholesky/LAPACK calls go through it) spins its
# worker threads: on this loaded 2-core machine a 353×353 float64 Cholesky took 30 ms with
# the default threads and 1.7 ms with one (the gradient 117 ms vs 11 ms), so one BLAS thread
# is both faster and fairer. XLA's own thread pool still uses every core unless
# --single-thread is given (then NumPy and XLA both run on one core).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
if "--single-thread" in sys.argv:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    ).strip()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro.distributions as dist  # noqa: E402

from ppl.transforms.nngp import (  # noqa: E402
    Conv,
    Dense,
    Flatten,
    Relu,
    kernel_fn,
    serial,
    unit_scale,
)

#: spec §5 B1 [NUM]: variant -> (RMSE, NNGP NLL, TP IG(2,2) NLL, Burr(2,2) NLL (GH-32)).
B1_NUM = {
    "clean": (0.7497, 1.1309, 1.1306, 1.1315),
    "outliers": (0.9650, 1.5726, 1.5699, 1.5660),
    "ood": (0.8063, 1.2317, 1.2319, 1.2322),
}
B1_LABEL = {"clean": "clean", "outliers": "outliers (5 %)", "ood": "OOD (BMI)"}
W_VAR, B_VAR, NOISE = 2.0, 0.1, 0.1  # the B1 protocol
#: spec §5 B3 [NUM] (pure JAX, 2-core CPU): n = 2000, d = 20, ReLU depth 3.
B3_NUM = {"float64": (0.82, 1.9), "float32": (0.48, None)}
NT_LINE = (
    "neural-tangents: not measured -- `import neural_tangents` fails on jax 0.10 "
    "(ImportError: cannot import name 'Jaxpr' from 'jax.core'; spec §0), so there is no "
    "neural-tangents column; a cross-check needs a separate old-JAX environment."
)


from _report import fmt, header, machine_line, sci, secs, steady, table, timed  # noqa: E402


def mlp(depth, w_var=W_VAR, b_var=B_VAR):
    hidden = []
    for _ in range(depth):
        hidden += [Dense(W_std=math.sqrt(w_var), b_std=math.sqrt(b_var)), Relu()]
    return serial(*hidden, Dense())


def cnn(depth, w_var=W_VAR, b_var=B_VAR):
    hidden = []
    for _ in range(depth):
        hidden += [Conv(W_std=math.sqrt(w_var), b_std=math.sqrt(b_var)), Relu()]
    return serial(*hidden, Flatten(), Dense())


# ------------------------------------------------------------------------------ B1


def _b1_data():
    from ppl.models.nngp import load_default

    return {v: load_default(v) for v in B1_NUM}


def _score(pred, y):
    """(RMSE of the predictive mean, mean test NLL) of a Predictive of y*."""
    rmse = float(np.sqrt(np.mean((np.asarray(pred.mean) - y) ** 2)))
    return rmse, float(-np.mean(pred.log_prob(y)))


def b1_fixed(data):
    from ppl.distributions import BurrXII, HalfCauchyScale
    from ppl.inference import nngp as inf

    net = mlp(2)
    rows, worst = [], 0.0
    start = time.perf_counter()
    for v, d in data.items():
        x, y, xt, yt = d["x_train"], d["y_train"], d["x_test"], d["y_test"]
        tp = inf.fit(net, x, y, prior=dist.InverseGamma(2.0, 2.0), noise=NOISE, method="closed")
        plug = float(tp.beta) / float(tp.num_obs)  # σ̂² = β/N
        fits = {
            "nngp": inf.fit(net, x, y, prior=dist.Delta(plug), noise=NOISE),
            "tp": tp,
            "burr": inf.fit(net, x, y, prior=BurrXII(2.0, 2.0), noise=NOISE, num_nodes=32),
            "hc": inf.fit(net, x, y, prior=HalfCauchyScale(1.0), noise=NOISE, num_nodes=32),
        }
        sc = {k: _score(inf.predict(p, xt), yt) for k, p in fits.items()}
        rmses = [s[0] for s in sc.values()]
        assert max(rmses) - min(rmses) < 1e-9, "the predictive mean must be prior-independent"
        ref = B1_NUM[v]
        got = (sc["tp"][0], sc["nngp"][1], sc["tp"][1], sc["burr"][1])
        diffs = [g - r for g, r in zip(got, ref, strict=True)]
        worst = max(worst, max(abs(t) for t in diffs))
        rows.append(
            [B1_LABEL[v], f"{len(y)}/{len(yt)}"]
            + [f"{fmt(g)} ({r:.4f}, {t:+.1e})" for g, r, t in zip(got, ref, diffs, strict=True)]
            + [fmt(sc["hc"][1]), f"{plug:.3f}", f"{float(tp.mean_scale):.3f}"]
        )
    total = time.perf_counter() - start
    header(
        "B1: diabetes regression, fixed hyperparameters (spec §5 B1 protocol)",
        [
            "scikit-learn load_diabetes, X and y standardised (442 rows), split 353/89 by "
            "default_rng(0).permutation; outliers: 18 training targets shifted by ±U(4, 8) sd; "
            "OOD: train on BMI ≤ its 80th percentile, test on the rest. ReLU MLP depth 2, "
            "σ_w² = 2, σ_b² = 0.1, unit readout, τ² = 0.1 on the scale (y | σ² ~ N(0, σ²(K + "
            "τ²I))). Test NLL = mean −log p(y*) in standardised units (predictive of y*, τ² "
            "included).",
            "Cells: ppl (spec [NUM], ppl − spec). NNGP: σ² = β/N plug-in (Delta prior); TP: "
            "IG(2, 2), fit(method='closed') (exact Student-t); Burr XII(2, 2) and half-Cauchy "
            "on σ (scale 1): fit(method='gh', 32 nodes). RMSE is the same for every prior "
            "(μ* is prior-independent; checked).",
        ],
    )
    table(
        [
            "variant",
            "n train/test",
            "RMSE",
            "NNGP NLL",
            "TP IG(2,2) NLL",
            "Burr(2,2) NLL",
            "half-Cauchy NLL",
            "σ̂² = β/N",
            "E[σ²|y] (TP)",
        ],
        rows,
    )
    ok = "PASS" if worst <= 1e-3 else "FAIL"
    print(f"\nLargest |ppl − spec| = {worst:.1e} (goal ≤ 1e-3: {ok}); {total:.1f} s in all.")


def b1_paper(data, sizes, steps_for, variants):
    from ppl.distributions import BurrXII
    from ppl.inference import nngp as inf

    if not hasattr(inf, "fit_hyperparameters"):
        header(
            "B1 (paper protocol): skipped", ["ppl.inference.nngp.fit_hyperparameters is missing."]
        )
        return
    net = mlp(2)
    init = dict(W_std=math.sqrt(W_VAR), b_std=math.sqrt(B_VAR), noise=NOISE)
    models = {
        "NNGP": (None, dict(init, scale=1.0)),
        "TP": (dist.InverseGamma(2.0, 2.0), dict(init, a=2.0, b=2.0)),
        "Burr": (BurrXII(2.0, 2.0), init),
    }
    rows = []
    start = time.perf_counter()
    for v in variants:
        d = data[v]
        xt, yt = d["x_test"], d["y_test"]
        for n in sizes:
            n_eff = min(n, len(d["y_train"]))
            x, y = d["x_train"][:n_eff], d["y_train"][:n_eff]
            steps = steps_for(n_eff)
            res, drift, took = {}, [], []
            for name, (prior, ini) in models.items():
                t0 = time.perf_counter()
                hp = inf.fit_hyperparameters(net, x, y, prior=prior, init=ini, steps=steps, lr=1e-2)
                took.append(time.perf_counter() - t0)
                losses = np.asarray(hp.losses)
                tail = max(1, steps // 10)
                drift.append(abs(losses[-1] - losses[-1 - tail]) if steps > tail else np.nan)
                if prior is None:
                    post = inf.fit(
                        hp.net, x, y, prior=dist.Delta(hp.params["scale"]), noise=hp.noise
                    )
                elif isinstance(prior, dist.InverseGamma):
                    post = inf.fit(hp.net, x, y, prior=hp.prior, noise=hp.noise, method="closed")
                else:
                    post = inf.fit(hp.net, x, y, prior=prior, noise=hp.noise, num_nodes=32)
                res[name] = (*_score(inf.predict(post, xt), yt), hp)
            win = min(res, key=lambda k: res[k][1])
            tp = res["TP"][2].params
            rows.append(
                [B1_LABEL[v], n_eff, steps]
                + [f"{fmt(res[k][0], 3)} / {fmt(res[k][1], 3)}" for k in models]
                + [
                    f"**{win}**",
                    f"{tp['a']:.3g}, {tp['b']:.3g}",
                    f"{res['NNGP'][2].noise:.3g}, {tp['noise']:.3g}, {res['Burr'][2].noise:.3g}",
                    sci(float(np.nanmax(drift))),
                    f"{sum(took):.0f} s",
                ]
            )
    total = time.perf_counter() - start
    header(
        "B1 (paper protocol): hyperparameters by marginal likelihood",
        [
            "fit_hyperparameters (Adam lr 1e-2 on log-parameters, −log p(y)/N, fixed number of "
            "steps, no validation split or plateau schedule) from the B1 values σ_w² = 2, "
            "σ_b² = 0.1, τ² = 0.1 (a = b = 2, σ_v² = 1). NNGP: learns σ_v² (plain GP "
            "evidence); TP: learns a, b too (σ_v = 1, spec D2; exact evidence); Burr XII(2, 2): "
            "fixed prior, GH-32 evidence. n train = the first n rows of the B1 training split "
            "(outliers stay among them); test = the full B1 test split.",
            "Cells: test RMSE / NLL with the fitted hyperparameters (the predictive of each "
            "model's own fit). Winner = lowest NLL; reported, not asserted. Δloss = largest "
            "change of −log p(y)/N over the last 10 % of the steps (a convergence check).",
        ],
    )
    table(
        [
            "variant",
            "n",
            "steps",
            "NNGP",
            "TP",
            "Burr(2,2)",
            "winner (NLL)",
            "TP a, b",
            "τ² (NNGP, TP, Burr)",
            "Δloss",
            "time",
        ],
        rows,
    )
    print(
        f"\nPaper-protocol wall time {total:.0f} s (compile included: each fit compiles its scan)."
    )


# ------------------------------------------------------------------------------ B2


def _entropy(p):
    p = np.asarray(p, np.float64)
    return float(np.mean(-np.sum(p * np.log(np.clip(p, 1e-300, None)), axis=1)))


def b2(epochs, net_kind, variants):
    try:
        import optax

        import ppl
        from ppl.inference import SVI
        from ppl.models import nngp as m

        for name in (
            "classification",
            "classification_guide",
            "classification_predict",
            "classification_metrics",
            "load_digits_split",
        ):
            getattr(m, name)
    except (ImportError, AttributeError) as err:
        header("B2: classification on digits -- NOT RUN", [f"The model is not ready: {err!r}."])
        return

    depth = 2
    net = cnn(depth) if net_kind == "cnn" else mlp(depth)
    images = net_kind == "cnn"
    models = {"SVGP": None, "SVTP": dist.InverseGamma(2.0, 2.0)}
    clean = m.load_digits_split("clean", images=images)
    noisy = m.load_digits_split("noise", images=images)
    assert np.array_equal(clean["y_test"], noisy["y_test"])
    results = {}
    start = time.perf_counter()
    for variant in variants:
        d = clean if variant == "clean" else m.load_digits_split("ood", images=images)
        x, y = jnp.asarray(d["x_train"]), jnp.asarray(d["y_train"])
        n = x.shape[0]
        steps_per_epoch = n // 100
        for name, prior in models.items():
            svi = SVI(
                m.classification, m.classification_guide, optax.adam(1e-2), ppl.objectives.elbo
            )
            kw = dict(net=net, num_classes=10, inducing=x[:100], scale_prior=prior, batch_size=100)
            key = jax.random.PRNGKey(0)
            # one epoch first: its time is mostly the compile of the scanned chunk
            t0 = time.perf_counter()
            res = svi.run(key, steps_per_epoch, x, y, progress_bar=False,
                          chunk_size=steps_per_epoch, **kw)  # fmt: skip
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            if epochs > 1:
                res = svi.run(key, steps_per_epoch * (epochs - 1), x, y, progress_bar=False,
                              chunk_size=steps_per_epoch, init_state=res.state, **kw)  # fmt: skip
            train = time.perf_counter() - t0
            # one predict call over every test input of this model (the call compiles once)
            tests = [d["x_test"]] + ([noisy["x_test"]] if variant == "clean" else [])
            xt = np.concatenate(tests)
            t0 = time.perf_counter()
            probs = np.asarray(
                m.classification_predict(
                    res.params,
                    xt,
                    net=net,
                    scale_prior=prior,
                    num_samples=256,
                    batch_size=xt.shape[0],
                )  # fmt: skip
            )
            pred_t = time.perf_counter() - t0
            nt = d["x_test"].shape[0]
            out = {"first": first, "train": train, "pred": pred_t, "loss": float(np.mean(
                np.asarray(res.losses)[-steps_per_epoch:]))}  # fmt: skip
            if prior is not None:
                a_q, b_q = float(res.params["scale_a"]), float(res.params["scale_b"])
                out["q"] = (a_q, b_q)
            if variant == "clean":
                out["clean"] = m.classification_metrics(probs[:nt], d["y_test"])
                out["noise"] = m.classification_metrics(probs[nt:], noisy["y_test"])
            else:
                ood = d["ood_mask"]
                out["in"] = m.classification_metrics(probs[:nt][~ood], d["y_test"][~ood])
                out["ent_in"] = _entropy(probs[:nt][~ood])
                out["ent_ood"] = _entropy(probs[:nt][ood])
                out["n_ood"] = int(ood.sum())
            results[(variant, name)] = out
    total = time.perf_counter() - start

    arch = (
        f"CNN-GP (depth {depth}, 3×3 SAME conv, ReLU, Flatten readout)"
        if images
        else f"MLP-GP (ReLU depth {depth})"
    )
    header(
        "B2: digits classification, SVGP vs SVTP (spec §5 B2, scaled to CPU)",
        [
            f"scikit-learn load_digits (1797 × 8×8, /16), default_rng(0) split 1438/359; "
            f"{arch}, σ_w² = 2, σ_b² = 0.1; 100 inducing inputs (learned, initialised at the "
            f"first 100 training rows), batch 100, Adam 1e-2, {epochs} epoch(s) "
            f"(spec: 50); ppl.inference.SVI with ppl.objectives.elbo (ONE sample per step; "
            "spec: S = 16 -- the model does not run under ppl.particles, see the report); "
            "256 test draws. SVTP: IG(2, 2) prior, q(σ²) = IG(a_q, b_q) learned; SVGP: σ² = 1.",
            "Metrics: accuracy, NLL (mean −log p(y)), ECE (15 equal-width bins of the top-label "
            "probability); noise = salt-and-pepper on 10 % of the test pixels (default_rng(0)), "
            "scored by the models trained on the clean split.",
        ],
    )
    rows = []
    for name in models:
        r = results.get(("clean", name))
        if r is None:
            continue
        c, s = r["clean"], r["noise"]
        q = f"{r['q'][1] / (r['q'][0] - 1):.3g} (a_q {r['q'][0]:.3g})" if "q" in r else "1 (fixed)"
        rows.append(
            [
                name,
                f"{c['accuracy']:.3f}",
                f"{c['nll']:.3f}",
                f"{c['ece']:.3f}",
                f"{s['accuracy']:.3f}",
                f"{s['nll']:.3f}",
                f"{s['ece']:.3f}",
                q,
                f"{r['loss']:.4g}",
                f"{r['first']:.1f} s + {r['train']:.1f} s",
                f"{r['pred']:.1f} s",
            ]
        )
    if rows:
        table(
            [
                "model",
                "clean acc",
                "clean NLL",
                "clean ECE",
                "noise acc",
                "noise NLL",
                "noise ECE",
                "E_q[σ²]",
                "final −ELBO (epoch mean)",
                "train: 1st epoch (compile) + rest",
                "predict (compile incl.)",
            ],
            rows,
        )
        g, t = results[("clean", "SVGP")]["clean"], results[("clean", "SVTP")]["clean"]
        print(
            f"\nGoals (unmeasured in the spec): clean accuracy ≥ 0.95: SVGP {g['accuracy']:.3f}, "
            f"SVTP {t['accuracy']:.3f}; SVTP NLL ≤ SVGP NLL + 0.02: "
            f"{'yes' if t['nll'] <= g['nll'] + 0.02 else 'no'} ({t['nll']:.3f} vs {g['nll']:.3f})."
        )
    rows = []
    for name in models:
        r = results.get(("ood", name))
        if r is None:
            continue
        i = r["in"]
        rows.append(
            [
                name,
                f"{i['accuracy']:.3f}",
                f"{i['nll']:.3f}",
                f"{i['ece']:.3f}",
                f"{r['ent_in']:.3f}",
                f"{r['ent_ood']:.3f}",
                f"{r['first']:.1f} s + {r['train']:.1f} s",
            ]
        )
    if rows:
        print(
            "\nOOD: classes {1, 4, 8} dropped from training (the 10-way model is kept); test "
            f"rows of those classes: {results[('ood', 'SVGP')]['n_ood']}. Higher entropy on "
            f"them is better (max ln 10 = {math.log(10):.3f}).\n"
        )
        table(
            [
                "model",
                "in-dist acc",
                "in-dist NLL",
                "in-dist ECE",
                "entropy in-dist",
                "entropy OOD {1,4,8}",
                "train time",
            ],
            rows,
        )
    elif "ood" not in variants:
        print("\nOOD variant skipped (--quick).")
    print(f"\nB2 wall time {total:.0f} s.")


# ------------------------------------------------------------------------------ B3


def numpy_relu_kernel(x1, x2, depth, w_var=W_VAR, b_var=B_VAR):
    """The NNGP kernel of [Dense(σ_w, σ_b) → ReLU] × depth → Dense(1) readout (unit scale),
    in plain NumPy at the dtype of ``x1`` (spec §1.1): K⁰ = σ_w²·x·x'/d + σ_b²; E = the
    arc-cosine kernel √(k₁k₂)/(2π)·(sin θ + (π − θ) cos θ); K = σ_w²E + σ_b²; readout E^L."""
    dt = x1.dtype
    x2 = x1 if x2 is None else x2
    d = x1.shape[1]
    cov = (x1 @ x2.T) / dt.type(d)
    v1 = np.sum(x1 * x1, 1) / dt.type(d)
    v2 = np.sum(x2 * x2, 1) / dt.type(d)
    w, b = dt.type(w_var), dt.type(b_var)
    for _ in range(depth):
        cov = w * cov + b
        v1, v2 = w * v1 + b, w * v2 + b
        norm = np.sqrt(np.outer(v1, v2))
        c = np.clip(cov / norm, -1, 1)
        theta = np.arccos(c)
        cov = norm / dt.type(2 * np.pi) * (np.sqrt(1 - c * c) + (dt.type(np.pi) - theta) * c)
        v1, v2 = v1 / 2, v2 / 2
    return cov


def b3_mlp(sizes, repeats, depth=3, d=20):
    net = unit_scale(mlp(depth))
    k = kernel_fn(net)
    rows = []
    ref64 = {}
    rng = np.random.default_rng(0)
    x_all = rng.standard_normal((max(sizes), d))
    for dtype in ("float64", "float32"):
        for n in sizes:
            x = x_all[:n].astype(dtype)
            xj = jax.device_put(jnp.asarray(x))
            kj, first = timed(k, xj)
            t_jax, calls, kj = steady(lambda xj=xj: k(xj), repeats)
            t_np, np_calls, kn = steady(
                lambda x=x: numpy_relu_kernel(x, None, depth), repeats, budget=8.0
            )
            kj = np.asarray(kj)
            assert kj.dtype == np.dtype(dtype), "kernel_fn must preserve the dtype"
            diff = float(np.max(np.abs(kj - kn)))
            if dtype == "float64":
                ref64[n] = kn
                d64 = diff
            else:
                d64 = float(np.max(np.abs(kj.astype(np.float64) - ref64[n])))
            ok = "" if dtype == "float32" else (" ✓" if diff <= 1e-6 else " ✗")
            rows.append(
                [
                    dtype,
                    n,
                    secs(first),
                    f"{secs(t_jax)} ({calls})",
                    f"{secs(t_np)} ({np_calls})",
                    f"{t_np / t_jax:.2g}×",
                    sci(diff) + ok,
                    sci(d64),
                ]
            )
            del kj, kn
    header(
        f"B3: NNGP kernel time, ReLU MLP depth {depth}, d = {d} (K(X, X), n × n)",
        [
            machine_line(),
            "ppl: kernel_fn(unit_scale(net))(x) on a device array (jit-compiled inside "
            "kernel_fn, blocked until ready); 1st call = trace + compile + run. Steady = median "
            "of (calls) further calls. NumPy: the same recursion written in this script "
            "(numpy_relu_kernel), same dtype, single-threaded (OPENBLAS_NUM_THREADS=1; NumPy "
            "elementwise ops are single-threaded anyway). x ~ N(0, 1) (default_rng(0)); σ_w² = "
            "2, σ_b² = 0.1, unit readout.",
            f"Spec [NUM] (pure JAX, 2-core CPU, n = 2000): {B3_NUM['float64'][0]} s float64 "
            f"steady ({B3_NUM['float64'][1]} s first call), {B3_NUM['float32'][0]} s float32; "
            "goal ≤ 1.0 s in float64.",
            NT_LINE,
        ],
    )
    table(
        [
            "dtype",
            "n",
            "ppl 1st call",
            "ppl steady (calls)",
            "NumPy (calls)",
            "NumPy / ppl",
            "max |ppl − NumPy| (same dtype)",
            "max |ppl − NumPy float64|",
        ],
        rows,
    )
    goal = [r for r in rows if r[0] == "float64" and r[1] == 2000]
    if goal:
        print(f"\nn = 2000 float64 steady: {goal[0][3]} (goal ≤ 1.0 s).")


def _memory_mb():
    """``(current RSS, peak RSS)`` of this process in MiB: VmRSS/VmHWM from /proc (reset at
    exec, unlike ``ru_maxrss``, which a child inherits from its parent across exec on Linux),
    else ``ru_maxrss`` for both."""
    try:
        with open("/proc/self/status") as fh:
            st = dict(line.split(":", 1) for line in fh if ":" in line)
        return int(st["VmRSS"].split()[0]) / 1024, int(st["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return peak, peak


def _big_worker(n, batch, dtype, depth=3, d=20):
    """Run in a subprocess: the row-batched kernel at n rows; prints one JSON line."""
    rss0, _ = _memory_mb()
    x = np.random.default_rng(0).standard_normal((n, d)).astype(dtype)
    k = kernel_fn(unit_scale(mlp(depth)))
    xj = jax.device_put(jnp.asarray(x))
    out, dt = timed(lambda: k(xj, batch_size=batch))
    rows = np.random.default_rng(1).choice(n, 5, replace=False)
    ref = numpy_relu_kernel(x[rows].astype(np.float64), x.astype(np.float64), depth)
    diff = float(np.max(np.abs(np.asarray(out[rows]).astype(np.float64) - ref)))
    info = {
        "time": dt,
        "shape": list(out.shape),
        "dtype": str(out.dtype),
        "rss_start_mb": rss0,
        "rss_peak_mb": _memory_mb()[1],
        "max_diff_rows": diff,
    }
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    if stats and "peak_bytes_in_use" in stats:
        info["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
    print(json.dumps(info))


def b3_big(n, batch, dtype, skip):
    header(
        f"B3: row-batched kernel, n = {n}, d = 20, ReLU depth 3, {dtype}",
        [
            f"kernel_fn(net)(x, batch_size={batch}) in a fresh subprocess (so the peak resident "
            "memory is this call's alone); the first call (compile included; there is only "
            f"one). Output {n}×{n} {dtype} = {n * n * np.dtype(dtype).itemsize / 2**30:.2f} GiB. "
            "Checked on 5 random rows against NumPy float64. Spec goal: within 4 GB.",
        ],
    )
    if skip:
        print("Skipped (--quick).")
        return
    cmd = [sys.executable, __file__, "--_big", str(n), "--_batch", str(batch), "--_dtype", dtype]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"FAILED (exit {proc.returncode}, {wall:.0f} s): {proc.stderr.strip()[-600:]}")
        return
    info = json.loads(lines[-1])
    dev = f"{info['device_peak_mb'] / 1024:.2f} GiB" if "device_peak_mb" in info else "–"
    table(
        [
            "time (1st call)",
            "peak RSS (process)",
            "RSS before the call",
            "device peak",
            "max |Δ| vs NumPy f64 (5 rows)",
            "subprocess wall",
        ],  # fmt: skip
        [
            [
                secs(info["time"]),
                f"{info['rss_peak_mb'] / 1024:.2f} GiB",
                f"{info['rss_start_mb'] / 1024:.2f} GiB",
                dev,
                sci(info["max_diff_rows"]),
                f"{wall:.0f} s",
            ]
        ],
    )


def b3_cnn(n, repeats, dtypes, depth=4):
    from sklearn.datasets import load_digits

    x = (np.asarray(load_digits().data, np.float64) / 16.0)[:n].reshape(n, 8, 8, 1)
    k = kernel_fn(unit_scale(cnn(depth)))
    rows = []
    for dtype in dtypes:
        xj = jax.device_put(jnp.asarray(x.astype(dtype)))
        kk, first = timed(k, xj)
        t, calls, kk = steady(lambda xj=xj: k(xj), repeats, budget=20.0)
        kk = np.asarray(kk)
        ev_min = float(np.linalg.eigvalsh(kk.astype(np.float64))[0]) / float(np.trace(kk))
        rows.append([dtype, n, secs(first), f"{secs(t)} ({calls})", sci(ev_min)])
    header(
        f"B3: CNN-GP kernel, depth {depth}, {n} digits (8×8×1)",
        [
            f"[Conv 3×3 SAME (σ_w² = 2, σ_b² = 0.1) → ReLU] × {depth} → Flatten → Dense, "
            f"K(X, X) {n}×{n} (same-position covariances, [n, n, 8, 8] per layer). Spec goal ≤ "
            "10 s. λ_min/trace: a PSD check.",
        ],
    )
    table(["dtype", "n", "1st call", "steady (calls)", "λ_min / tr K"], rows)


# ------------------------------------------------------------------------------ fit time


def fit_time(node_list, sample_list, is_repeats, repeats, nuts):
    from ppl.distributions import BurrXII
    from ppl.inference import nngp as inf
    from ppl.models.nngp import load_default

    d = load_default("clean")
    x, y = d["x_train"], d["y_train"]
    net = mlp(2)
    ig = dist.InverseGamma(2.0, 2.0)
    burr = BurrXII(2.0, 2.0)
    closed, t_closed_first = timed(
        lambda: inf.fit(net, x, y, prior=ig, noise=NOISE, method="closed")
    )
    t_closed, _, closed = steady(
        lambda: inf.fit(net, x, y, prior=ig, noise=NOISE, method="closed"), repeats
    )
    le_ref, es_ref = float(closed.log_evidence), float(closed.mean_scale)
    burr_ref = inf.fit(net, x, y, prior=burr, noise=NOISE, num_nodes=128)
    bl_ref, bs_ref = float(burr_ref.log_evidence), float(burr_ref.mean_scale)

    def stats_only():
        return inf.fit(net, x, y, prior=dist.Delta(1.0), noise=NOISE)

    _, t_stats_first = timed(stats_only)
    t_stats, _, _ = steady(stats_only, repeats)
    rows = [
        [
            "Delta(1) (Gaussian stats only)",
            "–",
            secs(t_stats_first),
            secs(t_stats),
            "–",
            "–",
            "–",
            "–",
        ],
        ["closed (IG)", "–", secs(t_closed_first), secs(t_closed), "0 (ref)", "0 (ref)", "–", "–"],
    ]
    for m_nodes in node_list:
        for label, prior, lref, sref in (("IG(2,2)", ig, le_ref, es_ref),
                                         ("Burr(2,2)", burr, bl_ref, bs_ref)):  # fmt: skip

            def call(prior=prior, m_nodes=m_nodes):
                return inf.fit(net, x, y, prior=prior, noise=NOISE, num_nodes=m_nodes)

            post, first = timed(call)
            t, _, post = steady(call, repeats)
            rows.append(
                [
                    f"gh, {m_nodes} nodes",
                    label,
                    secs(first),
                    secs(t),
                    sci(abs(float(post.log_evidence) - lref)),
                    sci(abs(float(post.mean_scale) - sref) / sref),
                    "–",
                    "–",
                ]
            )
    for num in sample_list:
        for label, prior, lref, sref in (("IG(2,2)", ig, le_ref, es_ref),
                                         ("Burr(2,2)", burr, bl_ref, bs_ref)):  # fmt: skip
            errs, serr, ess, times, first = [], [], [], [], None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for r in range(is_repeats):
                    post, dt = timed(lambda r=r, prior=prior, num=num: inf.fit(
                        net, x, y, prior=prior, noise=NOISE, method="is", num_samples=num,
                        key=jax.random.PRNGKey(7000 + r)))  # fmt: skip
                    if first is None:
                        first = dt
                    else:
                        times.append(dt)
                    errs.append(float(post.log_evidence) - lref)
                    serr.append(abs(float(post.mean_scale) - sref) / sref)
                    ess.append(float(post.ess))
            rows.append(
                [
                    f"is (t₄), {num} draws",
                    label,
                    secs(first),
                    secs(float(np.median(times)) if times else None),
                    f"{np.mean(errs):+.1e} ± {np.std(errs):.1e}",
                    sci(float(np.mean(serr))),
                    f"{np.mean(ess):.0f} ({100 * np.mean(ess) / num:.0f} %)",
                    is_repeats,
                ]
            )
    if nuts:
        try:
            key = jax.random.PRNGKey(0)
            post, first = timed(
                lambda: inf.fit(net, x, y, prior=ig, noise=NOISE, method="nuts", key=key)
            )
            rows.append(
                [
                    "nuts, 500 warm-up + 1000",
                    "IG(2,2)",
                    secs(first),
                    "–",
                    "– (no evidence)",
                    sci(abs(float(post.mean_scale) - es_ref) / es_ref),
                    f"{float(post.ess):.0f}",
                    1,
                ]
            )
        except Exception as err:  # noqa: BLE001 -- report, do not stop the benchmark
            rows.append(["nuts", "IG(2,2)", f"failed: {err!r}"[:80], "", "", "", "", ""])
    header(
        "General-prior fit: time and accuracy vs Gauss-Hermite nodes / importance samples",
        [
            f"B1 clean data (n = {len(y)}, ReLU depth 2, τ² = 0.1); ppl.inference.nngp.fit(net, "
            "x, y, prior=..., noise=0.1, method=...). Every call includes the Gaussian "
            "statistics (kernel 353×353 + float64 Cholesky: the 'Delta' row). Steady = median "
            f"of {repeats} calls (IS: of its repeats after the first). Reference: the closed form "
            f"for IG(2, 2) (log p(y) = {le_ref:.7f}, E[σ²|y] = {es_ref:.6f}); GH with 128 nodes "
            f"for Burr XII(2, 2) (log p(y) = {bl_ref:.7f}, E[σ²|y] = {bs_ref:.6f}).",
            "IS: Student-t₄ proposal on ln σ² (scale 1.5 × Laplace), keys PRNGKey(7000 + r); "
            "error = mean ± sd over the repeats; ESS = Kish effective sample size.",
        ],
    )
    table(
        [
            "method",
            "prior",
            "1st call",
            "steady",
            "log-evidence error",
            "rel. error E[σ²|y]",
            "ESS",
            "repeats",
        ],
        rows,
    )


# ------------------------------------------------------------------------------ main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (< 3 min on 2 cores)")
    parser.add_argument(
        "--only",
        choices=("b1", "paper", "b2", "b3", "fit"),
        action="append",
        help="run only this part (may be repeated)",
    )
    parser.add_argument(
        "--single-thread", action="store_true", help="XLA on one thread too (set before import)"
    )
    parser.add_argument("--hp-steps", type=int, default=None, help="paper-protocol Adam steps")
    parser.add_argument("--epochs", type=int, default=None, help="B2 epochs")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats")
    parser.add_argument("--b2-net", choices=("mlp", "cnn"), default="mlp", help="B2 kernel")
    parser.add_argument("--_big", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_batch", type=int, default=1000, help=argparse.SUPPRESS)
    parser.add_argument("--_dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._big is not None:
        with jax.enable_x64(True):
            _big_worker(args._big, args._batch, args._dtype)
        return
    parts = set(args.only or ("b1", "paper", "b2", "b3", "fit"))
    if args.quick:
        cfg = dict(
            hp_sizes=(30, 100),
            hp_variants=("outliers",),
            hp_steps=lambda n: 200,
            epochs=3,
            b2_variants=("clean",),
            b3_sizes=(1000, 2000),
            repeats=2,
            big_skip=True,
            cnn_n=1000,
            cnn_repeats=1,
            cnn_dtypes=("float32",),
            nodes=(8, 16, 32, 64),
            samples=(250, 1000),
            is_repeats=3,
            nuts=False,
        )
    else:
        cfg = dict(
            hp_sizes=(30, 100, 353),
            hp_variants=("clean", "outliers", "ood"),
            # n = 353 costs ~70 ms per Adam step here (kernel + Cholesky gradients): 500
            # steps keep the whole run near 20 minutes; --hp-steps 2000 for the spec's cap.
            hp_steps=lambda n: 2000 if n <= 100 else 500,
            epochs=50,
            b2_variants=("clean", "ood"),
            b3_sizes=(1000, 2000, 4000, 8000),
            repeats=3,
            big_skip=False,
            cnn_n=1000,
            cnn_repeats=3,
            cnn_dtypes=("float32", "float64"),
            nodes=(8, 16, 32, 64),
            samples=(250, 1000, 4000),
            is_repeats=20,
            nuts=True,
        )
    if args.hp_steps is not None:
        cfg["hp_steps"] = lambda n, s=args.hp_steps: s
    if args.epochs is not None:
        cfg["epochs"] = args.epochs
    if args.repeats is not None:
        cfg["repeats"] = args.repeats

    print("# NNGP benchmarks (issue 7, spec §5 B1-B3)\n")
    print(machine_line() + ".")
    print(
        f"{'QUICK smoke run' if args.quick else 'Full run'}: paper protocol n ∈ "
        f"{cfg['hp_sizes']} on {cfg['hp_variants']} ({cfg['hp_steps'](30)} steps for n ≤ 100, "
        f"{cfg['hp_steps'](353)} for n = 353; spec: ≤ 2000); B2 {cfg['epochs']} epoch(s) on "
        f"{cfg['b2_variants']} (spec: 50; noise shift always); B3 n ∈ {cfg['b3_sizes']}, "
        f"{cfg['repeats']} timing repeats, n = 20 000 {'skipped' if cfg['big_skip'] else 'run'}; "
        f"fit time: GH nodes {cfg['nodes']}, IS draws {cfg['samples']} × {cfg['is_repeats']} "
        "repeats."
    )
    print(
        "Threads: OPENBLAS_NUM_THREADS=1 (see the top of the file: 20× faster LAPACK here); "
        + (
            "XLA single-threaded (--single-thread): NumPy and XLA both on one core."
            if args.single_thread
            else "XLA uses its default thread pool (all cores), NumPy one core: "
            "run with --single-thread for a one-core-each comparison."
        )
    )
    wall = time.perf_counter()
    if parts & {"b1", "paper"}:
        with jax.enable_x64(True):
            data = _b1_data()
            if "b1" in parts:
                b1_fixed(data)
            if "paper" in parts:
                b1_paper(data, cfg["hp_sizes"], cfg["hp_steps"], cfg["hp_variants"])
    if "b2" in parts:
        b2(cfg["epochs"], args.b2_net, cfg["b2_variants"])
    if "b3" in parts:
        with jax.enable_x64(True):
            b3_mlp(cfg["b3_sizes"], cfg["repeats"])
            b3_cnn(cfg["cnn_n"], cfg["cnn_repeats"], cfg["cnn_dtypes"])
        b3_big(20000, 1000, "float32", cfg["big_skip"])
    if "fit" in parts:
        with jax.enable_x64(True):
            fit_time(cfg["nodes"], cfg["samples"], cfg["is_repeats"], cfg["repeats"], cfg["nuts"])
    print(
        f"\nTotal wall time {time.perf_counter() - wall:.0f} s; load average at end "
        f"{os.getloadavg()[0]:.1f} (timings on a shared machine are noisy when it is > "
        f"{os.cpu_count()})."
    )


if __name__ == "__main__":
    main()
