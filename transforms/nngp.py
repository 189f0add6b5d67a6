"""Infinite-width networks as Gaussian processes, and scale mixtures of them.

An infinitely wide network of a given architecture is a Gaussian process whose covariance is
the **NNGP kernel** K, computed layer by layer (Lee et al., ICLR 2022, after Neal 1996 and
Lee et al. 2018). Putting a prior π on the variance σ² of the last layer's weights (the
**readout scale**) makes the output a **scale mixture** of GPs; an inverse-gamma IG(a, b)
prior gives a Student-t process with ν = 2a and scale (b/a)·K.

This module holds three things:

* a stax-like **network description** (:class:`Dense`, :class:`Conv`, :class:`Relu`,
  :class:`Erf`, :class:`LeakyRelu`, :class:`Abs`, :class:`Activation`, :class:`Flatten`,
  :class:`Identity`, :func:`serial`, :func:`parallel`, :class:`FanOut`, :class:`FanInSum`):
  frozen dataclasses registered as pytrees, with the hyperparameters (``W_std``, ``b_std``,
  ``alpha``) as leaves so that ``jax.grad`` reaches them;
* :func:`kernel_fn`, the NNGP kernel of such a network (closed forms for ReLU, leaky ReLU,
  abs and erf; 2-D Gauss–Hermite for any other activation);
* the **program transformations** acting on the :func:`network` primitive of a NumPyro
  model: :class:`infinite_width` (a finite network becomes its GP), :class:`scale_mixture`
  (a prior on the readout scale) and :class:`marginalize_scale` (an inverse-gamma scale
  integrated out in closed form: a multivariate Student-t observation).

**Parameterisation** (NTK, the neural-tangents default). A dense layer maps h ∈ ℝ^{n_in} to
(σ_w/√n_in)·W h + σ_b·b with W, b iid N(0, 1). With input dimension d and activation φ:

* K⁰(x, x') = σ_w²·x·x'/d + σ_b²,
* E^l(x, x') = E[φ(u)φ(v)], (u, v) ~ N(0, [[K^l(x,x), K^l(x,x')], [K^l(x,x'), K^l(x',x')]]),
* K^{l+1} = σ_w²·E^l + σ_b².

The last element of a network is its **readout** :class:`Dense`; its ``W_std`` is σ_v. A
convolution with a :class:`Flatten` readout only needs same-position covariances
K_p^{l+1} = σ_w²·mean_{q ∈ patch(p)} E_q^l + σ_b² (zero padding contributes 0), and the
flattened readout averages them over positions.

Example (spec T1, ReLU depth 1, σ_w² = 2, σ_b² = 0.1, unit readout):

>>> import jax.numpy as jnp
>>> import numpy as np
>>> from ppl.transforms.nngp import Dense, Relu, kernel_fn, serial
>>> net = serial(Dense(W_std=2**0.5, b_std=0.1**0.5), Relu(), Dense(W_std=1.0))
>>> k = kernel_fn(net)
>>> x = jnp.array([[1.0, 0.5, -0.3], [-0.2, 0.8, 0.4]])
>>> print(np.round(np.asarray(k(x), dtype=float), 4))
[[0.4967 0.1695]
 [0.1695 0.33  ]]
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax import lax
from jax.scipy.special import erf, gammaln
from numpyro.distributions import constraints
from numpyro.primitives import _PYRO_STACK, Messenger, apply_stack

__all__ = [
    "Abs",
    "Activation",
    "Conv",
    "Dense",
    "Erf",
    "FanInSum",
    "FanOut",
    "Flatten",
    "Identity",
    "LeakyRelu",
    "MARGINALIZED",
    "Relu",
    "infinite_width",
    "kernel_fn",
    "marginalize_scale",
    "network",
    "parallel",
    "scale_mixture",
    "scale_structure",
    "serial",
    "unit_scale",
    "unit_scale_statistics",
]

#: Message type of the :func:`network` primitive.
NETWORK = "nngp_network"

#: Relative jitter added to the GP covariance by :class:`infinite_width`:
#: ``jitter(dtype) · mean(diag K)``, 1e-10 in float64 and 1e-6 in float32 (whose Cholesky
#: fails on nearly coincident inputs below that).
JITTER = {"float64": 1e-10, "float32": 1e-6}


# ------------------------------------------------------------------------- the layers


def _layer(data=(), meta=()):
    """Freeze a dataclass and register it as a pytree with ``data`` leaves.

    Registered as a custom node rather than with ``jax.tree_util.register_dataclass``: in jax
    0.10 two dataclass nodes with the same fields compare equal whatever their class (so
    ``Abs()`` and ``Erf()`` had equal tree structures), and ``jit``'s cache, keyed on tree
    structures, could then run the kernel compiled for one activation on the other.
    """

    def wrap(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)

        def flatten_with_keys(layer):
            children = [(jax.tree_util.GetAttrKey(n), getattr(layer, n)) for n in data]
            return children, tuple(getattr(layer, n) for n in meta)

        def unflatten(aux, children):
            fields = dict(zip(data, children, strict=True))
            return cls(**fields, **dict(zip(meta, aux, strict=True)))

        def flatten(layer):
            return [getattr(layer, n) for n in data], tuple(getattr(layer, n) for n in meta)

        jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
        return cls

    return wrap


@_layer(data=("W_std", "b_std"), meta=("out",))
class Dense:
    """Fully connected layer h ↦ (W_std/√n_in)·W h + b_std·b, W, b iid N(0, 1).

    :param out: output width; ``None`` for a hidden layer (any width: irrelevant in the
        limit; :func:`network` uses its ``width``) or one output for a readout.
    :param W_std: weight standard deviation σ_w (σ_v for the readout).
    :param b_std: bias standard deviation σ_b.
    """

    out: int | None = None
    W_std: Any = 1.0
    b_std: Any = 0.0


@_layer(data=("W_std", "b_std"), meta=("filter_shape", "strides", "padding", "out"))
class Conv:
    """2-D convolution over ``[n, H, W, C]`` inputs, NTK-parameterised like :class:`Dense`
    (fan-in = filter size × input channels).

    :param filter_shape: ``(fh, fw)``.
    :param strides: ``(sh, sw)``.
    :param padding: ``"SAME"`` (zero padding) or ``"VALID"``.
    """

    filter_shape: tuple = (3, 3)
    strides: tuple = (1, 1)
    padding: str = "SAME"
    W_std: Any = 1.0
    b_std: Any = 0.0
    out: int | None = None


@_layer()
class Relu:
    """φ(u) = max(u, 0) (closed-form arc-cosine kernel)."""


@_layer()
class Erf:
    """φ(u) = erf(u) (closed form: E = (2/π)·arcsin(2k₁₂/√((1+2k₁)(1+2k₂))))."""


@_layer(data=("alpha",))
class LeakyRelu:
    """φ(u) = max(u, α u) = (1−α)·relu(u) + α u; E = (1−α)²·E_relu + α k₁₂."""

    alpha: Any = 0.01


@_layer()
class Abs:
    """φ(u) = |u| = 2·relu(u) − u; E = 4·E_relu − k₁₂."""


@_layer(meta=("fn", "num_nodes"))
class Activation:
    """Any elementwise activation ``fn``, integrated by 2-D Gauss–Hermite quadrature.

    The error decays fast for smooth ``fn`` (≤ 2e-7 for tanh and GELU at 32 nodes per axis)
    but only like 1/num_nodes for kinks: use :class:`Relu`, :class:`LeakyRelu`,
    :class:`Abs` and :class:`Erf`, which are exact.

    :param fn: a JAX-traceable elementwise function.
    :param num_nodes: Gauss–Hermite nodes per axis.
    """

    fn: Callable
    num_nodes: int = 32


@_layer()
class Flatten:
    """``[n, H, W, C] → [n, H·W·C]``: the kernel averages the same-position covariances."""


@_layer()
class Identity:
    """The identity (a skip branch of :func:`parallel`)."""


@_layer(meta=("k",))
class FanOut:
    """Copy the input into ``k`` branches (followed by :func:`parallel`)."""

    k: int = 2


@_layer()
class FanInSum:
    """Sum the branches (independent in the limit, so their kernels add)."""


@_layer(data=("layers",))
class Serial:
    """Layers applied in order (built by :func:`serial`)."""

    layers: tuple


@_layer(data=("branches",))
class Parallel:
    """One network per branch of a :class:`FanOut` (built by :func:`parallel`)."""

    branches: tuple


def serial(*layers) -> Serial:
    """Compose layers in order: ``serial(Dense(), Relu(), Dense(W_std=1.0))``."""
    for i, layer in enumerate(layers):
        if not isinstance(layer, _LAYERS):
            raise TypeError(f"serial: layer {i} is {type(layer).__name__}, not a layer")
    return Serial(tuple(layers))


def parallel(*branches) -> Parallel:
    """Apply ``branches[i]`` to branch i of a preceding :class:`FanOut`."""
    for i, layer in enumerate(branches):
        if not isinstance(layer, _LAYERS):
            raise TypeError(f"parallel: branch {i} is {type(layer).__name__}, not a layer")
    return Parallel(tuple(branches))


_ACTIVATIONS = (Relu, Erf, LeakyRelu, Abs, Activation)
_LAYERS = (Dense, Conv, Flatten, Identity, FanOut, FanInSum, Serial, Parallel, *_ACTIVATIONS)


# ------------------------------------------------------------------- structure checks


def _flat(net) -> tuple:
    return net.layers if isinstance(net, Serial) else (net,)


def _readout(net) -> Dense:
    layers = _flat(net)
    if not layers or not isinstance(layers[-1], Dense):
        last = type(layers[-1]).__name__ if layers else "nothing"
        raise ValueError(f"the network must end with a Dense readout layer, got {last}")
    return layers[-1]


def _check(layer, rank: int, where: str = "net"):
    """Walk the network with the input's rank (0: ``[n, d]``, 2: ``[n, H, W, C]``); return
    the output rank (a tuple of ranks after a :class:`FanOut`). Raises ``ValueError``."""
    if isinstance(layer, Serial):
        for i, sub in enumerate(layer.layers):
            rank = _check(sub, rank, f"{where}[{i}]")
        return rank
    if isinstance(rank, tuple):
        if isinstance(layer, Parallel):
            if len(layer.branches) != len(rank):
                raise ValueError(
                    f"{where}: parallel has {len(layer.branches)} branches for "
                    f"{len(rank)} inputs (FanOut({len(rank)}))"
                )
            pairs = zip(layer.branches, rank, strict=True)
            return tuple(_check(b, r, f"{where}.{i}") for i, (b, r) in enumerate(pairs))
        if isinstance(layer, FanInSum):
            if len(set(rank)) != 1:
                raise ValueError(f"{where}: FanInSum of branches with different ranks {rank}")
            return rank[0]
        raise ValueError(
            f"{where}: {type(layer).__name__} after FanOut; expected parallel(...) or FanInSum()"
        )
    if isinstance(layer, (Parallel, FanInSum)):
        raise ValueError(f"{where}: {type(layer).__name__} needs a preceding FanOut")
    if isinstance(layer, FanOut):
        if int(layer.k) < 1:
            raise ValueError(f"{where}: FanOut(k) needs k ≥ 1, got {layer.k}")
        return (rank,) * int(layer.k)
    if isinstance(layer, Dense) and rank != 0:
        raise ValueError(f"{where}: Dense on image features [n, H, W, C]; add Flatten() first")
    if isinstance(layer, Conv):
        if rank != 2:
            raise ValueError(f"{where}: Conv needs image inputs [n, H, W, C], got [n, d]")
        if layer.padding not in ("SAME", "VALID"):
            raise ValueError(
                f"{where}: Conv padding must be 'SAME' or 'VALID', got {layer.padding!r}"
            )
    if isinstance(layer, Flatten):
        return 0
    if isinstance(layer, Activation) and int(layer.num_nodes) < 1:
        raise ValueError(f"{where}: Activation num_nodes must be ≥ 1, got {layer.num_nodes}")
    return rank


def _validate(net):
    if not isinstance(net, _LAYERS):
        raise TypeError(f"net must be a layer or serial(...) of layers, got {type(net).__name__}")
    _readout(net)
    if isinstance(_check(net, 0, "net") if not _needs_images(net) else _check(net, 2), tuple):
        raise ValueError("the network ends with unmerged FanOut branches; add FanInSum()")


def _needs_images(net) -> bool:
    return any(isinstance(layer, (Conv, Flatten)) for layer in _iter_layers(net))


def _iter_layers(net):
    if isinstance(net, Serial):
        for sub in net.layers:
            yield from _iter_layers(sub)
    elif isinstance(net, Parallel):
        for sub in net.branches:
            yield from _iter_layers(sub)
    else:
        yield net


def unit_scale(net) -> Serial:
    """The same network with a unit-scale readout (``W_std = 1``, ``b_std = 0``): the
    readout variance then lives in the model (a ``scale`` site).

    Example:

    >>> net = unit_scale(serial(Dense(W_std=1.4), Relu(), Dense(W_std=3.0, b_std=0.1)))
    >>> net.layers[-1]
    Dense(out=None, W_std=1.0, b_std=0.0)
    """
    _validate(net)
    layers = _flat(net)
    return Serial((*layers[:-1], dataclasses.replace(layers[-1], W_std=1.0, b_std=0.0)))


def _scaled_readout(net, scale):
    """``net`` with the readout variance multiplied by ``scale``."""
    if scale is None:
        return net
    layers = _flat(net)
    out = layers[-1]
    return Serial((*layers[:-1], dataclasses.replace(out, W_std=out.W_std * jnp.sqrt(scale))))


# ------------------------------------------------------------------------- the kernel


class _Cov(NamedTuple):
    """Covariances at one layer: ``cov`` = K(x₁, x₂) ``[n1, n2, *spatial]`` and the variances
    ``k1`` = K(x₁, x₁) ``[n1, 1, *spatial]``, ``k2`` = K(x₂, x₂) ``[1, n2, *spatial]``
    (all three ``[n, *spatial]`` for a diagonal)."""

    cov: jax.Array
    k1: jax.Array
    k2: jax.Array


def _map(fn, *states):
    return _Cov(*(fn(*parts) for parts in zip(*states, strict=True)))


def _safe_sqrt(x):
    """√x with a finite gradient at 0 (where the value is 0)."""
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def _relu_e(k1, k12, k2):
    """E[relu(u) relu(v)] (arc-cosine kernel of degree 1)."""
    norm = _safe_sqrt(k1 * k2)
    c = jnp.clip(k12 / jnp.where(norm > 0, norm, 1.0), -1.0, 1.0)
    s = _safe_sqrt(1.0 - c * c)
    theta = jnp.arctan2(s, c)
    return norm / (2 * math.pi) * (s + (math.pi - theta) * c)


def _relu(st: _Cov) -> _Cov:
    return _Cov(_relu_e(st.k1, st.cov, st.k2), st.k1 / 2, st.k2 / 2)


def _erf_e(k1, k12, k2):
    return (2 / math.pi) * jnp.arcsin(2 * k12 / jnp.sqrt((1 + 2 * k1) * (1 + 2 * k2)))


def _gauss_hermite(num_nodes: int, dtype):
    """Nodes and weights for ∫ g(t) e^{−t²/2}/√(2π) dt."""
    t, w = np.polynomial.hermite_e.hermegauss(int(num_nodes))
    return jnp.asarray(t, dtype), jnp.asarray(w / math.sqrt(2 * math.pi), dtype)


def _gh_e(fn, num_nodes, k1, k12, k2):
    """E[φ(u)φ(v)] by 2-D Gauss–Hermite: (u, v) = L(tᵢ, tⱼ), L the Cholesky factor."""
    t, w = _gauss_hermite(num_nodes, k12.dtype)
    l11 = _safe_sqrt(k1)
    l21 = k12 / jnp.where(l11 > 0, l11, 1.0)
    l22 = _safe_sqrt(k2 - l21 * l21)

    def row(acc, tw):
        ti, wi = tw
        inner = jnp.tensordot(fn(l21[..., None] * ti + l22[..., None] * t), w, axes=1)
        return acc + wi * fn(l11 * ti) * inner, None

    out, _ = lax.scan(
        row, jnp.zeros(jnp.broadcast_shapes(k1.shape, k12.shape, k2.shape), k12.dtype), (t, w)
    )
    return out


def _gh_var(fn, num_nodes, k):
    t, w = _gauss_hermite(num_nodes, k.dtype)
    return jnp.tensordot(fn(_safe_sqrt(k)[..., None] * t) ** 2, w, axes=1)


def _activation(layer, st: _Cov) -> _Cov:
    if isinstance(layer, Relu):
        return _relu(st)
    if isinstance(layer, Erf):
        return _Cov(
            _erf_e(st.k1, st.cov, st.k2), _erf_e(st.k1, st.k1, st.k1), _erf_e(st.k2, st.k2, st.k2)
        )
    if isinstance(layer, LeakyRelu):
        a = layer.alpha
        r = _relu(st)
        return _Cov(*((1 - a) ** 2 * e + a * k for e, k in zip(r, st, strict=True)))
    if isinstance(layer, Abs):
        r = _relu(st)
        return _Cov(*(4 * e - k for e, k in zip(r, st, strict=True)))
    fn, m = layer.fn, layer.num_nodes
    return _Cov(_gh_e(fn, m, st.k1, st.cov, st.k2), _gh_var(fn, m, st.k1), _gh_var(fn, m, st.k2))


def _patch_mean(a, layer: Conv):
    """Mean over each filter patch of the last two (spatial) axes, zeros outside."""
    fh, fw = layer.filter_shape
    sh, sw = layer.strides
    lead = (1,) * (a.ndim - 2)
    total = lax.reduce_window(
        a, jnp.zeros((), a.dtype), lax.add, (*lead, fh, fw), (*lead, sh, sw), layer.padding
    )
    return total / (fh * fw)


def _propagate(layer, st):
    if isinstance(layer, Serial):
        for sub in layer.layers:
            st = _propagate(sub, st)
        return st
    if isinstance(layer, Parallel):
        return tuple(_propagate(b, s) for b, s in zip(layer.branches, st, strict=True))
    if isinstance(layer, FanOut):
        return (st,) * int(layer.k)
    if isinstance(layer, FanInSum):
        return _Cov(*(sum(parts) for parts in zip(*st, strict=True)))
    if isinstance(layer, Identity):
        return st
    if isinstance(layer, Dense):
        w2, b2 = jnp.square(layer.W_std), jnp.square(layer.b_std)
        return _Cov(*(w2 * a + b2 for a in st))
    if isinstance(layer, Conv):
        w2, b2 = jnp.square(layer.W_std), jnp.square(layer.b_std)
        return _Cov(*(w2 * _patch_mean(a, layer) + b2 for a in st))
    if isinstance(layer, Flatten):
        # Images carry two trailing spatial axes ([n1, n2, H, W] or [n, H, W]); features
        # none ([n1, n2] or [n]), and Flatten leaves them alone.
        return _Cov(*(jnp.mean(a, axis=(-2, -1)) if a.ndim > 2 else a for a in st))
    return _activation(layer, st)


def _input_cov(x1, x2, diag: bool) -> _Cov:
    """E⁰ = x·x'/d (or per position x_p·x'_p/C for images): the input 'post-activation'
    covariance, which the first linear layer turns into K⁰."""
    if x1.ndim == 2:
        d = x1.shape[-1]
        v1 = jnp.sum(x1 * x1, -1) / d
        if diag:
            return _Cov(v1, v1, v1)
        v2 = jnp.sum(x2 * x2, -1) / d
        return _Cov(x1 @ x2.T / d, v1[:, None], v2[None, :])
    c = x1.shape[-1]
    v1 = jnp.sum(x1 * x1, -1) / c  # [n1, H, W]
    if diag:
        return _Cov(v1, v1, v1)
    v2 = jnp.sum(x2 * x2, -1) / c
    return _Cov(jnp.einsum("ihwc,jhwc->ijhw", x1, x2) / c, v1[:, None], v2[None, :])


def _check_inputs(x, name: str, rank_needed: int | None):
    if not hasattr(x, "shape") or getattr(x, "ndim", 0) not in (2, 4):
        raise ValueError(
            f"{name} must be [n, d] features or [n, H, W, C] images, got shape "
            f"{getattr(x, 'shape', type(x).__name__)}"
        )
    if rank_needed == 2 and x.ndim != 4:
        raise ValueError(
            f"{name}: this network (Conv/Flatten) needs images [n, H, W, C], got {x.shape}"
        )
    if rank_needed == 0 and x.ndim != 2:
        raise ValueError(f"{name}: this network (Dense) needs features [n, d], got {x.shape}")
    if not isinstance(x, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(x))):
        raise ValueError(f"{name} contains NaN or inf")


def kernel_fn(net) -> Callable:
    """The NNGP kernel of ``net``: ``k(x1, x2=None, *, diag=False, batch_size=None)``.

    :param net: a network of this module, ending with a :class:`Dense` readout (its
        ``W_std`` is σ_v; use :func:`unit_scale` for a unit readout).
    :return: ``k`` with ``x1`` ``[n1, d]`` (or ``[n1, H, W, C]``), ``x2`` ``[n2, ...]``
        (default ``x1``); returns K(x1, x2) ``[n1, n2]``, or its diagonal K(x1, x1) ``[n1]``
        if ``diag``. ``batch_size`` computes blocks of rows of ``x1`` in turn (``lax.map``),
        so memory is ``batch_size·n2`` per layer (times H·W for images). Pure, dtype
        preserving, and differentiable in the inputs and the layer hyperparameters.

    Bad structure (no readout, Dense on images, Conv on features, unmerged branches) raises
    ``ValueError`` when ``kernel_fn`` is called; shape mismatches and NaN inputs when ``k`` is.

    Example:

    >>> net = serial(Dense(W_std=1.5, b_std=0.3), Erf(), Dense(W_std=1.0))
    >>> k = kernel_fn(net)
    >>> x = jax.random.normal(jax.random.key(0), (5, 3))
    >>> K = k(x)
    >>> K.shape, bool(jnp.allclose(k(x, diag=True), jnp.diag(K)))
    ((5, 5), True)
    >>> k(x, x[:2], batch_size=2).shape
    (5, 2)
    """
    _validate(net)
    rank = 2 if _needs_images(net) else 0

    def k(x1, x2=None, *, diag: bool = False, batch_size: int | None = None):
        x1 = jnp.asarray(x1)
        if not jnp.issubdtype(x1.dtype, jnp.floating):
            x1 = x1.astype(jnp.result_type(float))
        _check_inputs(x1, "x1", rank)
        if x2 is not None:
            if diag:
                raise ValueError("diag=True computes K(x1, x1): pass x2=None")
            x2 = jnp.asarray(x2, x1.dtype)
            _check_inputs(x2, "x2", rank)
            if x2.shape[1:] != x1.shape[1:]:
                raise ValueError(
                    f"x1 and x2 must have the same feature shape, got {x1.shape[1:]} and "
                    f"{x2.shape[1:]}"
                )
        other = x1 if x2 is None else x2
        if batch_size is None or batch_size >= x1.shape[0]:
            return _kernel(net, x1, other, diag)
        return _by_blocks(lambda rows: _kernel(net, rows, other, diag), x1, batch_size)

    return k


@functools.partial(jax.jit, static_argnums=3)
def _kernel(net, x1, x2, diag: bool):
    """K(x1, x2) ``[n1, n2]`` (or the diagonal ``[n1]``), compiled once per structure."""
    return _propagate(net, _input_cov(x1, x2, diag)).cov.astype(x1.dtype)


def _by_blocks(fn, x, batch_size: int):
    """``fn`` over row blocks of ``x`` (padded to a multiple of ``batch_size``), stacked."""
    b = int(batch_size)
    if b < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    n = x.shape[0]
    pad = (-n) % b
    xp = jnp.concatenate([x, jnp.broadcast_to(x[:1], (pad, *x.shape[1:]))]) if pad else x
    out = lax.map(fn, xp.reshape(-1, b, *x.shape[1:]))
    return out.reshape(-1, *out.shape[2:])[:n]


# ------------------------------------------------------------ finite-width networks


def _finite(layer, h, name: str, width: int, path: str):
    """Forward pass of a finite network, weights drawn as N(0, 1) sample sites."""
    if isinstance(layer, Serial):
        for i, sub in enumerate(layer.layers):
            h = _finite(sub, h, name, width, f"{path}{i}.")
        return h
    if isinstance(layer, Parallel):
        return tuple(
            _finite(b, hb, name, width, f"{path}{i}.")
            for i, (b, hb) in enumerate(zip(layer.branches, h, strict=True))
        )
    if isinstance(layer, FanOut):
        return (h,) * int(layer.k)
    if isinstance(layer, FanInSum):
        return sum(h)
    if isinstance(layer, Identity):
        return h
    if isinstance(layer, Flatten):
        return h.reshape(h.shape[0], -1)
    if isinstance(layer, Dense):
        out = width if layer.out is None else int(layer.out)
        n_in = h.shape[-1]
        w = numpyro.sample(f"{name}.{path}W", dist.Normal(0.0, 1.0).expand([n_in, out]).to_event(2))
        b = numpyro.sample(f"{name}.{path}b", dist.Normal(0.0, 1.0).expand([out]).to_event(1))
        return layer.W_std / math.sqrt(n_in) * h @ w + layer.b_std * b
    if isinstance(layer, Conv):
        out = width if layer.out is None else int(layer.out)
        fh, fw = layer.filter_shape
        c_in = h.shape[-1]
        w = numpyro.sample(
            f"{name}.{path}W", dist.Normal(0.0, 1.0).expand([fh, fw, c_in, out]).to_event(4)
        )
        b = numpyro.sample(f"{name}.{path}b", dist.Normal(0.0, 1.0).expand([out]).to_event(1))
        y = lax.conv_general_dilated(
            h, w, tuple(layer.strides), layer.padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return layer.W_std / math.sqrt(fh * fw * c_in) * y + layer.b_std * b
    if isinstance(layer, Relu):
        return jax.nn.relu(h)
    if isinstance(layer, Erf):
        return erf(h)
    if isinstance(layer, LeakyRelu):
        return jnp.where(h > 0, h, layer.alpha * h)
    if isinstance(layer, Abs):
        return jnp.abs(h)
    return layer.fn(h)


def _outputs(net) -> int | None:
    out = _readout(net).out
    return None if out is None or int(out) == 1 else int(out)


def _finite_network(name, net, x, *, scale=None, width=512):
    """Default behaviour of :func:`network`: a finite network of hidden width ``width``."""
    net = _scaled_readout(net, scale)
    layers = _flat(net)
    readout = dataclasses.replace(layers[-1], out=_outputs(net) or 1)
    f = _finite(Serial((*layers[:-1], readout)), jnp.asarray(x), name, int(width), "")
    return f[..., 0] if _outputs(net) is None else f


def _gp_network(name, net, x, *, scale=None, width=None):
    """:class:`infinite_width`'s rewrite: ``name ~ MVN(0, K(x, x) + jitter)``, with the
    readout variance multiplied by ``scale``."""
    K = kernel_fn(_scaled_readout(net, scale))(x)
    jitter = JITTER.get(jnp.dtype(K.dtype).name, 1e-6) * jnp.mean(jnp.diag(K))
    K = K + jitter * jnp.eye(K.shape[0], dtype=K.dtype)
    k = _outputs(net)
    fn = dist.MultivariateNormal(jnp.zeros(K.shape[0], K.dtype), covariance_matrix=K)
    if k is None:
        return numpyro.sample(name, fn)
    return numpyro.sample(name, fn.expand([k])).T


def network(name: str, net, x, *, scale=None, width: int = 512):
    """The network primitive: the output ``f`` of ``net`` at inputs ``x``.

    By default a finite network of hidden width ``width`` whose weights are N(0, 1) sample
    sites ``f"{name}.<layer path>W"`` / ``...b`` (NTK parameterisation), with the readout
    variance multiplied by ``scale``. Handlers rewrite it: :class:`infinite_width` (its GP
    limit, one sample site ``name``), :class:`scale_mixture` (a prior on ``scale``).

    :param name: site name of the output (under :class:`infinite_width`) and weight prefix.
    :param net: a network of this module with a :class:`Dense` readout.
    :param x: inputs ``[n, d]`` or ``[n, H, W, C]``.
    :param scale: readout variance multiplier (a scalar, e.g. a ``scale`` site), or ``None``.
    :param width: hidden width of the finite network.
    :return: f ``[n]`` (readout ``out`` None or 1) or ``[n, k]``.

    Example:

    >>> from numpyro.handlers import seed, trace
    >>> net = serial(Dense(W_std=1.4), Relu(), Dense())
    >>> def model(x):
    ...     f = network("f", net, x, width=8)
    ...     numpyro.sample("y", dist.Normal(f, 0.1).to_event(1))
    >>> x = jnp.arange(6.0).reshape(3, 2)
    >>> list(trace(seed(model, 0)).get_trace(x))      # a finite network: its weights
    ['f.0.W', 'f.0.b', 'f.2.W', 'f.2.b', 'y']
    >>> list(trace(seed(infinite_width(model), 0)).get_trace(x))   # its GP limit
    ['f', 'y']
    """
    _validate(net)
    if width is None or int(width) < 1:
        raise ValueError(f"width must be a positive integer, got {width}")
    msg = {
        "type": NETWORK,
        "fn": _finite_network,
        "args": (name, net, x),
        "kwargs": {"scale": scale, "width": int(width)},
        "value": None,
    }
    if not _PYRO_STACK:
        return _finite_network(name, net, x, scale=scale, width=width)
    return apply_stack(msg)["value"]


class infinite_width(Messenger):
    """Replace every :func:`network` call by its infinite-width limit: one sample site
    ``name ~ MultivariateNormal(0, scale·K(x, x) + jitter)`` (``K`` from :func:`kernel_fn`,
    jitter ``JITTER·mean(diag K)``; independent columns for ``k`` outputs, returned ``[n, k]``).
    With ``width=int`` the finite network is kept, at that width.

    Example:

    >>> from numpyro.handlers import seed, trace
    >>> net = serial(Dense(W_std=1.4), Relu(), Dense())
    >>> def model(x):
    ...     numpyro.sample("y", dist.Normal(network("f", net, x), 0.1).to_event(1))
    >>> tr = trace(seed(infinite_width(model), 0)).get_trace(jnp.arange(8.0).reshape(4, 2))
    >>> type(tr["f"]["fn"]).__name__, tr["f"]["value"].shape
    ('MultivariateNormal', (4,))
    >>> wide = infinite_width(model, width=4096)  # the finite net, 4096 units per layer
    """

    def __init__(self, fn=None, width: int | None = None):
        if width is not None and int(width) < 1:
            raise ValueError(f"width must be None or a positive integer, got {width}")
        self.width = width
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != NETWORK:
            return
        if self.width is None:
            msg["fn"] = _gp_network
        else:
            msg["kwargs"]["width"] = int(self.width)


class scale_mixture(Messenger):
    """Put a prior on the readout variance: at the first :func:`network` call without an
    explicit ``scale`` (per model run) sample ``site ~ prior`` and use it as that call's scale.

    :param prior: a NumPyro distribution on (0, ∞), e.g. ``InverseGamma(2, 2)`` (a
        Student-t process under :class:`infinite_width`), ``BurrXII``, ``Delta(1.)``.
    :param site: the name of the new sample site.

    Example:

    >>> from numpyro.handlers import seed, trace
    >>> net = serial(Dense(W_std=1.4), Relu(), Dense())
    >>> def model(x):
    ...     numpyro.sample("y", dist.Normal(network("f", net, x), 0.1).to_event(1))
    >>> tp_model = infinite_width(scale_mixture(model, dist.InverseGamma(2.0, 2.0)))
    >>> list(trace(seed(tp_model, 0)).get_trace(jnp.arange(8.0).reshape(4, 2)))
    ['scale', 'f', 'y']
    """

    def __init__(self, fn=None, prior=None, site: str = "scale"):
        if not isinstance(prior, dist.Distribution):
            raise TypeError(f"prior must be a numpyro Distribution, got {type(prior).__name__}")
        support = prior.support
        if (
            support not in (constraints.positive, constraints.softplus_positive)
            and not (
                isinstance(support, constraints._GreaterThan) and float(support.lower_bound) >= 0
            )
            and not isinstance(prior, dist.Delta)
        ):
            raise ValueError(f"prior must live on (0, ∞) (a variance), got support {support}")
        self.prior = prior
        self.site = site
        self._value = None
        super().__init__(fn)

    def __enter__(self):
        self._value = None
        return super().__enter__()

    def process_message(self, msg):
        if msg["type"] != NETWORK or msg["kwargs"].get("scale") is not None:
            return
        if self._value is None:
            self._value = numpyro.sample(self.site, self.prior)
        msg["kwargs"]["scale"] = self._value


# ------------------------------------------------------------- marginalising the scale


class SharedScaleStudentT(dist.Distribution):
    """k independent-looking Gaussian outputs N(loc, σ²C) sharing one σ² ~ IG(df/2, ·):
    jointly a multivariate t over ``[k, n]`` with n → n·k and β summed over outputs.

    :param df: degrees of freedom ν = 2a.
    :param loc: ``[k, n]`` or ``[n]``.
    :param scale_tril: Cholesky factor of the (b/a)·C scale ``[n, n]``.
    """

    arg_constraints = {"df": constraints.positive, "loc": constraints.real_vector}
    support = constraints.independent(constraints.real, 2)

    def __init__(self, df, loc, scale_tril, num_outputs: int, *, validate_args=None):
        n = scale_tril.shape[-1]
        self.df, self.scale_tril = df, scale_tril
        self.loc = jnp.broadcast_to(loc, (num_outputs, n))
        super().__init__(batch_shape=(), event_shape=(num_outputs, n), validate_args=validate_args)

    def log_prob(self, value):
        k, n = self.event_shape
        z = jax.scipy.linalg.solve_triangular(self.scale_tril, (value - self.loc).T, lower=True)
        beta = jnp.sum(z * z, axis=(-2, -1)) if z.ndim == 2 else jnp.sum(z * z)
        kn = k * n
        half_logdet = jnp.sum(jnp.log(jnp.diagonal(self.scale_tril)))
        return (
            gammaln((self.df + kn) / 2)
            - gammaln(self.df / 2)
            - kn / 2 * jnp.log(self.df * math.pi)
            - k * half_logdet
            - (self.df + kn) / 2 * jnp.log1p(beta / self.df)
        )

    def sample(self, key, sample_shape=()):
        k1, k2 = jax.random.split(key)
        k, n = self.event_shape
        g = jax.random.gamma(k1, self.df / 2, sample_shape) / (self.df / 2)
        z = jax.random.normal(k2, (*sample_shape, k, n), self.loc.dtype) @ self.scale_tril.T
        return self.loc + z / jnp.sqrt(g)[..., None, None]


def _gaussian_cov(fn):
    """Covariance ``[n, n]`` (times a batch) and location of a Gaussian site, else None."""
    base = fn
    while isinstance(base, (dist.ExpandedDistribution, dist.Independent)):
        base = base.base_dist
    if isinstance(base, dist.MultivariateNormal):
        cov = jnp.broadcast_to(
            base.covariance_matrix, (*fn.batch_shape, *base.covariance_matrix.shape[-2:])
        )
        return jnp.broadcast_to(base.loc, (*fn.batch_shape, *fn.event_shape)), cov
    if isinstance(base, dist.Normal):
        shape = fn.batch_shape + fn.event_shape
        if len(shape) == 0:
            return None
        var = jnp.broadcast_to(jnp.square(base.scale), shape)
        loc = jnp.broadcast_to(base.loc, shape)
        return loc, var[..., :, None] * jnp.eye(shape[-1], dtype=var.dtype)
    return None


def _unwrap(fn):
    while isinstance(fn, (dist.ExpandedDistribution, dist.Independent)):
        fn = fn.base_dist
    return fn


def _concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


#: Message type given to the sites :class:`marginalize_scale` integrates out (the scale and a
#: latent Gaussian on it). ``trace`` records them, but nothing scores them or collects them
#: as samples or deterministics, so a posterior never reports their placeholder values; use
#: :meth:`marginalize_scale.sample_posterior` for their posterior draws.
MARGINALIZED = "nngp_marginalized"


def _probe_value(loc, shift):
    """A fixed, non-degenerate value for a latent Gaussian: ``loc + shift + i/n``."""
    n = loc.shape[-1]
    return loc + shift + jnp.arange(n, dtype=loc.dtype) / n


class _Probe(Messenger):
    """One blocked run of a model with the scale ``site`` held at ``scale_value``; records
    every sample site after it. Latent Gaussians after the scale get the fixed value
    :func:`_probe_value` (``shifts`` maps a name to its shift, 1 by default), so that two
    runs differ only through the scale."""

    def __init__(self, fn, site, scale_value, shifts=None):
        self.site, self.scale_value, self.shifts = site, scale_value, shifts or {}
        super().__init__(fn)

    def __enter__(self):
        self.prior, self.observed_scale = None, False
        self.before = []  # sample sites before the scale
        self.sites = {}  # name -> record, in program order
        return super().__enter__()

    def process_message(self, msg):
        if msg["type"] != "sample":
            return
        name = msg["name"]
        if name == self.site:
            self.observed_scale = msg["is_observed"]
            self.prior = msg["fn"]
            msg["value"] = jnp.asarray(self.scale_value, jnp.result_type(float))
            msg["type"] = MARGINALIZED
            return
        if self.prior is None:
            self.before.append(name)
            return
        gauss = _gaussian_cov(msg["fn"])
        self.sites[name] = {
            "fn": msg["fn"],
            "gauss": gauss,
            "observed": msg["is_observed"],
            "scale": msg["scale"],
            "value": msg["value"],
        }
        if gauss is not None and not msg["is_observed"]:
            msg["value"] = _probe_value(gauss[0], self.shifts.get(name, 1.0))

    def postprocess_message(self, msg):
        if msg["type"] == "sample" and msg["name"] in self.sites:
            self.sites[msg["name"]]["value"] = msg["value"]


class _Structure(NamedTuple):
    """How a model's sites relate to its scale site (read from probe runs of the trace)."""

    site: str
    prior: Any  # the scale's prior (the distribution at the site, unwrapped)
    observed: str  # the Gaussian observation whose covariance is proportional to the scale
    latent: str | None  # a latent Gaussian on the scale that is the observation's mean
    others: tuple  # sites after the scale that do not depend on it
    before: tuple  # sample sites before the scale


