"""Sparse weight tensors with a fixed number of active entries (the SSVI storage format).

A :class:`SparseTensor` holds ``s`` active entries of a dense tensor of static shape
``dense_shape``: ``idx int32[s]`` (sorted, unique, flat row-major / C-order indices into the
dense tensor) and ``values float[..., s]`` (optional leading batch dims, e.g. particles).
Everything else is exactly zero. It is a pytree (``idx`` and ``values`` are leaves, the
shape is static), so it passes through ``jit``, ``grad`` and ``vmap``.

The layer ops touch only the active entries, by gather + segment-sum:

* :func:`matmul` ``x [..., B, n_in] @ w [n_in, n_out]`` (and ``w @ x [..., n_out, K]``):
  cost ``O(B·s)``; the ``@`` operator of a ``SparseTensor`` is this function, so a model
  written with plain ``x @ w`` runs with dense and sparse weights alike;
* :func:`conv2d` (NHWC, kernel ``[kh, kw, c_in, c_out]``): im2col patches, gather of the
  ``s`` active rows, segment-sum over ``c_out``: cost ``O(B·H·W·s)``.

No dense weight tensor is formed (the reference implementation multiplies a dense tensor by
a mask, which saves nothing). :func:`to_dense` is for tests and plots only (``O(d)``).

:class:`SparseNormal` is the mean-field Normal on the active entries and a point mass at 0
elsewhere; ``kl_divergence(SparseNormal, SparseNormal)`` is registered in closed form (the
KL over the active set; the inactive coordinates contribute ``KL(δ₀‖δ₀) = 0``).
"""

from __future__ import annotations

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.distributions.batch_util import promote_batch_shape
from numpyro.distributions.kl import kl_divergence

__all__ = [
    "SparseTensor",
    "SparseNormal",
    "matmul",
    "conv2d",
    "to_dense",
    "from_dense",
    "num_active",
    "kl_divergence",
    "to_dense_idata",
]


def num_active(density: float, size: int) -> int:
    """The active count ``s = round(density · size)``, at least 1 (and at most ``size``).

    >>> num_active(0.1, 84480)
    8448
    """
    return int(min(size, max(1, round(float(density) * int(size)))))


@jax.tree_util.register_pytree_node_class
class SparseTensor:
    """``s`` active entries of a dense tensor of static shape ``dense_shape``.

    :param idx: ``int32[s]`` sorted, unique flat (C-order) indices into ``dense_shape``.
    :param values: ``float[..., s]``; leading dims are batch dims (e.g. particles).
    :param dense_shape: the static dense shape (a tuple of ints).

    ``shape`` is ``values.shape[:-1] + dense_shape`` (the batched dense shape), so a
    ``SparseTensor`` can stand in for a dense sample-site value. A 2-d one multiplies dense
    arrays with ``@`` from either side (:func:`matmul`; NumPy's ``matmul`` broadcasting).

    >>> import jax.numpy as jnp
    >>> w = SparseTensor(jnp.array([1, 4]), jnp.array([2.0, -1.0]), (2, 3))
    >>> w.shape, w.nse
    ((2, 3), 2)
    >>> to_dense(w)
    Array([[ 0.,  2.,  0.],
           [ 0., -1.,  0.]], dtype=float32)
    >>> jnp.ones((1, 2)) @ w
    Array([[0., 1., 0.]], dtype=float32)
    """

    __slots__ = ("idx", "values", "dense_shape")
    # NumPy arrays defer ``ndarray @ SparseTensor`` to ``__rmatmul__`` (rather than
    # building an object array); JAX arrays already return NotImplemented for it
    __array_ufunc__ = None

    def __init__(self, idx, values, dense_shape):
        self.idx = idx
        self.values = values
        self.dense_shape = tuple(int(d) for d in dense_shape)

    # pytree -------------------------------------------------------------------------
    def tree_flatten(self):
        return (self.idx, self.values), self.dense_shape

    @classmethod
    def tree_unflatten(cls, dense_shape, children):
        obj = object.__new__(cls)
        obj.idx, obj.values = children
        obj.dense_shape = dense_shape
        return obj

    # array-like metadata ------------------------------------------------------------
    @property
    def nse(self) -> int:
        """The number of active entries ``s``."""
        return int(jnp.shape(self.idx)[-1])

    @property
    def shape(self) -> tuple:
        return tuple(jnp.shape(self.values)[:-1]) + self.dense_shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self):
        return jnp.result_type(self.values)

    @property
    def size(self) -> int:
        return math.prod(self.dense_shape)

    # ``@`` -------------------------------------------------------------------------------
    def __matmul__(self, other):
        if isinstance(other, SparseTensor):
            return NotImplemented
        return matmul(self, other)

    def __rmatmul__(self, other):
        if isinstance(other, SparseTensor):
            return NotImplemented
        return matmul(other, self)

    def __repr__(self):
        return (
            f"SparseTensor(shape={self.shape}, nse={self.nse}, "
            f"density={self.nse / max(self.size, 1):.4g})"
        )


