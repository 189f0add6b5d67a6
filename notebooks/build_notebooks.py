"""Write (and optionally execute) the tutorial notebooks from the cells below.

The notebooks are generated so that their code stays in one reviewed place. Run
``python notebooks/build_notebooks.py --execute`` to regenerate the executed
``notebooks/01_programmable_vi.ipynb`` (about 3 minutes on 2 CPU cores); the test suite
executes the committed notebook with ``PPL_FAST=1`` (short runs).
"""

from __future__ import annotations

import argparse
import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).parent

CELLS_01 = [
    (
        "md",
        """# Programmable variational inference with `ppl`

An *objective* is an ordinary Python function of a NumPyro `model` and `guide`. It samples
traces (`ppl.sample_trace`), scores programs at traces (`ppl.log_density`), draws particles
(`ppl.particles`) and does arithmetic. `ppl.value_and_grad` turns it into an **unbiased
gradient estimator**, with the estimator chosen per sample site (REPARAM, REINFORCE with
baselines, ENUM, MVD).

This tour: (1) a new objective in a cell, (2) estimators per site, (3) ELBO vs IWELBO vs
reweighted wake-sleep on a VAE, (4) ArviZ plots of SVI and NUTS side by side.""",
    ),
    (
        "code",
        """import os

import arviz as az
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax

import ppl
from ppl.inference import NUTS, SVI, to_inference_data
from ppl.transforms import ENUM, MVD, REINFORCE, estimators

FAST = os.environ.get("PPL_FAST") == "1"  # the test suite runs this notebook in fast mode
STEPS = 40 if FAST else 2000
print("fast mode" if FAST else "full mode", "| jax", jax.__version__, jax.devices())""",
    ),
    (
        "md",
        """## 1. A model, a guide, and a new objective written in a cell""",
    ),
    (
        "code",
        """x = jnp.array([0.5, 1.2, -0.3])


def model(x):
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def guide(x):
    m = numpyro.param("m", 0.2)
    s = numpyro.param("s", np.exp(-0.5), constraint=dist.constraints.positive)
    numpyro.sample("z", dist.Normal(m, s))


def tempered_iwelbo(model, guide, *args, K=5, beta=0.5):
    \"\"\"A user's new objective: IWELBO with a tempered likelihood-and-prior term.\"\"\"
    with ppl.particles(K):
        tr = ppl.sample_trace(guide, *args)
        log_p = ppl.log_density(model, tr, *args)
        log_q = ppl.log_density(guide, tr, *args)
    return ppl.logmeanexp(beta * log_p - log_q)


params = ppl.init_params(jax.random.PRNGKey(0), model, guide, x)
f = jax.jit(ppl.value_and_grad(ppl.objectives.elbo, model, guide))
keys = jax.random.split(jax.random.PRNGKey(1), 20_000)
values, grads = jax.vmap(lambda k: f(params, k, x))(keys)
print(f"ELBO {values.mean():.4f} (exact -4.1826); dELBO/dm {grads['m'].mean():.3f} (exact 0.600)")
value, _ = jax.jit(ppl.value_and_grad(tempered_iwelbo, model, guide))(params, keys[0], x)
print(f"tempered IWELBO, one estimate: {value:.3f}")""",
    ),
    (
        "md",
        """## 2. Choosing the gradient estimator per site

A discrete latent has no reparameterisation. Pick REINFORCE (optionally with a baseline),
MVD (measure-valued derivative) or ENUM (exact sum) per site, by handler or by
`infer={"estimator": ...}`; the model and guide stay unmodified.""",
    ),
    (
        "code",
        """def mix_model(x):
    c = numpyro.sample("c", dist.Bernoulli(0.3))
    numpyro.sample("x", dist.Normal(2 * c - 1, 1), obs=x)


def mix_guide(x):
    numpyro.sample("c", dist.Bernoulli(logits=numpyro.param("phi", 0.0)))


x0 = jnp.array(0.4)
rows = []
for name, est in [("REINFORCE", REINFORCE()), ("MVD", MVD()), ("ENUM", ENUM())]:
    g = estimators(mix_guide, {"c": est})
    p = ppl.init_params(jax.random.PRNGKey(0), mix_model, g, x0)
    f = jax.jit(jax.vmap(ppl.value_and_grad(ppl.objectives.elbo, mix_model, g), (None, 0, None)))
    _, gr = f(p, jax.random.split(jax.random.PRNGKey(2), 20_000), x0)
    rows.append((name, float(gr["phi"].mean()), float(gr["phi"].std())))
print("| estimator | mean dELBO/dphi (exact -0.01182) | per-sample sd |")
print("|---|---|---|")
for name, mean, sd in rows:
    print(f"| {name} | {mean:+.4f} | {sd:.3f} |")""",
    ),
    (
        "md",
        """## 3. ELBO vs IWELBO vs reweighted wake-sleep on a VAE

The VAE of `ppl fit vae` (binarised 8×8 digits). Each objective trains the same network
with `ppl.inference.SVI`; we compare the held-out IWELBO(K=100) in nats per test image.""",
    ),
    (
        "code",
        """from ppl.models import vae

x_train = jnp.asarray(vae.load_digits_binarised("train"))
x_test = jnp.asarray(vae.load_digits_binarised("test"))
objectives = {
    "ELBO": ppl.objectives.elbo,
    "IWELBO(5)": ppl.objectives.iwelbo(5),
    "RWS(5)": {"model": ppl.objectives.wake_theta(5), "guide": ppl.objectives.wake_phi(5)},
}
heldout = jax.jit(ppl.value_and_grad(ppl.objectives.iwelbo(100), vae.vae_model, vae.vae_guide))
table, curves = {}, {}
for name, objective in objectives.items():
    svi = SVI(vae.vae_model, vae.vae_guide, optax.adam(1e-3), objective)
    result = svi.run(jax.random.PRNGKey(0), STEPS, x_train, 64, progress_bar=False)
    bound, _ = heldout(result.state.params, jax.random.PRNGKey(1), x_test)
    table[name] = float(bound) / x_test.shape[0]
    curves[name] = np.asarray(result.losses)
print("| objective | held-out IWELBO(100), nats/image |")
print("|---|---|")
for name, v in table.items():
    print(f"| {name} | {v:.2f} |")
fig, ax = plt.subplots(figsize=(6, 3))
for name, losses in curves.items():
    ax.plot(losses, label=name, alpha=0.8)
ax.set(xlabel="step", ylabel="loss (−objective)", yscale="symlog")
ax.legend();""",
    ),
    (
        "md",
        """## 4. SVI and NUTS side by side in ArviZ

Eight schools (non-centred): a mean-field guide fitted by SVI, and BlackJAX NUTS on the
same NumPyro model. Both give `InferenceData`, so ArviZ compares them directly.""",
    ),
    (
        "code",
        """from ppl.models import eight_schools as es

data = es.load_data()
svi = SVI(es.eight_schools, es.eight_schools_guide, optax.adam(0.05))
res = svi.run(
    jax.random.PRNGKey(0), 200 if FAST else 3000, data["sigma"], data["y"], progress_bar=False
)
idata_vi = to_inference_data(
    res,
    es.eight_schools,
    es.eight_schools_guide,
    data["sigma"],
    data["y"],
    num_samples=400,
    key=jax.random.PRNGKey(1),
)
nuts = NUTS(
    es.eight_schools,
    num_warmup=100 if FAST else 500,
    num_samples=100 if FAST else 500,
    num_chains=2 if FAST else 4,
)
idata_mcmc = nuts.run(jax.random.PRNGKey(2), data["sigma"], data["y"])
axes = az.plot_forest(
    [idata_vi, idata_mcmc],
    model_names=["SVI", "NUTS"],
    var_names=["mu", "tau"],
    combined=True,
    figsize=(6, 3),
)
print(az.compare({"svi": idata_vi, "nuts": idata_mcmc}))""",
    ),
]