def _close(a, b, rtol=1e-6):
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    return bool(
        np.allclose(a, b, rtol=rtol, atol=rtol * max(np.max(np.abs(a), initial=0.0), 1e-30))
    )


def scale_structure(fn, site, args=(), kwargs=None, *, who="marginalize_scale") -> _Structure:
    """Read the scale-mixture structure of a NumPyro model from its trace.

    Runs ``fn`` (blocked, seeded) with ``site`` held at 1 and at 2 and, where a latent
    Gaussian sits on the scale, once more with that latent moved. Accepted: sites before the
    scale (left alone), sites after it whose law does not change with it (e.g. an intercept),
    one observed Gaussian ``y`` (in plates or with ``.to_event``) whose covariance is
    proportional to the scale, and at most one latent Gaussian ``f`` with covariance
    proportional to the scale whose value enters the mean of ``y`` as ``f + (terms free of
    f)``. Anything else is a ``ValueError`` naming the site.

    :param fn: a NumPyro model.
    :param site: the name of its scale (variance) site.
    :param args, kwargs: the model's arguments (with the data observed).
    :param who: the caller's name, for the error messages.
    :return: the structure: ``prior``, ``observed``, ``latent`` (or None), ``others``,
        ``before``. With traced (non-concrete) arguments the checks are skipped and the first
        latent Gaussian after the scale is taken as ``f``.

    Example:

    >>> def model(y=None):
    ...     s = numpyro.sample("scale", dist.InverseGamma(2.0, 2.0))
    ...     c = numpyro.sample("c", dist.Normal(0.0, 1.0))
    ...     with numpyro.plate("n", 3):
    ...         numpyro.sample("y", dist.Normal(c, jnp.sqrt(s)), obs=y)
    >>> st = scale_structure(model, "scale", (), {"y": jnp.ones(3)})
    >>> st.observed, st.latent, st.others
    ('y', None, ('c',))
    """
    kwargs = kwargs or {}

    def reject(why):
        raise ValueError(f"{who}: cannot marginalise site {site!r}: {why}")

    def run(scale_value, shifts=None):
        probe = _Probe(None, site, scale_value, shifts)
        with numpyro.handlers.block(), probe:
            numpyro.handlers.seed(fn, 0)(*args, **kwargs)
        return probe

    one = run(1.0)
    if one.prior is None:
        raise ValueError(f"{who}: the model has no sample site {site!r}")
    if one.observed_scale:
        reject("it is observed (a fixed scale has nothing to integrate)")
    observed = next(
        (n for n, r in one.sites.items() if r["observed"] and r["gauss"] is not None), None
    )
    if observed is None:
        reject("no observed Gaussian site after it (pass the data, e.g. y=...)")
    obs = one.sites[observed]
    if obs["scale"] is not None:
        reject(
            f"the observation {observed!r} is subsampled or rescaled (a scale of "
            f"{obs['scale']}); the Student-t marginal couples all points, so use the full data"
        )
    if jnp.ndim(obs["value"]) not in (1, 2):
        reject(
            f"the observation {observed!r} has shape {jnp.shape(obs['value'])}; [n] or "
            "[k, n] (k outputs sharing the scale) is supported"
        )
    latent_gauss = [n for n, r in one.sites.items() if not r["observed"] and r["gauss"] is not None]
    gauss_values = [r["gauss"] for r in one.sites.values() if r["gauss"] is not None]
    if not _concrete(*jax.tree_util.tree_leaves(gauss_values)):
        latent = latent_gauss[0] if latent_gauss else None
        others = tuple(n for n in one.sites if n not in (observed, latent))
        return _Structure(site, _unwrap(one.prior), observed, latent, others, tuple(one.before))

    two = run(2.0)
    latent, others = None, []
    for name, rec in one.sites.items():
        if name == observed:
            continue
        rec2 = two.sites.get(name)
        if rec2 is None:
            reject(f"site {name!r} is only present for some values of the scale")
        if name in latent_gauss:
            (l1, c1), (l2, c2) = rec["gauss"], rec2["gauss"]
            if _close(l1, l2) and _close(c1, c2):
                others.append(name)
                continue
            if latent is None and _close(l1, l2) and _close(c2, 2 * c1):
                latent = name
                continue
        elif _close(rec["fn"].log_prob(rec["value"]), rec2["fn"].log_prob(rec["value"])):
            others.append(name)
            continue
        reject(
            f"the law of site {name!r} changes with the scale but is not a latent Gaussian "
            "with covariance proportional to it (only one such latent and one Gaussian "
            "observation may depend on the scale); use NUTS or SVI on the model itself"
        )
    (lo1, co1), (lo2, co2) = obs["gauss"], two.sites[observed]["gauss"]
    if latent is not None:
        f_cov1, f_cov2 = one.sites[latent]["gauss"][1], two.sites[latent]["gauss"][1]
        co1, co2 = co1 + f_cov1, co2 + f_cov2
    if not (_close(lo1, lo2) and _close(co2, 2 * co1)):
        reject(
            f"the covariance of {observed!r} is not proportional to it (noise not on the same "
            "scale? use the general path, ppl.inference.nngp.fit(..., method='nuts'), or NUTS "
            "on the model)"
        )
    if latent is not None:
        moved = run(1.0, {latent: 2.0}).sites[observed]["gauss"][0]
        f_shape = jnp.shape(one.sites[latent]["value"])
        if f_shape != jnp.shape(lo1) or not _close(moved - lo1, jnp.ones_like(lo1)):
            reject(
                f"the latent Gaussian {latent!r} has a covariance on the scale but the mean of "
                f"{observed!r} is not {latent!r} plus terms free of it"
            )
    if jnp.ndim(obs["value"]) == 2 and not _close(co1, jnp.broadcast_to(co1[:1], co1.shape)):
        reject(f"the outputs (rows) of {observed!r} do not share one covariance")
    return _Structure(site, _unwrap(one.prior), observed, latent, tuple(others), tuple(one.before))