def to_dense(w: SparseTensor):
    """The dense tensor ``[..., *dense_shape]`` (zeros off the active set). ``O(d)``: for
    tests and plots only.

    >>> import jax.numpy as jnp
    >>> to_dense(SparseTensor(jnp.array([0, 3]), jnp.array([1.0, 2.0]), (2, 2)))
    Array([[1., 0.],
           [0., 2.]], dtype=float32)
    """
    _check_sparse(w, "w")
    batch = tuple(jnp.shape(w.values)[:-1])
    if jnp.ndim(w.idx) > 1:
        # a batch of active sets (``vmap``/``Predictive`` outputs carry ``idx [..., s]``):
        # one scatter per row, the batch dims of ``idx`` and ``values`` broadcast together
        batch = jnp.broadcast_shapes(batch, tuple(jnp.shape(w.idx)[:-1]))
        idx = jnp.broadcast_to(w.idx, batch + (w.nse,)).reshape(-1, w.nse)
        values = jnp.broadcast_to(w.values, batch + (w.nse,)).reshape(-1, w.nse)
        rows = jnp.arange(idx.shape[0])[:, None]
        flat = jnp.zeros((idx.shape[0], w.size), w.dtype).at[rows, idx].set(values)
        return flat.reshape(batch + w.dense_shape)
    flat = jnp.zeros(batch + (w.size,), w.dtype).at[..., w.idx].set(w.values)
    return flat.reshape(batch + w.dense_shape)


def from_dense(x, idx) -> SparseTensor:
    """The entries of a dense ``x [*shape]`` at flat indices ``idx int32[s]``.

    >>> import jax.numpy as jnp
    >>> from_dense(jnp.arange(6.0).reshape(2, 3), jnp.array([1, 5])).values
    Array([1., 5.], dtype=float32)
    """
    x = jnp.asarray(x)
    idx = jnp.asarray(idx, jnp.int32)
    if idx.ndim != 1:
        raise ValueError(f"idx must be 1-d int32[s], got shape {idx.shape}")
    return SparseTensor(idx, x.reshape(-1)[idx], x.shape)


def to_dense_idata(idata, site: str):
    """The draws of a sparse site of an SSVI ``InferenceData`` as a dense array
    ``[chain, draw, *shape]`` (zeros off the active set; for plots).

    Reads ``posterior[site]`` (``[chain, draw, s]``), ``constant_data[f"{site}_idx"]`` and
    ``posterior.attrs[f"{site}_shape"]`` as written by ``SSVIResult.to_inference_data``.

    >>> import arviz as az, numpy as np
    >>> idata = az.from_dict(posterior={"w": np.ones((1, 2, 2))},
    ...                      constant_data={"w_idx": np.array([0, 3])})
    >>> idata.posterior.attrs["w_shape"] = "2,2"
    >>> to_dense_idata(idata, "w")[0, 0]
    array([[1., 0.],
           [0., 1.]])
    """
    if f"{site}_idx" not in idata.constant_data:
        raise ValueError(f"site {site!r} has no constant_data[{site + '_idx'!r}]: not sparse")
    shape = tuple(int(d) for d in str(idata.posterior.attrs[f"{site}_shape"]).split(","))
    values = np.asarray(idata.posterior[site])
    idx = np.asarray(idata.constant_data[f"{site}_idx"])
    out = np.zeros(values.shape[:2] + (math.prod(shape),), values.dtype)
    out[..., idx] = values
    return out.reshape(values.shape[:2] + shape)