CELLS_06 = [
    (
        "md",
        """# Kronecker sparse Bayesian learning (KroSBL)

He & Joseph recover a sparse vector from `y = (A_1 ⊗ … ⊗ A_I) x + n` when the support of x
is itself a Kronecker product (an IRS-MIMO channel: angles of arrival and departure on
grids). The prior `x ~ N(0, diag(γ_1 ⊗ … ⊗ γ_I))` has `Σ n_i` hyperparameters instead of
`N = Π n_i`, and EM over them uses the factors' structure:

* **E-step** (`ppl.inference.sbl.estep`): `μ`, `diag Σ` and the cost `L = log|C| + yᴴC⁻¹y`
  from the eigendecompositions of the small matrices `A_i diag(γ_i) A_iᴴ`; nothing
  `N×N` or `M×M` is formed;
* **M-step**: `"am"` (alternating closed-form factor updates; the cost never increases),
  `"svd"` (best rank-one fit of `Σ_jj + |μ_j|²`), or `"classic"` (unstructured γ).

This notebook: (1) one problem, three M-steps; (2) the cost per iteration and the recovered
support; (3) NMSE against SNR with OMP baselines; (4) run time against N; (5) the IRS
channel-estimation problem with block coupling; (6) the same model in NumPyro under SVI.""",
    ),
    (
        "code",
        """import os
import time

import arviz as az
import jax
import matplotlib.pyplot as plt
import numpy as np

from ppl.inference import sbl, to_inference_data
from ppl.models import krosbl

FAST = os.environ.get("PPL_FAST") == "1"  # the test suite runs this notebook in fast mode
SEEDS = 2 if FAST else 10
# the spec's problem (N = 1000, M = 480); fast mode shrinks it to N = 216, M = 80
SIZES = dict(ns=(6, 6, 6), ms=(4, 4, 5)) if FAST else dict(ns=(10, 10, 10), ms=(6, 8, 10))
print("fast mode" if FAST else "full mode", "| jax", jax.__version__, jax.devices())""",
    ),
    (
        "md",
        """## 1. One problem, three M-steps

`I = 3` modes of 10 entries (N = 1000), `M = 6·8·10 = 480` measurements, 3 active entries
per mode (27 non-zeros), 20 dB (in fast mode: 6 entries and 4·4·5 measurements).""",
    ),
    (
        "code",
        """data = krosbl.generate_synthetic(0, **SIZES, k=3, snr_db=20)
fits = {}
for m_step in ("classic", "am", "svd"):
    t0 = time.perf_counter()
    res = sbl.fit(data["factors"], data["y"], m_step=m_step, noise_var=data["noise_var"])
    fits[m_step] = res
    print(
        f"{m_step:8s} NMSE {krosbl.nmse(res.mean, data['x']):.2e}  iterations {res.n_iter:3d}"
        f"  converged {res.converged}  {time.perf_counter() - t0:.2f} s (incl. compile)"
    )""",
    ),
    (
        "md",
        """## 2. Cost per iteration and the recovered support

AM decreases `L` at every iteration (generalised EM); SVD usually needs fewer iterations.""",
    ),
    (
        "code",
        """fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for name, res in fits.items():
    axes[0].plot(res.history, label=name)
axes[0].set(xlabel="EM iteration", ylabel="SBL cost L", title="cost per iteration")
axes[0].legend()
idx = np.arange(data["x"].size)
axes[1].stem(idx, np.abs(data["x"]), linefmt="C7-", markerfmt="C7o", basefmt=" ", label="true")
axes[1].plot(idx, np.abs(fits["am"].mean), "C1.", label="AM estimate")
axes[1].set(xlabel="index j (C order)", ylabel="|x_j|", title="support")
axes[1].legend()
plt.tight_layout()
amp = np.abs(fits["am"].mean)
found = amp > 1e-3 * amp.max()
true = data["support"]
print("support recovery |Ŝ∩S|/|Ŝ∪S| =", (found & true).sum() / (found | true).sum())""",
    ),
    (
        "md",
        """## 3. NMSE against SNR

Median NMSE over seeds for classic SBL, AM, SVD and two greedy baselines: OMP on the full
dictionary and Kronecker OMP (at most 5 atoms per mode). `benchmarks/krosbl.py` runs the
full comparison (more seeds and SNRs, IQRs, support recovery).""",
    ),
    (
        "code",
        """snrs = [5, 25] if FAST else [0, 10, 20, 30]


def em(m_step):
    return lambda d: sbl.fit(d["factors"], d["y"], m_step=m_step, noise_var=d["noise_var"]).mean


methods = {
    "classic SBL": em("classic"),
    "AM-KroSBL": em("am"),
    "SVD-KroSBL": em("svd"),
    "OMP": lambda d: sbl.omp(d["factors"], d["y"], d["noise_var"], max_atoms=100),
    "KOMP": lambda d: sbl.komp(d["factors"], d["y"], d["noise_var"], caps=5),
}
table = {name: [] for name in methods}
for snr in snrs:
    problems = [krosbl.generate_synthetic(s, **SIZES, k=3, snr_db=snr) for s in range(SEEDS)]
    for name, method in methods.items():
        table[name].append(np.median([krosbl.nmse(method(d), d["x"]) for d in problems]))
fig, ax = plt.subplots(figsize=(6, 4))
for name, vals in table.items():
    ax.semilogy(snrs, vals, "o-", label=name)
ax.set(xlabel="SNR (dB)", ylabel=f"median NMSE ({SEEDS} seeds)", title="NMSE vs SNR")
ax.legend()
print("| SNR | " + " | ".join(table) + " |")
for i, snr in enumerate(snrs):
    print(f"| {snr} | " + " | ".join(f"{table[n][i]:.2e}" for n in table) + " |")""",
    ),
    (
        "md",
        """## 4. Run time against N

`I = 2`, `n_1 = n_2 = n`, `m_i = n/2`: time of a 50-iteration fit after compilation. Classic
SBL works with the dense `M×N` dictionary and an `M×M` eigendecomposition, so its cost
grows like `N³`-ish; KroSBL's like `N·max m_i`.""",
    ),
    (
        "code",
        """ns_grid = [8, 16] if FAST else [8, 16, 32, 64]
times = {"classic": [], "am": [], "svd": []}
for n in ns_grid:
    rng = np.random.default_rng(n)
    fs = [rng.normal(size=(n // 2, n)) for _ in range(2)]
    y = rng.normal(size=(n // 2) ** 2)
    for m_step in times:
        kw = dict(m_step=m_step, noise_var=0.1, max_iter=50, tol=1e-300)
        sbl.fit(fs, y, **kw)  # compile
        t0 = time.perf_counter()
        sbl.fit(fs, y, **kw)
        times[m_step].append(time.perf_counter() - t0)
N = np.array(ns_grid) ** 2
fig, ax = plt.subplots(figsize=(6, 4))
for m_step, ts in times.items():
    slope = np.polyfit(np.log(N), np.log(ts), 1)[0]
    ax.loglog(N, ts, "o-", label=f"{m_step} (slope {slope:.1f})")
ax.set(xlabel="N", ylabel="seconds per 50 iterations", title="run time vs N")
ax.legend()""",
    ),
    (
        "md",
        """## 5. IRS-MIMO channel estimation

The embedded draw of `ppl fit krosbl` (spec §1.9): 6 MS antennas, 16 BS antennas, a
256-element IRS, an 18-point angle grid per mode (N = 18³ = 5832), M = 288, 20 dB. The
channel's support is 3 contiguous grid points in the IRS and BS angle modes, so pattern
coupling of those modes (`block_sizes=(3, 1, 3)`, PC-KroSBL) is the paper's remedy. NMSE
is that of the cascaded channel, averaged over the IRS patterns.

Two things to notice. With the default pruning ratio (1e-6, which keeps true small entries)
AM has not converged after 150 iterations here; the paper's ratio 1e-2 (plus an absolute
floor 1e-4) prunes the spurious entries and converges in a few dozen. And on these draws
the plain Kronecker M-steps are already as good as the coupled one: the coupling does not
reproduce the paper's 10-50× gain (see `benchmarks/krosbl.py` for 20 draws).""",
    ),
    (
        "code",
        """irs = krosbl.load_default()
rows = []
methods_irs = [] if FAST else [("classic SBL", dict(m_step="classic"))]  # ~3 min on 2 cores
for name, kw in methods_irs + [
    ("AM-KroSBL", dict(m_step="am")),
    ("AM-KroSBL, paper pruning", dict(m_step="am", prune_ratio=1e-2, prune_abs=1e-4)),
    ("SVD-KroSBL", dict(m_step="svd")),
    ("PC-KroSBL (β=0.8)", dict(m_step="am", block_sizes=(3, 1, 3))),
]:
    t0 = time.perf_counter()
    res = sbl.fit(irs["factors"], irs["y"], noise_var=irs["noise_var"], **kw)
    rows.append((name, krosbl.irs_nmse(irs, res.mean), res.n_iter, time.perf_counter() - t0))
    if name.startswith("PC"):
        pc = res
print("| method | cascaded-channel NMSE | iterations | seconds |")
print("|---|---|---|---|")
for name, err, it, sec in rows:
    print(f"| {name} | {err:.3g} | {it} | {sec:.1f} |")
figs = krosbl.plot(pc, irs)""",
    ),
    (
        "md",
        """## 6. The same model in NumPyro, and ArviZ

`krosbl_model(..., marginal=True)` is an ordinary NumPyro model whose γ factors are `param`
sites and whose y has the `KronSBLMarginal` likelihood (eigen route, differentiable), so
`ppl.inference.SVI` with an empty guide performs type-II maximum likelihood by gradient
ascent; EM reaches the same cost in far fewer steps. Every EM result converts to
`InferenceData`.""",
    ),
    (
        "code",
        """import optax

from ppl.inference import SVI

small = krosbl.generate_synthetic(1, ns=(10, 10), ms=(6, 6), k=2, snr_db=20)
em = sbl.fit(small["factors"], small["y"], noise_var=small["noise_var"], max_iter=500, tol=1e-8)


def no_guide(y=None, **kwargs):
    pass


svi = SVI(krosbl.krosbl_model, no_guide, optax.adam(0.1))
steps = 200 if FAST else 2000
out = svi.run(
    jax.random.PRNGKey(0),
    steps,
    y=small["y"],
    factors=small["factors"],
    noise_var=small["noise_var"],
    marginal=True,
    progress_bar=False,
)
gammas = [out.params[f"gamma_{i + 1}"] for i in range(2)]
_, _, l_svi = sbl.estep(small["factors"], gammas, small["noise_var"], small["y"])
print(
    f"EM cost L = {em.cost:.4f} in {em.n_iter} iterations; SVI cost L = {float(l_svi):.4f} "
    f"after {steps} Adam steps"
)
idata = to_inference_data(em)
print(idata)
az.plot_forest(idata, var_names=["gamma_1", "gamma_2"], combined=True, figsize=(6, 5));""",
    ),
]