class _Marginalize(Messenger):
    """Given a :class:`_Structure`: hold the scale at 1 and the latent ``f`` at a probe value
    (both :data:`MARGINALIZED`), and read the observation's Gaussian at unit scale, with
    ``f`` integrated out. ``replace``: make the observation the closed-form Student-t."""

    def __init__(self, fn, structure: _Structure, replace: bool):
        self.structure, self.replace = structure, replace
        super().__init__(fn)

    def __enter__(self):
        self.prior = self.f = self.obs = None
        return super().__enter__()

    def process_message(self, msg):
        st = self.structure
        if msg["type"] != "sample" or msg["name"] not in (st.site, st.latent, st.observed):
            return
        name = msg["name"]
        if name == st.site:
            self.prior = _unwrap(msg["fn"])
            if self.replace and not isinstance(self.prior, dist.InverseGamma):
                raise ValueError(
                    f"marginalize_scale: cannot marginalise site {name!r}: its prior is "
                    f"{type(self.prior).__name__}, not InverseGamma(a, b)"
                )
            msg["value"] = jnp.asarray(1.0, jnp.result_type(float))
            msg["type"] = MARGINALIZED
        elif name == st.latent:
            loc, cov = _gaussian_cov(msg["fn"])
            self.f = (loc, cov, _probe_value(loc, 1.0))
            msg["value"] = self.f[2]
            msg["type"] = MARGINALIZED
        else:
            loc, cov = _gaussian_cov(msg["fn"])
            if self.f is not None:
                f_loc, f_cov, probe = self.f
                loc, cov = f_loc + (loc - probe), cov + f_cov
            value = msg["value"]
            cov = cov if value.ndim == 1 else cov.reshape(-1, *cov.shape[-2:])[0]
            self.obs = (value, jnp.broadcast_to(loc, value.shape), cov)
            if self.replace:
                a, b = self.prior.concentration, self.prior.rate
                tril = jnp.linalg.cholesky((b / a) * cov)
                if value.ndim == 1:
                    msg["fn"] = dist.MultivariateStudentT(2 * a, self.obs[1], tril)
                else:
                    msg["fn"] = SharedScaleStudentT(2 * a, self.obs[1], tril, value.shape[0])
                msg["cond_indep_stack"] = []  # the marginal couples the plate's points