def _check_sparse(w, name):
    if not isinstance(w, SparseTensor):
        raise TypeError(f"{name} must be a ppl.sparse.SparseTensor, got {type(w).__name__}")


def _gather_scale_sum(xt, w, n_rows_out, n_trailing, *, transpose=False):
    """``out[o, ...] = Σ_{k: col_k = o} xt[row_k, ...] · values_k``: gather contiguous rows
    of ``xt [n_rows_in, ...]``, scale, segment-sum over the column: ``[n_out, ...]``.

    Rows of ``xt`` are contiguous, so the gather, the segment-sum and their transposes
    (scatter-add / gather) move whole rows; ``values [..vb, s]`` broadcast against the
    leading dims of ``xt[..., ]`` that precede its ``n_trailing`` trailing dims. With
    ``transpose`` the 2-d ``w [n_rows_out, n_in]`` is read as its transpose (``w @ x``).
    """
    if transpose:
        n_cols = w.dense_shape[-1]
        cols, rows = w.idx // n_cols, w.idx % n_cols
    else:
        rows, cols = w.idx // n_rows_out, w.idx % n_rows_out
    g = xt[rows]  # [s, *xlead, *trailing]
    v = jnp.moveaxis(w.values, -1, 0)  # [s, *vb]
    n_xlead, n_vb = g.ndim - 1 - n_trailing, v.ndim - 1
    lead = max(n_xlead, n_vb)
    g = g.reshape(g.shape[:1] + (1,) * (lead - n_xlead) + g.shape[1:])
    v = v.reshape(v.shape[:1] + (1,) * (lead - n_vb) + v.shape[1:] + (1,) * n_trailing)
    return jax.ops.segment_sum(g * v, cols, num_segments=n_rows_out)