CELLS_03 = [
    (
        "md",
        """# Scale mixtures of NNGPs: Student-t processes and general scale priors

An infinitely wide network is a Gaussian process whose covariance is its **NNGP kernel**
K. Lee et al. (ICLR 2022) put a prior on the variance σ² of the last layer (the
**readout scale**): the output becomes a *scale mixture* of GPs. An inverse-gamma prior
gives a **Student-t process** in closed form; other priors (Burr XII, half-Cauchy on σ)
need a posterior over one scalar, which `ppl` computes by Gauss–Hermite quadrature at
the Laplace mode, importance sampling or NUTS.

This tutorial: (1) NNGP kernels and finite networks, (2) heavy tails at finite width,
(3) regression with outliers and a shifted test split, (4) the scale as a NumPyro site:
`marginalize_scale`, NUTS and ArviZ, (5) general priors and why the reference code's
importance sampler fails, (6) classification on digits.""",
    ),
    (
        "code",
        """import os
import warnings

import arviz as az
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.handlers import seed, trace
from numpyro.infer.util import log_density

from ppl.distributions import BurrXII, HalfCauchyScale
from ppl.inference import nngp as inf
from ppl.models import nngp
from ppl.transforms.nngp import (
    Dense, Erf, Relu, infinite_width, kernel_fn, marginalize_scale, network, scale_mixture,
    serial, unit_scale,
)

FAST = os.environ.get("PPL_FAST") == "1"  # the test suite runs this notebook in fast mode
print("fast mode" if FAST else "full mode", "| jax", jax.__version__, jax.devices())""",
    ),
    (
        "md",
        """## 1. NNGP kernels, and the finite networks they are the limit of

A network is described stax-style; its last `Dense` is the readout (σ_v = `W_std`).
`kernel_fn(net)` gives K(x, x') by the layer recursion (closed forms for ReLU and erf).
The same description is also a *finite* network: `network("f", net, x, width=...)`
draws N(0, 1) weights as sample sites. Its empirical covariance over many draws
approaches K as the width grows.""",
    ),
    (
        "code",
        """def mlp(act, depth, w_var=2.0, b_var=0.1):
    hidden = [Dense(W_std=w_var**0.5, b_std=b_var**0.5), act] * depth
    return serial(*hidden, Dense(W_std=1.0))


x_grid = jnp.linspace(-3, 3, 61)[:, None]
fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
for ax, (name, act) in zip(axes[:2], [("ReLU", Relu()), ("erf", Erf())]):
    for depth in (1, 2, 4):
        k = kernel_fn(mlp(act, depth))
        ax.plot(x_grid[:, 0], k(x_grid, jnp.zeros((1, 1)))[:, 0], label=f"depth {depth}")
    ax.set(title=f"{name}: K(x, 0)", xlabel="x")
    ax.legend()

net = mlp(Relu(), 2)
x3 = jnp.array([[-1.0], [0.3], [2.0]])
draws = 100 if FAST else 1000
for width in (8, 64, 512):
    f = jax.lax.map(
        lambda key: seed(lambda x: network("f", net, x, width=width), key)(x3),
        jax.random.split(jax.random.key(0), draws),
    )
    emp = np.asarray(f.T @ f / draws)
    axes[2].scatter(np.asarray(kernel_fn(net)(x3)).ravel(), emp.ravel(), label=f"width {width}")
lim = [0, float(kernel_fn(net)(x3).max()) * 1.2]
axes[2].plot(lim, lim, "k--", lw=1)
axes[2].set(xlabel="NNGP kernel", ylabel=f"empirical E[f f'] ({draws} nets)", title="finite nets")
axes[2].legend()
plt.tight_layout()""",
    ),
    (
        "md",
        """## 2. A prior on the readout scale: heavy tails

`scale_mixture(model, prior)` inserts a `scale ~ prior` site that multiplies the readout
variance; `infinite_width(model)` replaces the network by its GP. With
σ² ~ IG(a, b) the output at one input is Student-t with 2a degrees of freedom, and a
finite network's kurtosis tends to 3(a−1)/(a−2) (spec T6): here a = 6, so 3.75 instead
of the Gaussian 3.""",
    ),
    (
        "code",
        """a = b = 6.0
x1 = jnp.ones((1, 1))
one_layer = serial(Dense(W_std=1.0), Relu(), Dense(W_std=1.0))


def output(x):
    return network("f", one_layer, x)


n_draws = 4000 if FAST else 100_000
keys = jax.random.split(jax.random.key(1), n_draws)
rows = []
for width in (4, 16, 64):
    model = infinite_width(scale_mixture(output, dist.InverseGamma(a, b)), width=width)
    f = np.asarray(jax.lax.map(lambda k: seed(model, k)(x1)[0], keys))
    kurt = np.mean(f**4) / np.mean(f**2) ** 2
    exact = 3 * (a - 1) / (a - 2) * (1 + 5 / width)
    rows.append((width, kurt, exact))
gp = infinite_width(scale_mixture(output, dist.InverseGamma(a, b)))
f_inf = np.asarray(jax.lax.map(lambda k: seed(gp, k)(x1)[0], keys))
print("width  kurtosis (MC)  exact 3(a-1)/(a-2)(1+5/n)")
for w, k, e in rows:
    print(f"{w:5d}  {k:13.3f}  {e:8.3f}")
kurt_inf = np.mean(f_inf**4) / np.mean(f_inf**2) ** 2
print(f"  inf  {kurt_inf:13.3f}  {3 * (a - 1) / (a - 2):8.3f}")""",
    ),
    (
        "md",
        """## 3. Regression with outliers and an out-of-distribution test split

scikit-learn's diabetes data (442 patients, 10 features), standardised. The default
variant of `ppl fit nngp`: train on BMI ≤ its 80th percentile, test on the rest, with
5 % of the training targets shifted by 4–8 standard deviations. A depth-2 ReLU NNGP with
noise on the same scale, y | σ² ~ N(0, σ²(K + τ²I)), under three scale models: plain
NNGP (σ² = β/n plug-in), Student-t (IG(2, 2), closed form) and Burr XII(2, 2) (Gauss–
Hermite). The posterior mean does not depend on the prior; the predictive spread and
the evidence do.""",
    ),
    (
        "code",
        """data = nngp.load_default("outliers-ood")
reg_net = nngp.make_net(depth=2)
priors = {"nngp": None, "ig": dist.InverseGamma(2.0, 2.0), "burr": BurrXII(2.0, 2.0)}
results = nngp.compare(data, net=reg_net, noise=0.1, priors=priors)
print(f"{'prior':6s} {'RMSE':>7s} {'NLL':>7s} {'log p(y)':>10s} {'E[σ²|y]':>8s}")
for name, r in results.items():
    print(
        f"{name:6s} {r['rmse']:7.4f} {r['nll']:7.4f} {float(r['log_evidence']):10.2f} "
        f"{float(r['mean_scale']):8.3f}"
    )
figs = nngp.plot(results, data)""",
    ),
    (
        "md",
        """With a few hundred training points and one global scale the three predictives differ
only slightly (the t's degrees of freedom are 2a + n): heavy tails matter when n is
small. The same comparison on 30 training points: """,
    ),
    (
        "code",
        """small = {k: (v[:30] if k in ("x_train", "y_train") else v) for k, v in data.items()}
small_res = nngp.compare(small, net=reg_net, noise=0.1, priors=priors)
for name, r in small_res.items():
    print(f"{name:6s} n=30: NLL {r['nll']:.4f}  log p(y) {float(r['log_evidence']):.2f}")""",
    ),
    (
        "md",
        """## 4. The scale is an ordinary NumPyro site

`nngp.regression` is a NumPyro model with a `scale` site. `marginalize_scale` integrates
an inverse-gamma scale out in closed form (one observed multivariate Student-t site), so
`log_density` gives the log evidence exactly; NUTS samples the scale of the *same* model,
and ArviZ reads the draws.""",
    ),
    (
        "code",
        """xs, ys = data["x_train"], data["y_train"]
kw = {"net": reg_net, "noise": 0.1, "scale_prior": dist.InverseGamma(2.0, 2.0)}
with jax.enable_x64(True):
    lp, tr = log_density(marginalize_scale(nngp.regression), (xs, ys), kw, {})
print("marginalize_scale log p(y):", float(lp))
print("closed form (inference.nngp):", float(results["ig"]["log_evidence"]))
print("sites:", {k: v["type"] for k, v in tr.items()}, type(tr["y"]["fn"]).__name__)

from numpyro.infer import MCMC, NUTS

mcmc = MCMC(NUTS(nngp.regression), num_warmup=150 if FAST else 1000,
            num_samples=150 if FAST else 2000, progress_bar=False)
mcmc.run(jax.random.key(2), xs, ys, **kw)
idata = az.from_numpyro(mcmc)
print(az.summary(idata, var_names=["scale"]))
print("closed-form E[σ²|y]:", float(results["ig"]["mean_scale"]))
az.plot_posterior(idata, var_names=["scale"], figsize=(5, 3));""",
    ),
    (
        "md",
        """## 5. General priors: Gauss–Hermite, and importance sampling done right

For a non-conjugate prior the data enter only through β = yᵀC⁻¹y and ln|C|, so the
posterior over u = ln σ² is one-dimensional. `method="gh"` (default) integrates it with
32 Gauss–Hermite nodes at the Laplace mode (error ≈ 1e-10 here); `method="is"` uses a
Student-t₄ proposal on u. The reference code's importance sampler draws from the
*prior*: when the likelihood sits far from the prior, its effective sample size
collapses, and `ppl` warns.""",
    ),
    (
        "code",
        """kernel = kernel_fn(unit_scale(reg_net))
burr = BurrXII(2.0, 2.0)
with jax.enable_x64(True):
    gh = inf.fit(kernel, xs, ys, prior=burr, noise=0.1, method="gh")
    is_t = inf.fit(kernel, xs, ys, prior=burr, noise=0.1, method="is", key=jax.random.key(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        is_prior = inf.fit(kernel, xs, ys, prior=burr, noise=0.1, method="is",
                           proposal="prior", key=jax.random.key(3))
for name, post in [("GH-32", gh), ("IS, t4 proposal", is_t), ("IS, prior proposal", is_prior)]:
    print(f"{name:20s} log p(y) {float(post.log_evidence):10.3f}  ESS {float(post.ess):7.1f}")
print("warning:", [str(w.message)[:100] for w in caught])""",
    ),
    (
        "md",
        """## 6. Classification on digits: sparse variational GP vs Student-t process

Ten latent functions share K and one σ²; q(σ²) is inverse-gamma and learned (spec §1.5).
`nngp.classification` and `nngp.classification_guide` are a plain NumPyro model/guide pair,
trained here by `ppl.inference.SVI` with the ELBO (short run in fast mode).""",
    ),
    (
        "code",
        """import optax

import ppl
from ppl.inference import SVI

digits = nngp.load_digits_split("clean")
cls_net = nngp.make_net(depth=2)
x_tr, y_tr = digits["x_train"], digits["y_train"]
scores = {}
# Compiling the sparse-GP ELBO takes ~30 s on 2 CPU cores: the test suite (fast mode)
# skips this section; run the notebook in full mode to train both models.
models = [] if FAST else [("SVGP", None), ("SVTP", dist.InverseGamma(2.0, 2.0))]
for name, prior in models:
    svi = SVI(nngp.classification, nngp.classification_guide, optax.adam(2e-2), ppl.objectives.elbo)
    run = svi.run(jax.random.key(4), 1500, x_tr, y_tr, net=cls_net, num_classes=10,
                  inducing=x_tr[:100], scale_prior=prior, batch_size=100, progress_bar=False)
    probs = nngp.classification_predict(run.params, digits["x_test"], net=cls_net,
                                        scale_prior=prior, num_samples=64)
    scores[name] = nngp.classification_metrics(probs, digits["y_test"])
print("fast mode: classification skipped" if FAST else "test metrics:")
for name, m in scores.items():
    print(name, {k: round(float(v), 4) for k, v in m.items()})""",
    ),
    (
        "md",
        """**Where next.** `ppl fit nngp` runs section 3 from the command line and writes an
ArviZ `posterior.nc`, the predictive and scale plots and a summary;
`benchmarks/nngp.py` prints the regression table against the spec's numbers, the
classification table and kernel timings.""",
    ),
]


