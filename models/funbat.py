"""FunBaT: functional Bayesian Tucker decomposition (Fang et al., ICLR 2024): ``ppl fit funbat``.

Continuous-indexed tensor data ``y_n`` at ``x_n ∈ ℝᴷ`` (spec ``funbat.md`` §1.1)::

    y_n = Σ_r W[r_1..r_K] Π_k u^k_{r_k}(x_nᵏ) + ε_n,    ε_n ~ N(0, 1/τ),   τ ~ Gamma(a0, b0),
    u^k_r ~ GP(0, Matérn(ν_k, ℓ_k, σ_k²)),             vec(W) ~ N(0, core_scale² I),

with each mode's functions observed on its sorted unique indexes. :func:`model` is that
program with :class:`~ppl.transforms.state_space.GaussianProcess` sites ``u_k`` (shape
``(R_k, n_k)``), so it runs under SVI and NUTS as is, and under
:func:`~ppl.transforms.state_space.state_space` in O(n) per function; the fast route is
conditional EP with Kalman smoothing, :func:`ppl.inference.funbat.fit`.

* :func:`generate_synthetic` -- the spec's generator G(K, seed) (§4); :func:`load_default`
  -- the embedded sets (``"synthetic2"``, ``"synthetic3"``, ``"simulation_r1"``), generated
  from fixed seeds (nothing is downloaded).
* :func:`plot_factors` -- the learned factor functions with ±2 sd bands.

Example (the model's sites on G(2, 0); :mod:`ppl.inference.funbat` fits it)::

    >>> from numpyro import handlers
    >>> d = load_default("synthetic2")
    >>> tr = handlers.trace(handlers.seed(model, 0)).get_trace(
    ...     d["train_indexes"], d["train_y"], ranks=2, kernels=Matern(0.5, 0.2, 1.0))
    >>> tr["u_0"]["value"].shape, tr["W"]["value"].shape, tr["y"]["value"].shape
    ((2, 40), (2, 2), (2000,))
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from ppl.inference.funbat import check_data
from ppl.models.registry import FitResult, ModelSpec, Problem, register
from ppl.transforms.state_space import GaussianProcess, Matern

__all__ = [
    "DEFAULT_SETS",
    "FACTORS",
    "check_data",
    "generate_synthetic",
    "load_default",
    "model",
    "plot_factors",
]

#: The spec's known factor functions u^k(x) -> [len(x), 2] of G(K, seed) (§4).
FACTORS = (
    lambda x: np.stack([np.sin(2 * np.pi * x), np.cos(2 * np.pi * x)], -1),
    lambda x: np.stack([np.cos(np.pi * x), x * np.sin(3 * np.pi * x)], -1),
    lambda x: np.stack([np.exp(-x), (1 - x) * np.sin(2 * np.pi * x)], -1),
)

DEFAULT_SETS = ("synthetic2", "synthetic3", "simulation_r1")


def check_ranks(ranks, num_modes: int) -> tuple[int, ...]:
    """``ranks`` as a tuple of ``num_modes`` ints >= 1 (an int is repeated)."""
    if isinstance(ranks, (int, np.integer)) and not isinstance(ranks, bool):
        ranks = (int(ranks),) * num_modes
    try:
        ranks = tuple(ranks)
    except TypeError:
        raise TypeError(f"ranks must be an int or a tuple of ints, got {ranks!r}") from None
    if len(ranks) != num_modes:
        raise ValueError(f"ranks must have one entry per mode ({num_modes}), got {ranks}")
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
            raise ValueError(f"ranks must be ints >= 1, got {ranks}")
    return tuple(int(r) for r in ranks)


def check_kernels(kernels, num_modes: int) -> tuple[Matern, ...]:
    """``kernels`` as a tuple of ``num_modes`` :class:`Matern` (a single one is repeated)."""
    if isinstance(kernels, Matern):
        kernels = (kernels,) * num_modes
    kernels = tuple(kernels)
    if len(kernels) != num_modes or not all(isinstance(k, Matern) for k in kernels):
        raise ValueError(f"kernels must be {num_modes} Matern kernels (one per mode)")
    return kernels


def tucker_mean(W, us):
    """``Σ_r W[r] Π_k us[k][n, r_k]`` for ``W f[R_1..R_K]`` and ``us[k] f[N, R_k]`` -> ``f[N]``."""
    out = W[None]
    for u in us:
        out = jnp.einsum("nr...,nr->n...", out, u)
    return out


def model(indexes, y=None, *, ranks, kernels, a0=1.0, b0=1.0, core_scale=1.0, cp=False):
    """The FunBaT model as a NumPyro program (spec §6).

    :param indexes: ``f[N, K]`` continuous indexes (concrete).
    :param y: ``f[N]`` observed values, or ``None`` to draw them.
    :param ranks: ``(R_1, …, R_K)`` ints >= 1 (an int: the same for every mode).
    :param kernels: one :class:`~ppl.transforms.state_space.Matern` per mode (or one for all).
    :param a0, b0: Gamma shape and rate of the noise precision τ.
    :param core_scale: prior sd of each core entry.
    :param bool cp: CP special case: ``W`` fixed superdiagonal with ones (all ranks equal).

    Sites: ``u_k`` (``GaussianProcess`` on the sorted unique indexes of mode k, shape
    ``(R_k, n_k)``, plate ``rank_k``, event dim ``mode_k_index``), ``W`` (shape ``ranks``;
    absent when ``cp``), ``tau`` and ``y`` (plate ``data``).

    >>> from numpyro import handlers
    >>> x = np.array([[0.1, 0.5], [0.2, 0.5], [0.1, 0.9]])
    >>> tr = handlers.trace(handlers.seed(model, 0)).get_trace(
    ...     x, ranks=(2, 3), kernels=Matern(1.5, 0.3, 1.0))
    >>> tr["u_0"]["value"].shape, tr["u_1"]["value"].shape, tr["W"]["value"].shape
    ((2, 2), (3, 2), (2, 3))
    """
    idx, y_np = check_data(indexes, y)
    num_modes = idx.shape[1]
    ranks = check_ranks(ranks, num_modes)
    kernels = check_kernels(kernels, num_modes)
    if cp and len(set(ranks)) != 1:
        raise ValueError(f"cp=True needs equal ranks in every mode, got {ranks}")
    us = []
    for k in range(num_modes):
        grid, pos = np.unique(idx[:, k], return_inverse=True)
        with numpyro.plate(f"rank_{k}", ranks[k]):
            u = numpyro.sample(
                f"u_{k}",
                GaussianProcess(kernels[k], grid),
                infer={"event_dims": (f"mode_{k}_index",)},
            )
        us.append(u[:, pos.reshape(-1)].T)
    if cp:
        W = jnp.zeros(ranks).at[(jnp.arange(ranks[0]),) * num_modes].set(1.0)
    else:
        W = numpyro.sample(
            "W",
            dist.Normal(0.0, core_scale).expand(ranks).to_event(num_modes),
            infer={"event_dims": tuple(f"rank_{k}" for k in range(num_modes))},
        )
    tau = numpyro.sample("tau", dist.Gamma(a0, b0))
    mean = tucker_mean(W, us)
    with numpyro.plate("data", idx.shape[0]):
        numpyro.sample("y", dist.Normal(mean, 1.0 / jnp.sqrt(tau)), obs=y_np)


# ------------------------------------------------------------------------------------ data


def _truth(W, xs):
    us = [FACTORS[k](x) for k, x in enumerate(xs)]
    out = W[None]
    for u in us:
        out = np.einsum("nr...,nr->n...", out, u)
    return out


def generate_synthetic(num_modes: int, seed: int = 0) -> dict:
    """The spec's generator G(K, seed) (§4), ``np.random.default_rng(seed)`` in its call order.

    R = 2 per mode, 40 train indexes per mode, N = 2000 train entries (noise sd 0.1), 300
    test entries at seen indexes and 300 with one mode at an unseen index.

    :return: dict of NumPy arrays: ``train_indexes [2000, K]``, ``train_y``, ``test_indexes
        [600, K]``, ``test_y``, ``test_f`` (noise-free), ``test_unseen [600]`` (bool),
        ``W [2]*K``, ``grids [K, 40]``, ``noise_sd``; plus ``ranks``, ``name``.

    >>> d = generate_synthetic(2, 0)
    >>> d["train_indexes"].shape, d["test_indexes"].shape
    ((2000, 2), (600, 2))
    """
    if num_modes not in (1, 2, 3):
        raise ValueError(f"num_modes must be 1, 2 or 3, got {num_modes}")
    rng = np.random.default_rng(seed)
    K = num_modes
    W = rng.normal(size=(2,) * K)
    grids = [np.sort(rng.uniform(0, 1, 40)) for _ in range(K)]
    unseen = [np.sort(rng.uniform(0, 1, 10)) for _ in range(K)]
    train_pos = np.stack([rng.integers(0, 40, 2000) for _ in range(K)], -1)
    seen_pos = np.stack([rng.integers(0, 40, 300) for _ in range(K)], -1)
    unseen_pos = np.stack([rng.integers(0, 40, 300) for _ in range(K)], -1)
    x_train = np.stack([grids[k][train_pos[:, k]] for k in range(K)], -1)
    x_seen = np.stack([grids[k][seen_pos[:, k]] for k in range(K)], -1)
    x_unseen = np.stack([grids[k][unseen_pos[:, k]] for k in range(K)], -1)
    for i in range(300):
        k = rng.integers(0, K)
        x_unseen[i, k] = unseen[k][rng.integers(0, 10)]
    noise_sd = 0.1
    f_train = _truth(W, x_train.T)
    y_train = f_train + rng.normal(0, noise_sd, 2000)
    x_test = np.concatenate([x_seen, x_unseen])
    f_test = _truth(W, x_test.T)
    y_test = f_test + rng.normal(0, noise_sd, 600)
    return {
        "name": f"synthetic{K}",
        "train_indexes": x_train,
        "train_y": y_train,
        "test_indexes": x_test,
        "test_y": y_test,
        "test_f": f_test,
        "test_unseen": np.arange(600) >= 300,
        "W": W,
        "grids": np.stack(grids),
        "noise_sd": noise_sd,
        "ranks": (2,) * K,
    }


def _simulation_r1(seed: int = 0) -> dict:
    """A regeneration of the reference repo's ``simulation_r1`` (spec §2; the file itself is
    not shipped): 2 modes, ``y = u¹(x¹) u²(x²)`` with u¹ = sin²(2πx)cos(2πx),
    u² = e^{−2x} sin(1.5πx), no noise, six random 15×15 grids (1,350 points, 90 unique
    indexes per mode), min-max scaled to [0, 1], split 50/50."""
    rng = np.random.default_rng(seed)
    pts = []
    for _ in range(6):
        a, b = rng.uniform(0, 1, 15), rng.uniform(0, 1, 15)
        pts.append(np.stack(np.meshgrid(a, b, indexing="ij"), -1).reshape(-1, 2))
    x = np.concatenate(pts)
    x = (x - x.min(0)) / (x.max(0) - x.min(0))
    u1 = lambda t: np.sin(2 * np.pi * t) ** 2 * np.cos(2 * np.pi * t)
    u2 = lambda t: np.exp(-2 * t) * np.sin(1.5 * np.pi * t)
    y = u1(x[:, 0]) * u2(x[:, 1])
    perm = rng.permutation(len(y))
    tr, te = perm[: len(y) // 2], perm[len(y) // 2 :]
    return {
        "name": "simulation_r1",
        "train_indexes": x[tr],
        "train_y": y[tr],
        "test_indexes": x[te],
        "test_y": y[te],
        "test_f": y[te],
        "test_unseen": np.zeros(len(te), bool),
        "noise_sd": 0.0,
        "ranks": (1, 1),
    }


def load_default(name: str = "synthetic2") -> dict:
    """An embedded data set (generated from a fixed seed; no download).

    :param name: ``"synthetic2"`` / ``"synthetic3"`` (G(2, 0) / G(3, 0) of spec §4, with
        known factors) or ``"simulation_r1"`` (the reference repo's 2-mode noiseless set,
        regenerated from its description).
    :return: dict with ``train_indexes f[N, K]``, ``train_y f[N]``, ``test_indexes``,
        ``test_y``, ``test_f`` and the generator's extras.
    """
    if name == "synthetic2":
        return generate_synthetic(2, 0)
    if name == "synthetic3":
        return generate_synthetic(3, 0)
    if name == "simulation_r1":
        return _simulation_r1(0)
    raise ValueError(f"name must be one of {', '.join(DEFAULT_SETS)}, got {name!r}")


# ------------------------------------------------------------------------------------ plot


def plot_factors(result, data=None, *, num_points: int = 200):
    """The learned factor functions ``u^k_r(x)`` of a :class:`ppl.inference.funbat.FunBaTResult`
    with ±2 sd bands (one panel per mode), and the true ones when ``data`` has them.

    Factors are identified only up to an invertible map per mode (absorbed by W), so the
    true functions are drawn after a least-squares linear map onto the learned ones."""
    import matplotlib.pyplot as plt

    from ppl.inference import funbat

    grids = result.grids
    K = len(grids)
    fig, axes = plt.subplots(1, K, figsize=(4.2 * K, 3.2), squeeze=False)
    for k in range(K):
        ax = axes[0, k]
        lo, hi = float(grids[k].min()), float(grids[k].max())
        x = np.linspace(lo, hi, num_points)
        mean, cov = funbat.latent(result, k, x)
        mean, cov = np.asarray(mean), np.asarray(cov)
        sd = np.sqrt(np.clip(np.diagonal(cov, axis1=1, axis2=2), 0, None))
        for r in range(mean.shape[1]):
            (line,) = ax.plot(x, mean[:, r], label=f"r={r + 1}")
            ax.fill_between(
                x,
                mean[:, r] - 2 * sd[:, r],
                mean[:, r] + 2 * sd[:, r],
                alpha=0.25,
                color=line.get_color(),
            )
        if data is not None and "W" in data and k < len(FACTORS):
            truth = FACTORS[k](x)
            coef, *_ = np.linalg.lstsq(truth, mean, rcond=None)
            aligned = truth @ coef
            ax.plot(x, aligned[:, 0], "k--", lw=1, label="true (aligned)")
            ax.plot(x, aligned[:, 1:], "k--", lw=1)
        ax.plot(grids[k], np.full(len(grids[k]), ax.get_ylim()[0]), "|", color="0.4")
        ax.set_title(f"mode {k + 1}")
        ax.set_xlabel(f"x{k + 1}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ `ppl fit`


def _options(group):
    group.add_argument(
        "--data",
        choices=DEFAULT_SETS,
        default="synthetic2",
        help="embedded data set (default: %(default)s)",
    )
    group.add_argument(
        "--rank",
        type=int,
        default=None,
        help="rank R of every mode (default: the data set's, 2 or 1)",
    )
    group.add_argument(
        "--nu",
        type=float,
        default=None,
        help="Matérn smoothness 0.5, 1.5 or 2.5 (default 0.5; 1.5 for simulation_r1)",
    )
    group.add_argument(
        "--lengthscale",
        type=float,
        default=None,
        help="Matérn lengthscale (default 0.2; 0.1 for simulation_r1)",
    )
    group.add_argument("--restarts", type=int, default=1, help="random restarts (default 1)")


def _validate(opts):
    if opts.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {opts.steps}")
    if opts.rank is not None and opts.rank < 1:
        raise ValueError(f"--rank must be >= 1, got {opts.rank}")
    if opts.nu is not None:
        Matern(opts.nu, 1.0, 1.0)
    if opts.lengthscale is not None and not (
        opts.lengthscale > 0 and math.isfinite(opts.lengthscale)
    ):
        raise ValueError(f"--lengthscale must be > 0, got {opts.lengthscale}")
    if opts.restarts < 1:
        raise ValueError(f"--restarts must be >= 1, got {opts.restarts}")


def _settings(opts, data):
    sim = data["name"] == "simulation_r1"
    nu = opts.nu if opts.nu is not None else (1.5 if sim else 0.5)
    ell = opts.lengthscale if opts.lengthscale is not None else (0.1 if sim else 0.2)
    var = 0.5 if sim else 1.0
    K = data["train_indexes"].shape[1]
    ranks = (opts.rank,) * K if opts.rank is not None else tuple(data["ranks"])
    return ranks, (Matern(nu, ell, var),) * K


def _build(opts) -> Problem:
    import functools

    data = load_default(opts.data)
    ranks, kernels = _settings(opts, data)
    m = functools.partial(model, ranks=ranks, kernels=kernels)
    return Problem(
        model=m,
        args=(data["train_indexes"],),
        kwargs={"y": data["train_y"]},
        data=data,
    )


def _fit_cep(spec, problem: Problem, opts, rng_key) -> FitResult:
    """CEP + Kalman (:func:`ppl.inference.funbat.fit`), then test metrics."""
    from ppl.inference import funbat

    data = problem.data
    fast = os.environ.get("PPL_FAST") == "1"
    config = funbat.FunBaTConfig(num_iters=int(opts.steps), num_restarts=int(opts.restarts))
    key_fit, key_post = jax.random.split(rng_key)
    result = funbat.fit(key_fit, problem.model, data["train_indexes"], data["train_y"], config)
    mean, var = funbat.predict(result, data["test_indexes"])
    mean, var = np.asarray(mean), np.asarray(var)
    err = mean - data["test_y"]
    rmse = float(np.sqrt(np.mean(err**2)))
    mae = float(np.mean(np.abs(err)))
    oracle = float(np.sqrt(np.mean((data["test_f"] - data["test_y"]) ** 2)))
    cover = float(np.mean(np.abs(err) <= 1.96 * np.sqrt(var)))
    idata = funbat.to_inference_data(result, key_post, num_samples=50 if fast else 200)
    idata.posterior.attrs.update({"test_rmse": rmse, "test_mae": mae, "oracle_rmse": oracle})
    notes = [
        f"data: {data['name']} (N = {len(data['train_y'])} train, {len(data['test_y'])} test)",
        f"ranks: {result.config.ranks}; kernels: {', '.join(map(repr, result.config.kernels))}",
        f"iterations: {result.n_iter} (converged: {result.converged}, tol {config.tol:g})",
        f"train RMSE: {float(result.history['train_rmse'][-1]):.4f}",
        f"test RMSE: {rmse:.4f} (oracle, noise-free truth: {oracle:.4f}); test MAE: {mae:.4f}",
        f"95% predictive coverage: {cover:.3f}",
        f"noise sd estimate: {float(result.history['noise_sd'][-1]):.4f}",
    ]
    return FitResult(
        idata=idata,
        losses=np.asarray(result.history["train_rmse"]),
        result=result,
        loss_label="train RMSE per CEP sweep",
        notes=notes,
    )


def _plot_draws(idata, data):
    """Factor functions on each mode's grid from posterior draws (NUTS): mean ± 2 sd."""
    import matplotlib.pyplot as plt

    x = data["train_indexes"]
    K = x.shape[1]
    fig, axes = plt.subplots(1, K, figsize=(4.2 * K, 3.2), squeeze=False)
    for k in range(K):
        u = idata.posterior[f"u_{k}"].values
        u = u.reshape((-1,) + u.shape[2:])  # [draws, R, n]
        grid = np.unique(x[:, k])
        mean, sd = u.mean(0), u.std(0)
        ax = axes[0, k]
        for r in range(u.shape[1]):
            (line,) = ax.plot(grid, mean[r], label=f"r={r + 1}")
            ax.fill_between(
                grid, mean[r] - 2 * sd[r], mean[r] + 2 * sd[r], alpha=0.25, color=line.get_color()
            )
        ax.set_title(f"mode {k + 1} (posterior draws)")
        ax.set_xlabel(f"x{k + 1}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _plot(fit: FitResult, problem: Problem, out_dir):
    from ppl.inference.funbat import FunBaTResult

    if isinstance(fit.result, FunBaTResult):
        return {"factors": plot_factors(fit.result, problem.data)}
    return {"factors": _plot_draws(fit.idata, problem.data)}


def _summary(idata):
    import pandas as pd

    attrs = idata.posterior.attrs
    rows = {k: float(attrs[k]) for k in ("test_rmse", "test_mae", "oracle_rmse") if k in attrs}
    stats = idata.sample_stats
    for name in ("train_rmse", "noise_sd", "max_delta"):
        if name in stats:
            rows[f"final {name}"] = float(stats[name].values.ravel()[-1])
    if not rows:  # NUTS: the usual summary of the core and the noise precision
        import arviz as az

        return az.summary(idata, var_names=["W", "tau"], filter_vars=None)
    return pd.DataFrame({"value": pd.Series(rows, dtype=object)})


register(
    ModelSpec(
        name="funbat",
        description="Functional Bayesian Tucker decomposition: state-space GP factors, CEP+Kalman",
        build=_build,
        plot=_plot,
        options=_options,
        validate=_validate,
        inference=("cep", "nuts"),
        drivers={"cep": _fit_cep},
        default_steps=100,
        summary=_summary,
        details=(
            "Fits the Tucker model with Matérn GP factor functions to an embedded data set "
            "(the spec's G(2,0)/G(3,0) with known factors, or simulation_r1) by conditional "
            "EP with Kalman smoothing; factors.png shows the learned functions with ±2 sd "
            "bands (true ones aligned by least squares)."
        ),
    )
)
