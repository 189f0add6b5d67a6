"""Scale mixtures of neural-network Gaussian processes (Lee et al., ICLR 2022): ``ppl fit nngp``.

An infinitely wide network ``net`` is a GP with its NNGP kernel K (computed by
:func:`ppl.transforms.nngp.kernel_fn` on the *unit-scale* network, :func:`unit_scale`). A
prior π on the readout variance σ² -- the ``scale`` site -- makes it a scale mixture:
``InverseGamma(a, b)`` gives a Student-t process, ``BurrXII`` / ``HalfCauchyScale``
(:mod:`ppl.distributions`) heavier tails, ``Delta(v)`` the plain NNGP (spec ``nngp.md`` §1.2).
This module holds the NumPyro programs and the family around them:

* :func:`regression` -- ``scale ~ π``; ``y ~ MVN(0, scale·(K + τ²I))`` (or a latent ``f``).
  ``scale`` is an ordinary site, so NUTS, SVI, :func:`ppl.transforms.nngp.marginalize_scale`
  (the closed-form Student-t) and :func:`ppl.inference.nngp.fit` (Gauss–Hermite / importance
  sampling over σ²) all apply;
* :func:`classification` + :func:`classification_guide` -- the sparse variational GP/TP of
  spec §1.5 (inducing inputs, one shared σ² with an inverse-gamma ``q``), trained by
  ``ppl.inference.SVI``; :func:`classification_predict`, :func:`classification_metrics`;
* :func:`student_t_predict` -- the exact multivariate-t predictive (from
  :mod:`ppl.inference.nngp`);
* data: :func:`load_default` (scikit-learn's diabetes with the spec §5 B1 shifts),
  :func:`load_digits_split` (scikit-learn's digits for classification);
* :func:`compare` (test RMSE / NLL of NNGP, Student-t and a general prior), :func:`plot`
  and the ``ppl fit nngp`` registration.

Example::

    >>> import jax, numpyro
    >>> from ppl.transforms.nngp import Dense, Relu, serial
    >>> net = serial(Dense(W_std=2**0.5, b_std=0.1**0.5), Relu(), Dense())
    >>> x = jnp.linspace(-2.0, 2.0, 8)[:, None]
    >>> y = jnp.sin(2 * x[:, 0])
    >>> tr = numpyro.handlers.trace(numpyro.handlers.seed(regression, 0)).get_trace(
    ...     x, y, net=net)
    >>> tr["scale"]["value"].shape, tr["y"]["value"].shape
    ((), (8,))
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

from ppl.models.registry import FitResult, ModelSpec, Problem, register
from ppl.transforms import nngp as _nngp_transforms
from ppl.transforms.nngp import Dense, Erf, Relu, kernel_fn, serial, unit_scale

__all__ = [
    "VARIANTS",
    "classification",
    "classification_guide",
    "classification_metrics",
    "classification_predict",
    "compare",
    "load_default",
    "load_digits_split",
    "make_net",
    "make_prior",
    "plot",
    "regression",
    "student_t_predict",
]

#: Relative jitter of a latent GP covariance, ``jitter · mean(diag K)``, by dtype: the one
#: :class:`ppl.transforms.nngp.infinite_width` uses (1e-10 in float64, 1e-6 in float32).
JITTER = _nngp_transforms.JITTER


def _jitter(K):
    return JITTER.get(jnp.dtype(K.dtype).name, 1e-6) * jnp.mean(jnp.diag(K))


#: Variants of :func:`load_default` (diabetes regression, spec §5 B1).
VARIANTS = ("clean", "outliers", "ood", "outliers-ood")

#: The B1 protocol: ReLU MLP, depth 2, σ_w² = 2, σ_b² = 0.1, τ² = 0.1.
B1_SETTINGS = {"depth": 2, "activation": "relu", "w_var": 2.0, "b_var": 0.1, "noise": 0.1}

#: The default ``scale_prior`` of :func:`regression`: IG(2, 2) (a Student-t process, ν = 4).
DEFAULT_SCALE_PRIOR = dist.InverseGamma(2.0, 2.0)

NUM_TRAIN = 353  # diabetes train split (of 442)
OUTLIER_FRACTION = 0.05


def student_t_predict(kernel_fn, x, y, x_test, a, b, noise_var):
    """The exact multivariate-t predictive of the latent f at ``x_test`` under an
    ``InverseGamma(a, b)`` scale prior with noise on the same scale (spec §1.3); see
    :func:`ppl.inference.nngp.student_t_predict` (this is the same function).

    :return: ``(df, loc [t], scale [t, t])``.
    """
    from ppl.inference.nngp import student_t_predict as _stp

    return _stp(kernel_fn, x, y, x_test, a, b, noise_var)


# ------------------------------------------------------------------------- checks


def _concrete(*xs) -> bool:
    return not any(isinstance(v, jax.core.Tracer) for v in xs)


def _check_features(x, name: str = "x"):
    x = jnp.asarray(x)
    if x.ndim not in (2, 4):
        raise ValueError(f"{name} must be [n, d] or [n, H, W, C], got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    if _concrete(x) and not np.all(np.isfinite(np.asarray(x))):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _check_positive(value, name: str):
    if _concrete(value):
        v = np.asarray(value, dtype=float)
        if v.shape != () or not (np.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_prior(prior, name: str = "scale_prior"):
    if not isinstance(prior, dist.Distribution):
        raise TypeError(f"{name} must be a numpyro Distribution, got {type(prior).__name__}")
    if prior.batch_shape != () or prior.event_shape != ():
        raise ValueError(
            f"{name} must be a scalar distribution (one shared σ²), got batch "
            f"{prior.batch_shape}, event {prior.event_shape}"
        )


def _scale_site(prior, dtype):
    """The ``scale`` site: sampled from ``prior``; a ``Delta`` point mass is observed at its
    value (the plain NNGP: no latent scale, so NUTS/SVI see nothing to infer there)."""
    if isinstance(prior, dist.Delta):
        return numpyro.sample("scale", prior, obs=jnp.asarray(prior.v, dtype))
    return numpyro.sample("scale", prior)


def _unit_kernel(net):
    return kernel_fn(unit_scale(net))


# --------------------------------------------------------------------- regression


def regression(
    x,
    y=None,
    *,
    net,
    scale_prior=DEFAULT_SCALE_PRIOR,
    noise=1e-2,
    latent=False,
    noise_scaled=True,
):
    """NNGP regression with a prior on the readout variance σ² (the ``scale`` site).

    With K = ``kernel_fn(unit_scale(net))(x)`` (σ_v = 1: the scale lives in the model) and
    τ² = ``noise``:

    * ``latent=False``: ``y ~ MVN(0, scale·(K + τ²I))`` (``noise_scaled``, spec §1.3: the
      noise shares the scale, so an inverse-gamma prior stays conjugate) or
      ``MVN(0, scale·K + τ²I)``;
    * ``latent=True``: ``f ~ MVN(0, scale·K + jitter·I)`` (jitter ``1e-10·mean diag K``), then
      ``y ~ Normal(f, √(scale·τ²))`` (``noise_scaled``) or ``Normal(f, τ)``, independent
      over the n points (``.to_event(1)``).

    k outputs (``y [n, k]``) share the scale and are independent given it; the Gaussians put
    the outputs in their batch dimension, so the sites ``f`` and ``y`` then hold
    ``[k, n]`` (``y.T``). Under ``marginalize_scale(regression)`` an ``InverseGamma(a, b)``
    scale is integrated out (one multivariate-t observation, spec §1.3).

    :param x: inputs ``[n, d]`` (or ``[n, H, W, C]`` for a convolutional ``net``).
    :param y: targets ``[n]`` or ``[n, k]``; ``None`` samples them.
    :param net: a network of :mod:`ppl.transforms.nngp` ending in a ``Dense`` readout
        (its ``W_std`` is ignored: the readout variance is ``scale``).
    :param scale_prior: scalar distribution on σ² > 0; ``dist.Delta(v)`` is the plain
        NNGP with σ² = v (the site is then observed at v).
    :param noise: τ² > 0.
    :param latent: sample the latent function ``f`` (for NUTS on f, or predictions of f).
    :param noise_scaled: noise variance ``scale·τ²`` (conjugate) instead of ``τ²``.
    :return: ``y`` in the layout of the input (``[n]`` or ``[n, k]``).

    Example::

        >>> from numpyro.infer.util import log_density
        >>> from ppl.transforms.nngp import Dense, Relu, serial
        >>> net = serial(Dense(W_std=1.4), Relu(), Dense())
        >>> x = jnp.linspace(-2.0, 2.0, 8)[:, None]
        >>> y = jnp.sin(2 * x[:, 0])
        >>> lp, _ = log_density(regression, (x, y), {"net": net}, {"scale": 2.0})
        >>> bool(jnp.isfinite(lp))
        True
    """
    x = _check_features(x)
    _check_prior(scale_prior)
    _check_positive(noise, "noise")
    n = x.shape[0]
    k = None
    yt = None
    if y is not None:
        y = jnp.asarray(y, x.dtype)
        if y.ndim not in (1, 2) or y.shape[0] != n:
            raise ValueError(f"y must be [n] or [n, k] with n = {n} (rows of x), got {y.shape}")
        if _concrete(y) and not np.all(np.isfinite(np.asarray(y))):
            raise ValueError("y contains NaN or inf")
        k = None if y.ndim == 1 else y.shape[1]
        yt = y if k is None else y.T
    K = _unit_kernel(net)(x)
    eye = jnp.eye(n, dtype=K.dtype)
    noise = jnp.asarray(noise, K.dtype)
    scale = _scale_site(scale_prior, K.dtype)
    zeros = jnp.zeros((n,) if k is None else (k, n), K.dtype)
    if latent:
        jitter = _jitter(K)
        f = numpyro.sample("f", dist.MultivariateNormal(zeros, scale * K + jitter * eye))
        sd = jnp.sqrt(scale * noise) if noise_scaled else jnp.sqrt(noise)
        out = numpyro.sample("y", dist.Normal(f, sd).to_event(1), obs=yt)
    elif noise_scaled:
        tril = jnp.linalg.cholesky(K + noise * eye)  # one Cholesky, independent of scale
        out = numpyro.sample(
            "y", dist.MultivariateNormal(zeros, scale_tril=jnp.sqrt(scale) * tril), obs=yt
        )
    else:
        out = numpyro.sample("y", dist.MultivariateNormal(zeros, scale * K + noise * eye), obs=yt)
    return out if k is None else out.T


# ------------------------------------------------------------------ classification


def _class_inputs(x, y, num_classes, inducing, batch_size):
    x = _check_features(x)
    z = _check_features(inducing, "inducing")
    if z.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"inducing must have the feature shape of x, {x.shape[1:]}, got {z.shape[1:]}"
        )
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    n = x.shape[0]
    if batch_size is not None and not (1 <= int(batch_size) <= n):
        raise ValueError(f"batch_size must be None or in 1..{n}, got {batch_size}")
    if y is not None:
        y = jnp.asarray(y)
        if y.shape != (n,):
            raise ValueError(f"y must be [n] = [{n}] class labels, got shape {y.shape}")
        if _concrete(y):
            yn = np.asarray(y)
            if not np.issubdtype(yn.dtype, np.integer) or yn.min() < 0 or yn.max() >= num_classes:
                raise ValueError(f"y must hold integer labels in 0..{num_classes - 1}")
    return x, y, z, int(num_classes), (None if batch_size is None else int(batch_size))


def _is_mixture(prior) -> bool:
    """``None`` and ``Delta`` priors: the SVGP baseline (no latent scale)."""
    if prior is None or isinstance(prior, dist.Delta):
        return False
    _check_prior(prior)
    return True


def _fixed_scale(prior, dtype):
    """σ² of the SVGP baseline: ``Delta(v)`` fixes it at v; ``None`` learns it by maximum
    likelihood (the positive param ``scale_ml``, shared by model and guide, initial 1)."""
    if prior is None:
        return numpyro.param("scale_ml", jnp.asarray(1.0, dtype), constraint=constraints.positive)
    return jnp.asarray(prior.v, dtype)


def _sparse_conditional(kfn, z, tril, xb, v):
    """p(f_B | v) in the whitened parameterisation u = L v (L = chol(K_ZZ + jitter)):
    loc ``[B, C]`` = (L⁻¹K_ZB)ᵀ vᵀ, the unit-scale variance ``[B]`` = diag(K_BB − K_BZ K_ZZ⁻¹
    K_ZB) (multiply by σ²), and W = L⁻¹K_ZB ``[M, B]``."""
    kzb = kfn(z, xb)  # [M, B]
    w = jax.scipy.linalg.solve_triangular(tril, kzb, lower=True)  # L⁻¹ K_ZB
    loc = (v @ w).T
    var = jnp.clip(kfn(xb, diag=True) - jnp.sum(w * w, axis=0), 1e-10, None)
    return loc, var, w


def _inducing_tril(kfn, z):
    kzz = kfn(z)
    m = kzz.shape[0]
    return jnp.linalg.cholesky(kzz + _jitter(kzz) * jnp.eye(m, dtype=kzz.dtype))


def classification(x, y=None, *, net, num_classes, inducing, scale_prior=None, batch_size=None):
    """Sparse variational GP / Student-t process classifier (spec §1.5): the model.

    C = ``num_classes`` latent functions share the unit-scale kernel K and one σ² (the
    ``scale`` site, prior ``scale_prior``; ``None``: the SVGP baseline with σ² learned by
    maximum likelihood (param ``scale_ml``); ``Delta(v)``: σ² fixed at v). Sites:

    * param ``inducing`` ``[M, ...]`` -- the M inducing inputs Z (learned, initialised from
      ``inducing``);
    * ``scale`` ``[]``; ``u`` ``[C, M]`` ~ N(0, σ²I): the *whitened* inducing values, the
      function values at Z being L u with L = chol(K_ZZ) (so u ~ N(0, σ²K_ZZ) at Z);
    * in ``plate("data", N, subsample_size=batch_size)``: ``f_noise`` ``[B, C]`` ~ N(0, I)
      and the deterministic ``f = K_BZ L⁻ᵀ u + √(σ² diag(K_BB − K_BZ K_ZZ⁻¹ K_ZB))·f_noise``
      -- a draw of the GP conditional p(f_B | u, σ²), written through standard noise so that
      the guide (which samples ``f_noise`` from the same N(0, I)) needs no kernel -- then
      ``y ~ Categorical(logits=f)``.

    With :func:`classification_guide` the ELBO is E[log p(y | f)] − KL(q(u|σ²) ‖ p(u|σ²))
    − KL(q(σ²) ‖ π) (the ``f_noise`` terms cancel; the KLs are estimated by Monte Carlo),
    which ``ppl.inference.SVI`` with ``ppl.objectives.elbo`` maximises.

    :param x: inputs ``[N, d]`` or ``[N, H, W, C]``.
    :param y: labels ``[N]`` in ``0..num_classes-1`` (``None``: sampled).
    :param net: network of :mod:`ppl.transforms.nngp` (readout scale ignored).
    :param num_classes: C ≥ 2.
    :param inducing: initial inducing inputs ``[M, ...]`` (same feature shape as x).
    :param scale_prior: prior on σ² (e.g. ``InverseGamma(2, 2)``: the SVTP), or ``None``.
    :param batch_size: minibatch size of the ``data`` plate (``None``: all N).

    Example::

        svi = ppl.inference.SVI(classification, classification_guide, optax.adam(1e-2),
                                ppl.objectives.elbo)
        res = svi.run(key, 500, x, y, net=net, num_classes=10, inducing=x[:100],
                      scale_prior=dist.InverseGamma(2.0, 2.0), batch_size=100)
        probs = classification_predict(res.params, x_test, net=net,
                                       scale_prior=dist.InverseGamma(2.0, 2.0))
    """
    x, y, z0, c, batch_size = _class_inputs(x, y, num_classes, inducing, batch_size)
    kfn = _unit_kernel(net)
    z = numpyro.param("inducing", z0)
    m = z.shape[0]
    if _is_mixture(scale_prior):
        scale = numpyro.sample("scale", scale_prior)
    else:
        scale = _fixed_scale(scale_prior, x.dtype)
    tril = _inducing_tril(kfn, z)
    # Whitened: u ~ N(0, σ²I), values at Z = L u. A diagonal q(u) in the unwhitened space
    # puts variance along K_ZZ's near-null directions, which K_ZZ⁻¹ then amplifies.
    u = numpyro.sample("u", dist.Normal(jnp.zeros((c, m), x.dtype), jnp.sqrt(scale)).to_event(1))
    with numpyro.plate("data", x.shape[0], subsample_size=batch_size):
        xb = numpyro.subsample(x, event_dim=x.ndim - 1)
        loc, var, _ = _sparse_conditional(kfn, z, tril, xb, u)
        eps = numpyro.sample("f_noise", _std_normal(loc.shape, x.dtype))
        f = numpyro.deterministic("f", loc + jnp.sqrt(scale * var)[:, None] * eps)
        yb = None if y is None else numpyro.subsample(y, event_dim=0)
        return numpyro.sample("y", dist.Categorical(logits=f), obs=yb)


def _std_normal(shape, dtype):
    """N(0, I) over the classes (last dim) of a ``[B, C]`` draw."""
    return dist.Normal(jnp.zeros(shape, dtype), 1.0).to_event(1)


def classification_guide(
    x, y=None, *, net, num_classes, inducing, scale_prior=None, batch_size=None
):
    """The variational family of :func:`classification` (spec §1.5; same signature).

    Params: ``u_loc`` ``[C, M]`` (m_c), ``u_var`` ``[C, M]`` (the diagonal S_c, positive; both
    in the whitened space of the model's ``u``, a deviation from spec §1.5's diagonal S_c on
    the function values at Z, which trains badly when K_ZZ is ill-conditioned),
    and for a scale mixture ``scale_a``, ``scale_b`` (q(σ²) = InverseGamma(a_q, b_q),
    initialised at the prior's a, b when it is inverse-gamma, else 2, 2); the inducing
    inputs are the model's param. Sites: ``scale ~ q(σ²)``, ``u ~ N(m_c, σ²S_c)``, and
    ``f_noise ~ N(0, I)`` in the data plate (the model's GP conditional is then exact).
    """
    x, y, z0, c, batch_size = _class_inputs(x, y, num_classes, inducing, batch_size)
    m = z0.shape[0]
    if _is_mixture(scale_prior):
        a0, b0 = 2.0, 2.0
        if isinstance(scale_prior, dist.InverseGamma):
            a0, b0 = scale_prior.concentration, scale_prior.rate
        a_q = numpyro.param("scale_a", jnp.asarray(a0, x.dtype), constraint=constraints.positive)
        b_q = numpyro.param("scale_b", jnp.asarray(b0, x.dtype), constraint=constraints.positive)
        scale = numpyro.sample("scale", dist.InverseGamma(a_q, b_q))
    else:
        scale = _fixed_scale(scale_prior, x.dtype)
    u_loc = numpyro.param("u_loc", jnp.zeros((c, m), x.dtype))
    u_var = numpyro.param("u_var", jnp.full((c, m), 0.1, x.dtype), constraint=constraints.positive)
    numpyro.sample("u", dist.Normal(u_loc, jnp.sqrt(scale * u_var)).to_event(1))
    with numpyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
        numpyro.sample("f_noise", _std_normal((idx.shape[0], c), x.dtype))


def classification_predict(
    params: Mapping, x, *, net, scale_prior=None, num_samples: int = 256, key=None, batch_size=512
):
    """Mean class probabilities ``[t, C]`` at ``x [t, ...]`` under the trained guide.

    q(f*_c) = ∫ N(Wᵀm_c, σ²(diag(Wᵀ S_c W) + diag B)) q(σ²) dσ², W = L⁻¹K_Z* (a Student-t
    for the SVTP, spec §1.5); ``num_samples`` joint draws of (σ², f*) are pushed through the
    softmax and averaged.

    :param params: the constrained params of the trained model and guide (``inducing``,
        ``u_loc``, ``u_var`` and, for a mixture, ``scale_a``, ``scale_b``).
    """
    x = _check_features(x)
    key = jax.random.PRNGKey(0) if key is None else key
    kfn = _unit_kernel(net)
    z = jnp.asarray(params["inducing"], x.dtype)
    u_loc = jnp.asarray(params["u_loc"], x.dtype)
    u_var = jnp.asarray(params["u_var"], x.dtype)
    tril = _inducing_tril(kfn, z)
    k_scale, k_f = jax.random.split(key)
    if _is_mixture(scale_prior):
        q = dist.InverseGamma(params["scale_a"], params["scale_b"])
        scales = q.sample(k_scale, (num_samples,)).astype(x.dtype)
    else:
        fixed = params["scale_ml"] if scale_prior is None else scale_prior.v
        scales = jnp.full((num_samples,), jnp.asarray(fixed, x.dtype))

    @jax.jit
    def block(xb, kb):
        loc, var, w = _sparse_conditional(kfn, z, tril, xb, u_loc)  # [B, C], [B], [M, B]
        var_c = var[:, None] + (w.T**2) @ u_var.T  # [B, C]
        eps = jax.random.normal(kb, (num_samples, *loc.shape), x.dtype)
        f = loc + jnp.sqrt(scales[:, None, None] * var_c) * eps
        return jnp.mean(jax.nn.softmax(f, axis=-1), axis=0)

    out = []
    keys = jax.random.split(k_f, max(1, math.ceil(x.shape[0] / batch_size)))
    for i, start in enumerate(range(0, x.shape[0], batch_size)):
        out.append(block(x[start : start + batch_size], keys[i]))
    return jnp.concatenate(out)


def classification_metrics(probs, y, *, num_bins: int = 15) -> dict:
    """Accuracy, NLL (mean −log p(y)) and ECE (``num_bins`` equal-width bins of the max
    probability) of predicted class probabilities ``probs [t, C]`` for labels ``y [t]``."""
    p = np.asarray(probs, np.float64)
    y = np.asarray(y)
    pred = p.argmax(1)
    conf = p.max(1)
    correct = pred == y
    nll = -np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-300, None)))
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    entropy = -np.sum(p * np.log(np.clip(p, 1e-300, None)), axis=1)
    return {
        "accuracy": float(correct.mean()),
        "nll": float(nll),
        "ece": float(ece),
        "entropy": float(entropy.mean()),
    }


# --------------------------------------------------------------------------- data


def _diabetes():
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    return np.asarray(d.data, np.float64), np.asarray(d.target, np.float64), list(d.feature_names)


def _inject_outliers(rng: np.random.Generator, y: np.ndarray, fraction: float):
    """Shift ``round(fraction·n)`` entries of ``y`` by ±U(4, 8) (standardised units): first
    the indices (``rng.choice(n, m, replace=False)``), then the signs
    (``rng.choice([-1, 1], m)``), then the magnitudes (``rng.uniform(4, 8, m)``)."""
    n = y.shape[0]
    m = int(round(fraction * n))
    idx = rng.choice(n, m, replace=False)
    sign = rng.choice([-1.0, 1.0], m)
    shift = rng.uniform(4.0, 8.0, m)
    y = y.copy()
    y[idx] += sign * shift
    return y, np.sort(idx)


def _synthetic(variant: str) -> dict:
    """The fallback set without scikit-learn: 1-D, y = sin(2x) + N(0, 0.1²) with the T3
    function of the spec; train x ~ U(−2, 2) (100 points, 5 % of the targets plus t₂ noise),
    test x ~ U(−3, 3) (100 points: partly outside the training range)."""
    rng = np.random.default_rng(0)
    x_tr = rng.uniform(-2.0, 2.0, (100, 1))
    x_te = rng.uniform(-3.0, 3.0, (100, 1)) if variant != "clean" else rng.uniform(-2, 2, (100, 1))
    y_tr = np.sin(2 * x_tr[:, 0]) + 0.1 * rng.standard_normal(100)
    y_te = np.sin(2 * x_te[:, 0]) + 0.1 * rng.standard_normal(100)
    idx = np.array([], int)
    if variant != "clean":
        m = 5
        idx = np.sort(rng.choice(100, m, replace=False))
        y_tr[idx] += rng.standard_t(2.0, m)
    return {
        "x_train": x_tr,
        "y_train": y_tr,
        "x_test": x_te,
        "y_test": y_te,
        "outliers": idx,
        "feature_names": ["x"],
        "axis_feature": 0,
        "source": "synthetic (scikit-learn not importable)",
    }


def load_default(variant: str = "outliers-ood", *, source: str = "auto") -> dict:
    """Diabetes regression (scikit-learn ``load_diabetes``, 442 × 10), spec §5 B1.

    X (each column) and y are standardised over all 442 rows first. Then, with one generator
    ``rng = np.random.default_rng(0)``:

    * ``"clean"``: ``perm = rng.permutation(442)``; train ``perm[:353]``, test ``perm[353:]``;
    * ``"outliers"``: the clean split, then 18 (5 %) training targets shifted by ±U(4, 8) sd
      (indices ``rng.choice(353, 18, replace=False)``, signs ``rng.choice([-1, 1], 18)``,
      magnitudes ``rng.uniform(4, 8, 18)``, drawn in that order after the permutation);
    * ``"ood"``: train on BMI ≤ its 80th percentile (354 rows), test on the other 88;
    * ``"outliers-ood"`` (the ``ppl fit nngp`` default: the issue's "5 % injected outliers and
      a shifted test split"): the OOD split, with 18 (5 % of 354) training targets shifted as
      in ``"outliers"`` (the permutation is drawn and discarded first, so the generator is
      in the same state).

    Test targets are never shifted. Without scikit-learn (or ``source="synthetic"``) a 1-D
    set is generated instead (see the ``source`` entry).

    :return: dict with ``x_train [n, 10]``, ``y_train [n]``, ``x_test [t, 10]``, ``y_test
        [t]`` (float64, standardised), ``outliers`` (indices into the training rows),
        ``feature_names``, ``axis_feature`` (2 = BMI, for plots), ``variant``, ``source``.

    Example::

        >>> d = load_default("clean")
        >>> d["x_train"].shape, d["x_test"].shape
        ((353, 10), (89, 10))
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if source not in ("auto", "diabetes", "synthetic"):
        raise ValueError(f"source must be auto, diabetes or synthetic, got {source!r}")
    data = None
    if source != "synthetic":
        try:
            x, y, names = _diabetes()
        except ImportError:
            if source == "diabetes":
                raise
        else:
            data = (x, y, names)
    if data is None:
        out = _synthetic(variant)
        out["variant"] = variant
        return out
    x, y, names = data
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    rng = np.random.default_rng(0)
    perm = rng.permutation(x.shape[0])
    if variant in ("clean", "outliers"):
        tr, te = perm[:NUM_TRAIN], perm[NUM_TRAIN:]
    else:
        bmi = x[:, names.index("bmi")]
        keep = bmi <= np.percentile(bmi, 80)
        tr, te = np.flatnonzero(keep), np.flatnonzero(~keep)
    y_tr, idx = y[tr], np.array([], int)
    if variant in ("outliers", "outliers-ood"):
        y_tr, idx = _inject_outliers(rng, y_tr, OUTLIER_FRACTION)
    return {
        "x_train": x[tr],
        "y_train": y_tr,
        "x_test": x[te],
        "y_test": y[te],
        "outliers": idx,
        "feature_names": names,
        "axis_feature": names.index("bmi"),
        "variant": variant,
        "source": "scikit-learn load_diabetes (standardised)",
    }


def load_digits_split(
    variant: str = "clean", *, images: bool = False, test_fraction: float = 0.2
) -> dict:
    """scikit-learn digits (1797 × 8×8, 10 classes) for classification (spec §5 B2).

    Pixels are divided by 16 (→ [0, 1]); ``np.random.default_rng(0).permutation(1797)``
    puts the first ``round((1 − test_fraction)·1797)`` rows in train. Variants: ``"clean"``;
    ``"ood"`` (classes 1, 4, 8 dropped from *training*; the test set keeps them, flagged by
    ``ood_mask``); ``"noise"`` (salt-and-pepper on 10 % of the *test* pixels, ``default_rng(0)``
    after the permutation: each chosen pixel set to 0 or 1 with probability ½).

    :param images: ``[n, 8, 8, 1]`` arrays (for ``Conv`` kernels) instead of ``[n, 64]``.
    :return: dict with ``x_train``, ``y_train`` (int32), ``x_test``, ``y_test``,
        ``ood_mask [t]`` (test rows of held-out classes), ``num_classes`` (10).
    """
    from sklearn.datasets import load_digits

    if variant not in ("clean", "ood", "noise"):
        raise ValueError(f"variant must be clean, ood or noise, got {variant!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    d = load_digits()
    x = np.asarray(d.data, np.float32) / 16.0
    y = np.asarray(d.target, np.int32)
    rng = np.random.default_rng(0)
    perm = rng.permutation(x.shape[0])
    n_tr = int(round((1 - test_fraction) * x.shape[0]))
    tr, te = perm[:n_tr], perm[n_tr:]
    x_tr, y_tr, x_te, y_te = x[tr], y[tr], x[te].copy(), y[te]
    held_out = np.isin(y_te, (1, 4, 8)) if variant == "ood" else np.zeros(len(te), bool)
    if variant == "ood":
        keep = ~np.isin(y_tr, (1, 4, 8))
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    if variant == "noise":
        hit = rng.random(x_te.shape) < 0.1
        x_te[hit] = (rng.random(int(hit.sum())) < 0.5).astype(np.float32)
    if images:
        x_tr, x_te = x_tr.reshape(-1, 8, 8, 1), x_te.reshape(-1, 8, 8, 1)
    return {
        "x_train": x_tr,
        "y_train": y_tr,
        "x_test": x_te,
        "y_test": y_te,
        "ood_mask": held_out,
        "num_classes": 10,
        "variant": variant,
    }


# ------------------------------------------------------------- networks, priors, comparison


def make_net(depth: int = 2, activation: str = "relu", w_var: float = 2.0, b_var: float = 0.1):
    """The spec's MLP: ``[Dense(σ_w, σ_b) → φ] × depth → Dense`` readout (unit scale).

    :param activation: ``"relu"`` or ``"erf"`` (closed-form kernels).
    :param w_var: σ_w²; ``b_var``: σ_b².
    """
    acts = {"relu": Relu, "erf": Erf}
    if activation not in acts:
        raise ValueError(f"activation must be relu or erf, got {activation!r}")
    if isinstance(depth, bool) or int(depth) != depth or depth < 1:
        raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
    _check_positive(w_var, "w_var")
    if not (math.isfinite(b_var) and b_var >= 0):
        raise ValueError(f"b_var must be finite and >= 0, got {b_var!r}")
    hidden = []
    for _ in range(int(depth)):
        hidden += [Dense(W_std=math.sqrt(w_var), b_std=math.sqrt(b_var)), acts[activation]()]
    return serial(*hidden, Dense())


#: ``--prior`` names: the plain NNGP (σ² at its maximum-likelihood value β/N), the
#: Student-t process (inverse-gamma), Burr XII and half-Cauchy on σ.
PRIORS = ("nngp", "ig", "burr", "halfcauchy")

PRIOR_LABELS = {
    "nngp": "NNGP",
    "ig": "Student-t (IG)",
    "burr": "Burr XII",
    "halfcauchy": "half-Cauchy on σ",
}


def make_prior(name: str, *, a=2.0, b=2.0, c=2.0, d=2.0, hc_scale=1.0):
    """The scale prior named ``name`` (see :data:`PRIORS`); ``None`` for ``"nngp"`` (the
    plug-in σ² = β/N of :func:`compare`)."""
    from ppl.distributions import BurrXII, HalfCauchyScale

    if name == "nngp":
        return None
    if name == "ig":
        _check_positive(a, "a")
        _check_positive(b, "b")
        return dist.InverseGamma(float(a), float(b))
    if name == "burr":
        return BurrXII(float(c), float(d))
    if name == "halfcauchy":
        return HalfCauchyScale(float(hc_scale))
    raise ValueError(f"prior must be one of {', '.join(PRIORS)}, got {name!r}")


def compare(
    data: Mapping,
    *,
    net,
    noise: float,
    priors: Mapping | None = None,
    methods: Mapping | None = None,
    num_nodes: int = 32,
    num_samples: int = 1000,
    num_warmup: int = 500,
    key=None,
) -> dict:
    """Fit the scale posterior under each prior and score the test predictive of y*.

    :param data: ``x_train``, ``y_train``, ``x_test``, ``y_test`` (as :func:`load_default`).
    :param priors: ``{name: prior}``; a ``None`` prior is the plain NNGP with the
        maximum-likelihood plug-in σ² = β/N (spec §5 B1). Default: ``nngp``, ``ig``
        (IG(2, 2)) and ``burr`` (Burr XII(2, 2)).
    :param methods: ``{name: method}`` of :func:`ppl.inference.nngp.fit` (default
        ``"closed"`` for an inverse-gamma prior, else ``"gh"``).
    :return: ``{name: {"prior", "post", "pred", "rmse", "nll", "log_evidence", "mean_scale"}}``
        with ``pred`` the :class:`~ppl.inference.nngp.Predictive` of y* on the test split,
        ``rmse`` of its mean and ``nll`` = mean −log p(y*) (standardised units).

    Example::

        >>> d = load_default("clean")
        >>> res = compare(d, net=make_net(), noise=0.1)
        >>> round(res["nngp"]["rmse"], 4), round(res["ig"]["nll"], 4)
        (0.7497, 1.1306)
    """
    from ppl.inference import nngp as inf

    if priors is None:
        priors = {"nngp": None, "ig": make_prior("ig"), "burr": make_prior("burr")}
    methods = dict(methods or {})
    x, y = data["x_train"], data["y_train"]
    x_test, y_test = data["x_test"], data["y_test"]
    out = {}
    stats = None  # (β, N) of the first fit: the data's Gaussian statistics
    order = sorted(priors, key=lambda name: priors[name] is None)  # the plug-in needs β/N
    for name in order:
        prior = priors[name]
        if prior is None:
            if stats is None:
                probe = inf.fit(net, x, y, prior=dist.Delta(1.0), noise=noise)
                stats = (float(probe.beta), float(probe.num_obs))
            prior = dist.Delta(stats[0] / stats[1])
        default = "closed" if isinstance(prior, dist.InverseGamma) else "gh"
        method = methods.get(name, default)
        post = inf.fit(
            net,
            x,
            y,
            prior=prior,
            noise=noise,
            method=method,
            num_nodes=num_nodes,
            num_samples=num_samples,
            num_warmup=num_warmup,
            key=key,
        )
        stats = (float(post.beta), float(post.num_obs)) if stats is None else stats
        pred = inf.predict(post, x_test)
        out[name] = {
            "prior": prior,
            "method": "plug-in" if isinstance(prior, dist.Delta) else method,
            "post": post,
            "pred": pred,
            "rmse": float(np.sqrt(np.mean((np.asarray(pred.mean) - y_test) ** 2))),
            "nll": float(-np.mean(pred.log_prob(y_test))),
            "log_evidence": float(post.log_evidence),
            "mean_scale": float(post.mean_scale),
        }
    return {name: out[name] for name in priors}


# -------------------------------------------------------------------------- plots


def _band(pred, level: float = 0.95):
    """Central ``level`` interval ``(lo [t], hi [t])`` of a 1-output predictive: Student-t
    quantiles under inverse-gamma mixing, else the quantiles of the Gaussian mixture over
    the posterior's nodes (bisection on its CDF, NumPy)."""
    from scipy import stats

    mean = np.asarray(pred.mean, np.float64)
    qs = ((1 - level) / 2, (1 + level) / 2)
    if pred.scale is not None:
        return tuple(stats.t.ppf(q, pred.df, mean, pred.scale) for q in qs)
    sd = np.sqrt(np.exp(np.asarray(pred.log_scale_nodes))[:, None] * pred.unit_variance[None])
    w = np.exp(np.asarray(pred.log_weights))[:, None]
    out = []
    for q in qs:
        lo = mean - 40 * sd.max(0)
        hi = mean + 40 * sd.max(0)
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            below = np.sum(w * stats.norm.cdf((mid - mean) / sd), axis=0) < q
            lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
        out.append(0.5 * (lo + hi))
    return tuple(out)


def plot(results: Mapping, data: Mapping) -> dict:
    """Figures of a :func:`compare` result: ``{"predictive": fig, "scale": fig}``.

    * ``predictive`` -- one panel per prior: the test targets against the rank of the
      predicted mean, with the mean and the central 95 % band of y* (exact quantiles of
      each predictive), the band's empirical coverage and the test NLL in the title;
    * ``scale`` -- the posterior density of ln σ² under each prior (exact on a grid:
      ``π(σ²)·σ²·e^{ℓ(σ²)}/p(y)``), its prior (dashed), the nodes/draws of the fit
      (markers, height ∝ weight) and the NNGP plug-in σ² (vertical line).
    """
    import matplotlib.pyplot as plt

    from ppl.inference import nngp as inf

    y_test = np.asarray(data["y_test"])
    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), sharey=True)
    axes = np.atleast_1d(axes)
    ref = results[names[0]]["pred"].mean
    order = np.argsort(np.asarray(ref))
    rank = np.arange(len(order))
    for i, (ax, name) in enumerate(zip(axes, names, strict=True)):
        r = results[name]
        lo, hi = _band(r["pred"])
        cover = float(np.mean((y_test >= lo) & (y_test <= hi)))
        ax.fill_between(rank, lo[order], hi[order], color=f"C{i}", alpha=0.25, label="95% band")
        ax.plot(rank, np.asarray(r["pred"].mean)[order], color=f"C{i}", lw=1.2, label="mean")
        ax.scatter(rank, y_test[order], s=8, color="k", zorder=3, label="test y")
        ax.set_title(
            f"{PRIOR_LABELS.get(name, name)}\nNLL {r['nll']:.3f}, coverage {cover:.2f}",
            fontsize=9,
        )
        ax.set_xlabel("test point (by predicted mean)")
    axes[0].set_ylabel("y (standardised)")
    axes[0].legend(loc="upper left", fontsize=7)
    fig.suptitle(f"{data.get('variant', '')}: predictive of y* on the test split", fontsize=10)
    fig.tight_layout()

    fig2, ax = plt.subplots(figsize=(7, 3.8))
    for i, name in enumerate(names):
        r = results[name]
        post, prior = r["post"], r["prior"]
        nodes = np.asarray(post.log_scale_nodes)
        if isinstance(prior, dist.Delta):
            ax.axvline(nodes[0], color=f"C{i}", lw=1.5, label=f"{PRIOR_LABELS.get(name, name)}")
            continue
        width = max(3.0, 1.5 * (nodes.max() - nodes.min()) / 2)
        grid = np.linspace(nodes.mean() - width, nodes.mean() + width, 400)
        lab = PRIOR_LABELS.get(name, name)
        with jax.enable_x64(True):
            s = jnp.exp(jnp.asarray(grid))
            lp_prior = np.asarray(prior.log_prob(s) + jnp.asarray(grid))
            ll = inf.log_likelihood(s, post.beta, post.logdet, post.num_obs)
            lp_post = lp_prior + np.asarray(ll)
        if np.isfinite(r["log_evidence"]):
            dens = np.exp(lp_post - r["log_evidence"])
            ax.plot(grid, dens, color=f"C{i}", label=f"{lab} posterior")
            w = np.asarray(post.weights)
            top = dens.max() if dens.size else 1.0
            ax.plot(nodes, w / w.max() * top, "o", ms=2.5, color=f"C{i}", alpha=0.6)
        else:  # NUTS draws: no evidence, a histogram of ln σ²
            ax.hist(nodes, bins=30, density=True, color=f"C{i}", alpha=0.4, label=f"{lab} draws")
        ax.plot(grid, np.exp(lp_prior), "--", color=f"C{i}", lw=0.8, label=f"{lab} prior")
    ax.set_xlabel("ln σ² (readout variance)")
    ax.set_ylabel("density of ln σ²")
    ax.set_title("scale posterior (markers: fit nodes/draws, height ∝ weight)", fontsize=10)
    ax.legend(fontsize=7)
    fig2.tight_layout()
    return {"predictive": fig, "scale": fig2}


# ------------------------------------------------------------------------ ppl fit nngp


def _options(group):
    group.add_argument(
        "--prior",
        choices=PRIORS,
        default="ig",
        help="scale prior whose posterior goes to posterior.nc: nngp (point mass at the "
        "ML σ² = β/N), ig (Student-t process), burr (Burr XII), halfcauchy (half-Cauchy on "
        "σ) (default: %(default)s); summary.txt compares all four",
    )
    group.add_argument("--a", type=float, default=2.0, help="IG shape a (default: %(default)s)")
    group.add_argument("--b", type=float, default=2.0, help="IG rate b (default: %(default)s)")
    group.add_argument(
        "--burr-c", type=float, default=2.0, help="Burr XII c (default: %(default)s)"
    )
    group.add_argument(
        "--burr-d", type=float, default=2.0, help="Burr XII d (default: %(default)s)"
    )
    group.add_argument(
        "--hc-scale",
        type=float,
        default=1.0,
        help="half-Cauchy scale of σ (default: %(default)s)",
    )
    group.add_argument(
        "--variant",
        choices=VARIANTS,
        default="outliers-ood",
        help="diabetes split (spec §5 B1): clean, outliers (5%% of the training targets "
        "shifted by ±U(4, 8) sd), ood (train on BMI <= its 80th percentile, test on the "
        "rest) or outliers-ood, both (default: %(default)s)",
    )
    group.add_argument("--depth", type=int, default=2, help="hidden layers (default: %(default)s)")
    group.add_argument(
        "--activation", choices=("relu", "erf"), default="relu", help="(default: %(default)s)"
    )
    group.add_argument("--w-var", type=float, default=2.0, help="σ_w² (default: %(default)s)")
    group.add_argument("--b-var", type=float, default=0.1, help="σ_b² (default: %(default)s)")
    group.add_argument(
        "--noise",
        type=float,
        default=0.1,
        help="noise τ² on the scale of the signal, C = K + τ²I (default: %(default)s)",
    )
    group.add_argument(
        "--num-nodes",
        type=int,
        default=32,
        help="Gauss-Hermite nodes over ln σ² (--inference gh) (default: %(default)s)",
    )


def _validate(opts):
    for name in ("a", "b", "burr_c", "burr_d", "hc_scale", "w_var", "noise"):
        v = getattr(opts, name)
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"--{name.replace('_', '-')} must be finite and > 0, got {v}")
    if not (math.isfinite(opts.b_var) and opts.b_var >= 0):
        raise ValueError(f"--b-var must be finite and >= 0, got {opts.b_var}")
    if opts.depth < 1:
        raise ValueError(f"--depth must be >= 1, got {opts.depth}")
    if opts.num_nodes < 1:
        raise ValueError(f"--num-nodes must be >= 1, got {opts.num_nodes}")
    if opts.inference == "closed" and opts.prior != "ig":
        raise ValueError(
            f"--inference closed needs --prior ig (conjugate), got --prior {opts.prior}"
        )


def _priors(opts) -> dict:
    kw = dict(a=opts.a, b=opts.b, c=opts.burr_c, d=opts.burr_d, hc_scale=opts.hc_scale)
    return {name: make_prior(name, **kw) for name in PRIORS}


def _build(opts) -> Problem:
    data = load_default(opts.variant)
    net = make_net(opts.depth, opts.activation, opts.w_var, opts.b_var)
    prior = _priors(opts)[opts.prior]
    kwargs = {"net": net, "noise": opts.noise}
    if prior is not None:
        kwargs["scale_prior"] = prior
    return Problem(
        model=regression,
        args=(data["x_train"], data["y_train"]),
        kwargs=kwargs,
        data={"data": data, "net": net},
    )


def _scale_draws(post, num: int, method: str, key, rng: np.random.Generator) -> np.ndarray:
    """``num`` posterior draws of σ²: exact inverse-gamma draws (closed form), the NUTS
    draws themselves, else the nodes / importance draws resampled by weight."""
    nodes = np.asarray(post.log_scale_nodes)
    if post.a is not None:
        return float(post.b) / rng.gamma(float(post.a), size=num)
    if method == "nuts" and nodes.size > 1:
        return np.exp(np.resize(nodes, num))
    idx = jax.random.categorical(key, jnp.asarray(post.log_weights), shape=(num,))
    return np.exp(nodes[np.asarray(idx)])


def _fit(spec, problem: Problem, opts, rng_key) -> FitResult:
    """Scale posteriors of all four priors (the chosen one by ``--inference``), the test
    predictives, and an InferenceData of the chosen one."""
    import arviz as az
    import xarray as xr

    data, net = problem.data["data"], problem.data["net"]
    priors = _priors(opts)
    key_fit, rng_key = jax.random.split(rng_key)
    methods = {opts.prior: opts.inference}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        results = compare(
            data,
            net=net,
            noise=opts.noise,
            priors=priors,
            methods=methods,
            num_nodes=opts.num_nodes,
            num_samples=opts.num_samples,
            num_warmup=getattr(opts, "num_warmup", 500),
            key=key_fit,
        )
    chosen = results[opts.prior]
    post, pred = chosen["post"], chosen["pred"]
    rng = np.random.default_rng(opts.seed)
    scale = _scale_draws(post, opts.num_samples, opts.inference, rng_key, rng)
    # y* draws at the same σ² draws: N(μ*, σ²·(s*² + τ²)) independently over test points
    z = rng.standard_normal((scale.size, np.size(pred.mean)))
    y_pp = np.asarray(pred.mean) + np.sqrt(scale[:, None] * np.asarray(pred.unit_variance)) * z
    nodes = np.asarray(post.log_scale_nodes)
    idata = az.from_dict(
        posterior={"scale": scale[None]},
        posterior_predictive={"y": np.asarray(y_pp)[None]},
        observed_data={"y": np.asarray(data["y_test"])},
        dims={"y": ["test"]},
    )
    idata.add_groups(
        constant_data=xr.Dataset(
            {
                "x_test": (("test", "feature"), np.asarray(data["x_test"])),
                "pred_mean": ("test", np.asarray(pred.mean)),
                "pred_variance": ("test", np.asarray(pred.variance)),
                "log_scale_nodes": ("node", nodes),
                "log_weights": ("node", np.asarray(post.log_weights)),
            }
        )
    )
    attrs = {
        "prior": opts.prior,
        "method": chosen["method"],
        "variant": data["variant"],
        "log_evidence": chosen["log_evidence"],
        "ess": float(post.ess),
    }
    for name, r in results.items():
        attrs[f"rmse_{name}"] = r["rmse"]
        attrs[f"nll_{name}"] = r["nll"]
        attrs[f"log_evidence_{name}"] = r["log_evidence"]
    idata.posterior.attrs.update(attrs)
    n_out = len(data["outliers"])
    notes = [
        f"data: {data['source']}, variant {data['variant']}: {len(data['y_train'])} train "
        f"({n_out} shifted outliers), {len(data['y_test'])} test",
        f"kernel: {opts.activation} MLP, depth {opts.depth}, σ_w² = {opts.w_var:g}, "
        f"σ_b² = {opts.b_var:g}; noise τ² = {opts.noise:g} (on the scale)",
        f"posterior.nc: σ² under --prior {opts.prior} by {chosen['method']}"
        + (f" (ESS {float(post.ess):.1f})" if opts.inference in ("is", "nuts") else ""),
        "test split (standardised units): model | RMSE | NLL | log p(y_train) | E[σ²|y]",
    ]
    for name, r in results.items():
        label = PRIOR_LABELS[name]
        if name == "ig":
            label += f" IG({opts.a:g}, {opts.b:g})"
        elif name == "burr":
            label += f" ({opts.burr_c:g}, {opts.burr_d:g})"
        elif name == "halfcauchy":
            label += f" ({opts.hc_scale:g})"
        elif name == "nngp":
            label += " (σ² = β/N)"
        notes.append(
            f"  {label} [{r['method']}] | RMSE {r['rmse']:.4f} | NLL {r['nll']:.4f} | "
            f"log evidence {r['log_evidence']:.4f} | E[σ²|y] {r['mean_scale']:.4g}"
        )
    if opts.inference == "nuts":
        notes.append(
            "NUTS: one chain of --num-samples draws after --num-warmup (ppl.inference.nngp)"
        )
    for w in caught:
        notes.append(f"warning: {w.message}")
    return FitResult(idata=idata, losses=None, result=results, notes=notes)


def _plot(fit: FitResult, problem: Problem, out_dir):
    return plot(fit.result, problem.data["data"])


register(
    ModelSpec(
        name="nngp",
        description="scale mixtures of NNGPs: NNGP vs Student-t vs Burr XII regression",
        build=_build,
        plot=_plot,
        options=_options,
        validate=_validate,
        inference=("gh", "closed", "is", "nuts"),
        drivers={"gh": _fit, "closed": _fit, "is": _fit, "nuts": _fit},
        default_num_samples=1000,
        details=(
            "Regression on scikit-learn's diabetes data (standardised; default: 5% of the "
            "training targets shifted by ±U(4, 8) sd, trained on BMI <= its 80th percentile "
            "and tested on the rest) with the infinite-width ReLU MLP kernel. The posterior "
            "of the readout variance σ² is computed under the plain NNGP (ML plug-in), an "
            "inverse-gamma prior (the Student-t process, closed form), Burr XII and "
            "half-Cauchy priors (Gauss-Hermite over ln σ²); --inference picks the method for "
            "--prior, whose σ² draws and test predictive go to posterior.nc. "
            "predictive.png shows 95% bands, scale.png the scale posteriors."
        ),
    )
)