CELLS_05 = [
    (
        "md",
        """# Sparse subspace variational inference (SSVI) for Bayesian neural networks

SSVI (Li, Miao, Qiu, Zhang, ICLR 2024) keeps a mean-field Gaussian posterior on an **active
set** of `s = density · d` weights per layer and exact zeros elsewhere, during training and
at prediction time. Training alternates Adam steps on the active (μ, ρ) with support
updates: the weights with the lowest signal-to-noise ratio of |θ| are removed and as many
are added where the loss gradient is largest, on a cosine schedule.

In `ppl` the pieces are: `ppl.sparse.SparseTensor` (gather + segment-sum layers),
`ppl.transforms.sparse_subspace` (the guide), `ppl.transforms.restrict_prior` (the prior
restricted to the active set), `ppl.transforms.update_support` (one pure removal/addition
step) and the driver `ppl.inference.SSVI`.""",
    ),
    (
        "code",
        """import os
from functools import partial

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax

from ppl.inference import SSVI, cosine_fraction, to_inference_data
from ppl.models import bnn
from ppl.sparse import SparseTensor, matmul, to_dense
from ppl.transforms import sparse_subspace

FAST = os.environ.get("PPL_FAST") == "1"  # the test suite runs this notebook in fast mode
print("fast mode" if FAST else "full mode", "| jax", jax.__version__, jax.devices())""",
    ),
    (
        "md",
        """## 1. Sparse weights: only the active entries are stored and touched

A `SparseTensor` holds sorted flat indices and the active values; `matmul` gathers the
inputs of the active rows, scales them and sums per output column (`O(batch · s)`).""",
    ),
    (
        "code",
        """w = SparseTensor(jnp.array([1, 4, 7]), jnp.array([2.0, -1.0, 0.5]), (3, 3))
x = jnp.array([[1.0, 2.0, 3.0]])
print(to_dense(w))
print(matmul(x, w), x @ to_dense(w))""",
    ),
    (
        "md",
        """## 2. Finding the support of a sparse linear regression

Twenty features, five of them used by the truth (spec T7). SSVI at density 5/20 starts from
a random support and swaps weights every 100 steps while the replaced fraction decays.""",
    ),
    (
        "code",
        """rng = np.random.default_rng(42)
X = rng.normal(size=(200, 20))
S = np.sort(rng.choice(20, 5, replace=False))
w_true = np.zeros(20)
w_true[S] = rng.normal(0, 2, 5)
y = X @ w_true + 0.5 * rng.normal(size=200)


def linreg(x, y=None):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1], 1]).to_event(2))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(matmul(x, w)[..., 0], 0.5), obs=y)


guide, init_state = sparse_subspace(linreg, 5 / 20, init_loc=(0.0, 0.1), init_scale=(0.1, 0.0))
ssvi = SSVI(linreg, guide, optax.adam(1e-2), every=50 if FAST else 100, alpha=0.3, t_end=0.75)
res = ssvi.run(jax.random.PRNGKey(0), 1000 if FAST else 5000, jnp.asarray(X), jnp.asarray(y))
print("true support   ", S)
print("learned support", np.asarray(res.state.idx["w"]))
print("posterior means", np.round(np.asarray(res.params["w_loc"]), 3))
print("updates:", [(h["step"], int(h["w"]["n_removed"])) for h in res.history][:8])""",
    ),
    (
        "md",
        """The result converts to ArviZ: the posterior holds only the `s` active values per site,
with the indices in `constant_data`.""",
    ),
    (
        "code",
        """idata = to_inference_data(res, num_samples=200, key=jax.random.PRNGKey(1))
print(idata.posterior["w"].dims, idata.posterior["w"].shape)
print(idata.constant_data["w_idx"].values)""",
    ),
    (
        "md",
        """## 3. A Bayesian MLP on digits: dense mean-field VI against SSVI

Both runs use the same model (`ppl.models.bnn.mlp`), tempered ELBO (β = 0.1), Adam and
minibatches of 128; the checkpoint is selected on a validation split. Density 1 is plain
dense mean-field VI with dense matrix products.""",
    ),
    (
        "code",
        """data = bnn.load_digits()
widths = (32,) if FAST else (256, 256)
steps = 100 if FAST else 1500
draws = 8 if FAST else 32
model = partial(bnn.mlp, widths=widths, kl_weight=0.1)
runs = {}
for density in (1.0, 0.1):
    fit, best = bnn.fit(model, data, density=density, steps=steps, lr=3e-3, every=50)
    idata = fit.to_inference_data(
        key=jax.random.PRNGKey(2), num_samples=draws, args=(data["x_test"], data["y_test"])
    )
    probs = bnn.predictive_probs(idata)
    rot = fit.to_inference_data(key=jax.random.PRNGKey(3), num_samples=draws, args=(data["x_rot"],))
    ood = bnn.metrics(bnn.predictive_probs(rot), np.zeros(len(data["x_rot"]), int))["entropy"]
    runs[density] = (fit, probs, bnn.metrics(probs, data["y_test"]), ood)

print("density | stored params | test acc | NLL | top-label ECE | entropy (rotated digits)")
for density, (fit, _probs, m, ood) in runs.items():
    n = sum(int(np.size(v)) for v in fit.params.values())
    acc, nll, ece = m["accuracy"], m["nll"], m["ece"]
    print(f"{density:7g} | {n:13d} | {acc:.4f} | {nll:.4f} | {ece:.4f} | {ood:.3f}")""",
    ),
    (
        "code",
        """fit, probs, m, _ = runs[0.1]
fig = bnn.plot(fit.history, probs, data["y_test"], title="SSVI, density 0.1")
plt.show()""",
    ),
    (
        "md",
        """The replaced fraction follows `cosine_fraction(t, t_end, alpha)`; the density stays
fixed by construction. `ppl fit ssvi-bnn --density 0.1` runs the same from the command
line, and `benchmarks/ssvi.py` compares densities 0.5, 0.2, 0.1 and 0.05 against dense VI
for the MLP and a small CNN (accuracy, NLL, ECE, time per epoch, memory, parameters).""",
    ),
    (
        "code",
        """t = np.arange(0, 3000)
plt.figure(figsize=(5, 2.5))
plt.plot(t, cosine_fraction(t, 2250, 0.3))
plt.xlabel("step")
plt.ylabel("replaced fraction")
plt.show()""",
    ),
]


def build(cells) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    for kind, src in cells:
        nb.cells.append(new_markdown_cell(src) if kind == "md" else new_code_cell(src))
    return nb


#: ``{notebook file: cells}``: one tutorial per family (+ the tour of the core).
NOTEBOOKS = {
    "01_programmable_vi.ipynb": CELLS_01,
    "03_nngp.ipynb": CELLS_03,
    "06_krosbl.ipynb": CELLS_06,
    "05_ssvi.ipynb": CELLS_05,
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execute", action="store_true", help="execute and store outputs")
    parser.add_argument("--only", choices=sorted(NOTEBOOKS), help="build this notebook only")
    args = parser.parse_args(argv)
    for name, cells in NOTEBOOKS.items():
        if args.only and name != args.only:
            continue
        path = HERE / name
        nb = build(cells)
        if args.execute:
            from nbclient import NotebookClient

            resources = {"metadata": {"path": str(HERE)}}
            NotebookClient(nb, timeout=1800, kernel_name="python3", resources=resources).execute()
        tmp = path.with_suffix(".tmp")
        nbformat.write(nb, tmp)
        tmp.replace(path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