def matmul(x, w):
    """``x @ w`` with NumPy's ``matmul`` semantics, touching only the active entries of a
    sparse operand. This is what ``@`` does with a :class:`SparseTensor` on either side.

    :param x: ``float[..., B, n_in]`` or ``float[n_in]``; or a 2-d ``SparseTensor[m, n]``
        (values ``[..., s]``) when ``w`` is dense (``w @`` from the left).
    :param w: ``SparseTensor[n_in, n_out]`` (values ``[..., s]``, whose batch dims broadcast
        against the leading dims of ``x``), or a dense ``float[..., n_in, n_out]``
        (then this is ``x @ w``); a dense ``float[..., n, K]`` or ``float[n]`` when ``x`` is
        sparse.
    :returns: ``float[..., B, n_out]`` (``float[..., n_out]`` for a 1-d ``x``); for a
        sparse ``x``, ``float[..., m, K]`` (``float[..., m]`` for a 1-d ``w``). The cost is
        ``O(B·s)``: gather ``x[..., row_k]``, scale by ``values_k``, segment-sum over
        ``col_k``.
    :raises TypeError: for two sparse operands (no sparse-sparse product).
    :raises ValueError: for a sparse operand that is not 2-d, a 0-d dense operand, or
        contracted dims of different sizes.

    >>> import jax.numpy as jnp
    >>> w = SparseTensor(jnp.array([0, 5]), jnp.array([2.0, 3.0]), (2, 3))
    >>> matmul(jnp.array([[1.0, 10.0]]), w)
    Array([[ 2.,  0., 30.]], dtype=float32)
    >>> w @ jnp.array([1.0, 1.0, 1.0])  # = matmul(w, x): the active entries' row sums
    Array([2., 3.], dtype=float32)
    """
    x_sparse, w_sparse = isinstance(x, SparseTensor), isinstance(w, SparseTensor)
    if x_sparse and w_sparse:
        raise TypeError(
            "matmul of two SparseTensors is not supported; densify one with "
            "ppl.sparse.to_dense (O(d)) or keep one operand dense"
        )
    if not (x_sparse or w_sparse):
        return jnp.matmul(x, w)
    sp, dense = (x, w) if x_sparse else (w, x)
    if len(sp.dense_shape) != 2:
        raise ValueError(
            f"matmul needs a 2-d SparseTensor, got dense shape {sp.dense_shape}; for a "
            "conv kernel use ppl.sparse.conv2d"
        )
    dense = jnp.asarray(dense)
    if dense.ndim == 0:
        raise ValueError("matmul: the dense operand must have ndim >= 1, got a scalar")
    n_rows, n_cols = sp.dense_shape
    vector = dense.ndim == 1
    if w_sparse:  # x [..., B, n_in] @ w [n_in, n_out]
        xm = dense[None] if vector else dense
        if xm.shape[-1] != n_rows:
            raise ValueError(f"x has {xm.shape[-1]} features but w expects n_in = {n_rows}")
        out = _gather_scale_sum(jnp.moveaxis(xm, -1, 0), sp, n_cols, 1)  # [n_out, ..., B]
        out = jnp.moveaxis(out, 0, -1)
        return out[..., 0, :] if vector else out
    # x [m, n] (sparse) @ w [..., n, K] (dense): gather rows of w by col_k, sum over row_k
    wm = dense[:, None] if vector else dense
    if wm.shape[-2] != n_cols:
        raise ValueError(
            f"the dense operand has {wm.shape[-2]} rows but the SparseTensor {sp.dense_shape} "
            f"has n = {n_cols} columns"
        )
    out = _gather_scale_sum(jnp.moveaxis(wm, -2, 0), sp, n_rows, 1, transpose=True)
    out = jnp.moveaxis(out, 0, -2)  # [..., m, K]
    return out[..., 0] if vector else out