def unit_scale_statistics(value, loc, cov):
    """``(β, ln|C|·k, N)`` of ``value ~ N(loc, σ²·C)``: β = Σ_k (y_k − loc_k)ᵀC⁻¹(y_k − loc_k)
    over the rows of a ``[k, n]`` value (or one ``[n]`` row), N = its size; also returns the
    Cholesky factor of ``C`` ``[n, n]`` and ``C⁻¹(y − loc)`` (value layout).

    Example:

    >>> beta, logdet, n, _, _ = unit_scale_statistics(jnp.ones(2), jnp.zeros(2), 2 * jnp.eye(2))
    >>> round(float(beta), 6), round(float(logdet), 4), n
    (1.0, 1.3863, 2)
    """
    chol = jnp.linalg.cholesky(cov)
    r = (value - loc).T  # [n] or [n, k]
    alpha = jax.scipy.linalg.cho_solve((chol, True), r)
    rows = 1 if value.ndim == 1 else value.shape[0]
    logdet = 2.0 * rows * jnp.sum(jnp.log(jnp.diagonal(chol)))
    return jnp.sum(r * alpha), logdet, int(np.prod(value.shape)), chol, alpha.T


class marginalize_scale:
    """Integrate an inverse-gamma readout scale out in closed form.

    If ``site ~ InverseGamma(a, b)`` and, given it and the model's other sites, the
    observation y is Gaussian with covariance ``scale·C`` (``y ~ MVN(loc, scale·C)``, or
    ``Normal(loc, √scale·τ)`` in a plate or with ``.to_event``; or a latent
    ``f ~ MVN(μ, scale·K)`` with y's mean ``f + (terms free of f)``), then given the other
    sites y is multivariate Student-t with ``df = 2a`` and scale matrix ``(b/a)·C`` (``C + K``
    with f integrated out; Lee et al., ICLR 2022, §3, and docs/nngp.md). The transformed
    model has the observation replaced by ``MultivariateStudentT(df=2a, loc,
    scale_tril=chol((b/a)·C))`` (:class:`SharedScaleStudentT` for ``[k, n]`` outputs) and
    ``site`` and ``f`` as unscored :data:`MARGINALIZED` entries, so ``log_density`` gives
    log p(y | other sites) exactly and NUTS or SVI run on the other sites only (e.g. an
    intercept, or hyperparameters before the scale). Their conditional posterior given
    each draw of the others is closed-form (σ² | y ~ IG(a + N/2, b + β/2), f | σ², y
    Gaussian): :meth:`sample_posterior` draws them afterwards.

    The structure is read from the trace by :func:`scale_structure` (extra blocked runs with
    the scale at 1 and 2); what it cannot integrate (another prior, a non-Gaussian
    observation, noise not on the scale, a subsampled plate, another site whose law depends
    on the scale) raises ``ValueError`` naming the site and the reason. Deterministic sites
    computed from the scale see its placeholder value 1.

    Example (log p(y) = −16.9095675 under IG(2, 2), docs/nngp.md):

    >>> import numpy as np
    >>> from numpyro.infer.util import log_density
    >>> from ppl.models.nngp import regression
    >>> x = np.linspace(-2, 2, 8)[:, None]
    >>> y = np.sin(2 * x[:, 0]) + 0.1 * (-1.0) ** np.arange(8)
    >>> hidden = [Dense(W_std=2**0.5, b_std=0.1**0.5), Relu()]
    >>> net = serial(*hidden, *hidden, Dense())
    >>> tp = marginalize_scale(regression, site="scale")
    >>> with jax.enable_x64(True):
    ...     log_py, tr = log_density(tp, (x, y), {"net": net, "noise": 0.01}, {})
    >>> print(f"{float(log_py):.6f}", type(tr["y"]["fn"]).__name__)
    -16.909567 MultivariateStudentT
    """

    def __init__(self, fn, site: str = "scale"):
        if not callable(fn):
            raise TypeError(f"marginalize_scale needs a model function, got {type(fn).__name__}")
        self.fn, self.site = fn, site

    def _structure(self, args, kwargs) -> _Structure:
        st = scale_structure(self.fn, self.site, args, kwargs)
        if not isinstance(st.prior, dist.InverseGamma):
            raise ValueError(
                f"marginalize_scale: cannot marginalise site {self.site!r}: its prior is "
                f"{type(st.prior).__name__}, not InverseGamma(a, b) (for other priors use "
                "ppl.inference.nngp.fit(model, ..., method='gh'), or NUTS on the model)"
            )
        return st

    def __call__(self, *args, **kwargs):
        st = self._structure(args, kwargs)
        with _Marginalize(None, st, replace=True):
            return self.fn(*args, **kwargs)

    def sample_posterior(self, key, samples: dict, *args, num_samples: int | None = None, **kwargs):
        """Draw the integrated-out sites from their conditional posterior given each draw
        of the other sites: ``σ² ~ IG(a + N/2, b + β/2)`` with β the unit-scale Mahalanobis
        norm of the residual, then (if a latent ``f`` was integrated out) ``f | σ², y ~
        N(μ + K(K + C)⁻¹r, σ²(K − K(K + C)⁻¹K))``. Together with the draws of the
        marginalised model these are draws of the original model's posterior.

        :param key: a PRNG key.
        :param samples: posterior draws of the transformed model's sites ``{name: [m, ...]}``
            (e.g. ``MCMC.get_samples()``); may be empty when it has no latent sites.
        :param args, kwargs: the model's arguments, as given to the transformed model.
        :param num_samples: the number of draws when ``samples`` is empty.
        :return: ``samples`` plus ``{site: [m], f: [m, *f.shape]}``.

        Example:

        >>> def model(y=None):
        ...     s = numpyro.sample("scale", dist.InverseGamma(3.0, 2.0))
        ...     with numpyro.plate("n", 4):
        ...         numpyro.sample("y", dist.Normal(0.0, jnp.sqrt(s)), obs=y)
        >>> tp = marginalize_scale(model)
        >>> out = tp.sample_posterior(jax.random.key(0), {}, y=jnp.ones(4), num_samples=5)
        >>> out["scale"].shape       # IG(3 + 2, 2 + 2) draws
        (5,)
        """
        sizes = {jnp.shape(v)[0] for v in samples.values()}
        if len(sizes) > 1:
            raise ValueError(f"samples must share their leading (draw) dimension, got {sizes}")
        if not sizes and (num_samples is None or int(num_samples) < 1):
            raise ValueError("samples is empty: pass num_samples (a positive integer)")
        m = sizes.pop() if sizes else int(num_samples)
        st = self._structure(args, kwargs)
        missing = sorted(_latent_names(self.fn, st, args, kwargs) - set(samples))
        if missing:
            raise ValueError(
                f"samples has no draws of the latent site(s) {missing}: pass the posterior "
                "draws of every latent site of the marginalised model"
            )

        def one(key, params):
            h = _Marginalize(None, st, replace=False)
            with numpyro.handlers.block(), h:
                model = numpyro.handlers.substitute(numpyro.handlers.seed(self.fn, 0), params)
                model(*args, **kwargs)
            value, loc, cov = h.obs
            a, b = h.prior.concentration, h.prior.rate
            beta, _, n, chol, alpha = unit_scale_statistics(value, loc, cov)
            k1, k2 = jax.random.split(key)
            s = (b + beta / 2) / jax.random.gamma(k1, a + n / 2, dtype=value.dtype)
            out = {self.site: s}
            if h.f is not None:
                f_loc, f_cov, _ = h.f
                kf = f_cov if f_cov.ndim == 2 else f_cov.reshape(-1, *f_cov.shape[-2:])[0]
                mean = f_loc + (kf @ alpha.T).T
                v = jax.scipy.linalg.solve_triangular(chol, kf, lower=True)
                post = kf - v.T @ v
                post = 0.5 * (post + post.T)
                jitter = 1e-10 * jnp.mean(jnp.diagonal(kf)) * jnp.eye(kf.shape[0], dtype=kf.dtype)
                tril = jnp.linalg.cholesky(post + jitter)
                z = jax.random.normal(k2, mean.shape, mean.dtype)
                out[st.latent] = mean + jnp.sqrt(s) * (z @ tril.T)
            return out

        draws = jax.jit(jax.vmap(one))(jax.random.split(key, m), samples)
        return {**samples, **draws}


def _latent_names(fn, st: _Structure, args, kwargs) -> set:
    """Latent sample sites of the marginalised model (one blocked, seeded trace)."""

    def marginal(*a, **kw):
        with _Marginalize(None, st, replace=True):
            return fn(*a, **kw)

    with numpyro.handlers.block():
        tr = numpyro.handlers.trace(numpyro.handlers.seed(marginal, 0)).get_trace(*args, **kwargs)
    return {n for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"]}