def _patches(x, kh, kw, stride, padding):
    """im2col: ``x [..., N, H, W, C]`` -> ``[..., N, H', W', kh·kw·C]`` in (i, j, c) order."""
    h, wd = x.shape[-3], x.shape[-2]
    if padding == "SAME":
        out_h, out_w = -(-h // stride), -(-wd // stride)
        ph = max((out_h - 1) * stride + kh - h, 0)
        pw = max((out_w - 1) * stride + kw - wd, 0)
        pads = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
    else:
        out_h, out_w = (h - kh) // stride + 1, (wd - kw) // stride + 1
        pads = ((0, 0), (0, 0))
    lead = [(0, 0)] * (x.ndim - 3)
    xp = jnp.pad(x, lead + [pads[0], pads[1], (0, 0)])
    cols = []
    for i in range(kh):
        for j in range(kw):
            cols.append(
                xp[
                    ...,
                    i : i + (out_h - 1) * stride + 1 : stride,
                    j : j + (out_w - 1) * stride + 1 : stride,
                    :,
                ]
            )
    p = jnp.stack(cols, axis=-2)  # [..., N, H', W', kh*kw, C]
    return p.reshape(p.shape[:-2] + (kh * kw * x.shape[-1],))


def conv2d(x, w, stride: int = 1, padding: str = "SAME"):
    """2-d convolution (NHWC, cross-correlation like ``lax.conv``) with a dense or sparse kernel.

    :param x: ``float[..., N, H, W, c_in]``.
    :param w: ``SparseTensor[kh, kw, c_in, c_out]`` (values ``[..., s]`` broadcasting against
        the leading dims of ``x``) or a dense kernel ``float[kh, kw, c_in, c_out]``.
    :param int stride: the same stride along H and W.
    :param str padding: ``"SAME"`` or ``"VALID"``.
    :returns: ``float[..., N, H', W', c_out]``. For a sparse kernel: im2col patches, gather
        of the ``s`` active rows, segment-sum over ``c_out``: cost ``O(N·H'·W'·s)``.

    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 4, 2))
    >>> dense = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 2, 5))
    >>> w = from_dense(dense, jnp.arange(90))
    >>> bool(jnp.allclose(conv2d(x, w), conv2d(x, dense), atol=1e-5))
    True
    """
    if padding not in ("SAME", "VALID"):
        raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    x = jnp.asarray(x)
    if not isinstance(w, SparseTensor):
        # im2col + one matmul rather than ``lax.conv_general_dilated``: on XLA:CPU the
        # latter's forward-backward inside ``lax.scan`` (the SVI/SSVI step loop) ran ~40×
        # slower than the same conv outside it (1.9 s against 50 ms per step for the digits
        # CNN); the matmul form is the same arithmetic and fast in both places
        w = jnp.asarray(w)
        if w.ndim != 4:
            raise ValueError(f"a dense kernel must be [kh, kw, c_in, c_out], got {w.shape}")
        kh, kw, c_in, c_out = w.shape
        if x.shape[-1] != c_in:
            raise ValueError(f"x has {x.shape[-1]} channels but the kernel expects c_in = {c_in}")
        p = _patches(x, kh, kw, stride, padding)  # [..., N, H', W', kh*kw*c_in]
        return p @ w.reshape(kh * kw * c_in, c_out)
    if len(w.dense_shape) != 4:
        raise ValueError(f"conv2d needs a 4-d kernel [kh, kw, c_in, c_out], got {w.dense_shape}")
    kh, kw, c_in, c_out = w.dense_shape
    if x.shape[-1] != c_in:
        raise ValueError(f"x has {x.shape[-1]} channels but the kernel expects c_in = {c_in}")
    p = _patches(x, kh, kw, stride, padding)  # [..., N, H', W', kh*kw*c_in]
    out = _gather_scale_sum(jnp.moveaxis(p, -1, 0), w, c_out, 3)  # [c_out, ..., N, H', W']
    return jnp.moveaxis(out, 0, -1)


# ---------------------------------------------------------------------------------------
# the restricted mean-field Normal
# ---------------------------------------------------------------------------------------


class SparseNormal(dist.Distribution):
    """``Π_{k active} N(θ_k; loc_k, scale_k²) · Π_{k inactive} δ₀(θ_k)`` over a dense shape.

    Samples are :class:`SparseTensor` with ``idx``; ``log_prob`` sums the Normal log density
    over the ``s`` active values only (the density w.r.t. Lebesgue measure on the active
    coordinates and counting measure at 0 elsewhere).

    :param loc: ``float[..., s]`` (or a scalar).
    :param scale: ``float[..., s]`` (or a scalar), positive.
    :param idx: ``int32[s]`` sorted, unique flat indices.
    :param dense_shape: the dense event shape.

    >>> import jax, jax.numpy as jnp
    >>> d = SparseNormal(jnp.zeros(2), jnp.ones(2), jnp.array([0, 3]), (2, 2))
    >>> d.event_shape, d.sample(jax.random.PRNGKey(0)).values.shape
    ((2, 2), (2,))
    >>> float(d.log_prob(SparseTensor(d.idx, jnp.zeros(2), (2, 2))))  # 2·log N(0; 0, 1)
    -1.837877...
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.real
    reparametrized_params = ["loc", "scale"]
    pytree_data_fields = ("loc", "scale", "idx")
    pytree_aux_fields = ("dense_shape", "nse")

    def __init__(self, loc, scale, idx, dense_shape, *, validate_args=None):
        self.idx = idx
        self.dense_shape = tuple(int(d) for d in dense_shape)
        self.nse = int(jnp.shape(idx)[-1])
        self.loc, self.scale = loc, scale
        full = jnp.broadcast_shapes(jnp.shape(loc), jnp.shape(scale), (self.nse,))
        super().__init__(
            batch_shape=full[:-1], event_shape=self.dense_shape, validate_args=validate_args
        )

    @property
    def has_rsample(self):
        return True

    def rsample(self, key, sample_shape=()):
        shape = tuple(sample_shape) + self.batch_shape + (self.nse,)
        eps = jax.random.normal(key, shape, dtype=jnp.result_type(self.loc, self.scale, float))
        return SparseTensor(self.idx, self.loc + self.scale * eps, self.dense_shape)

    def sample(self, key, sample_shape=()):
        return self.rsample(key, sample_shape)

    def log_prob(self, value):
        v = value.values if isinstance(value, SparseTensor) else value
        z = (v - self.loc) / self.scale
        lp = -0.5 * z**2 - jnp.log(self.scale) - 0.5 * math.log(2 * math.pi)
        return jnp.sum(jnp.broadcast_to(lp, jnp.shape(lp)[:-1] + (self.nse,)), axis=-1)

    def expand(self, batch_shape):
        batch_shape = tuple(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        shape = batch_shape + (self.nse,)
        return SparseNormal(
            jnp.broadcast_to(self.loc, shape),
            jnp.broadcast_to(self.scale, shape),
            self.idx,
            self.dense_shape,
        )

    @property
    def mean(self):
        return SparseTensor(
            self.idx,
            jnp.broadcast_to(self.loc, self.batch_shape + (self.nse,)),
            self.dense_shape,
        )

    def entropy(self):
        h = 0.5 + 0.5 * math.log(2 * math.pi) + jnp.log(self.scale)
        return jnp.sum(jnp.broadcast_to(h, self.batch_shape + (self.nse,)), axis=-1)


@promote_batch_shape.register
def _promote_sparse_normal(d: SparseNormal):
    """The batch shape of a :class:`SparseNormal` returned by ``jax.vmap`` (the active set
    is one for all executions: ``vmap`` broadcast it, every row is the same)."""
    new = copy.copy(d)
    if jnp.ndim(d.idx) > 1:
        new.idx = jnp.reshape(d.idx, (-1, d.nse))[0]
    full = jnp.broadcast_shapes(jnp.shape(d.loc), jnp.shape(d.scale), (d.nse,))
    new._batch_shape = full[:-1]
    return new


@kl_divergence.register(SparseNormal, SparseNormal)
def _kl_sparse_normal(p: SparseNormal, q: SparseNormal):
    """``Σ_{k active} KL(N(μ_k, σ_k²) ‖ N(m_k, s_k²))``; ``ValueError`` if supports differ."""
    if p.dense_shape != q.dense_shape or p.nse != q.nse:
        raise ValueError(
            f"kl_divergence(SparseNormal, SparseNormal): supports differ (shape "
            f"{p.dense_shape}/{q.dense_shape}, s {p.nse}/{q.nse}); the KL is infinite"
        )
    if not isinstance(p.idx, jax.core.Tracer) and not isinstance(q.idx, jax.core.Tracer):
        if not np.array_equal(np.asarray(p.idx), np.asarray(q.idx)):
            raise ValueError(
                "kl_divergence(SparseNormal, SparseNormal): idx mismatch (different active "
                "sets give an infinite KL); restrict the prior to the guide's support"
            )
    var_ratio = (p.scale / q.scale) ** 2
    t = ((p.loc - q.loc) / q.scale) ** 2
    kl = 0.5 * (var_ratio + t - 1.0 - jnp.log(var_ratio))
    shape = jnp.broadcast_shapes(p.batch_shape, q.batch_shape) + (p.nse,)
    return jnp.sum(jnp.broadcast_to(kl, shape), axis=-1)
