"""ppl.sparse: SparseTensor ops against their dense equivalents (exact up to f32 rounding)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.distributions import Normal
from numpyro.distributions.kl import kl_divergence

from ppl.sparse import SparseNormal, SparseTensor, conv2d, from_dense, matmul, to_dense


def _random_sparse(key, shape, nse, batch=()):
    k1, k2 = jax.random.split(key)
    size = int(np.prod(shape))
    idx = jnp.sort(jax.random.choice(k1, size, (nse,), replace=False)).astype(jnp.int32)
    return SparseTensor(idx, jax.random.normal(k2, batch + (nse,)), shape)


def test_to_dense_and_from_dense_round_trip():
    w = _random_sparse(jax.random.PRNGKey(0), (7, 5), 9)
    dense = to_dense(w)
    assert dense.shape == (7, 5)
    assert int((dense != 0).sum()) == 9
    back = from_dense(dense, w.idx)
    np.testing.assert_array_equal(back.values, w.values)


@pytest.mark.parametrize("batch", [(), (3,)])
def test_matmul_matches_dense(batch):
    w = _random_sparse(jax.random.PRNGKey(1), (6, 4), 10, batch)
    x = jax.random.normal(jax.random.PRNGKey(2), (5, 6))
    want = x @ to_dense(w)
    np.testing.assert_allclose(jax.jit(matmul)(x, w), want, rtol=1e-5, atol=1e-6)
    # gradients w.r.t. x and the active values equal the dense ones restricted to idx
    sparse_grad = jax.jit(
        jax.grad(lambda x, v: (matmul(x, SparseTensor(w.idx, v, w.dense_shape)) ** 2).sum(), (0, 1))
    )
    gx, gv = sparse_grad(x, w.values)
    gx_d, gw_d = jax.jit(jax.grad(lambda x, d: ((x @ d) ** 2).sum(), (0, 1)))(x, to_dense(w))
    np.testing.assert_allclose(gx, gx_d, rtol=1e-5, atol=1e-6)
    flat = gw_d.reshape(batch + (-1,))[..., w.idx]
    np.testing.assert_allclose(gv, flat, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stride,padding", [(1, "SAME"), (2, "SAME"), (1, "VALID")])
def test_conv2d_matches_lax_conv(stride, padding):
    w = _random_sparse(jax.random.PRNGKey(3), (3, 3, 2, 4), 20)
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 6, 5, 2))
    want = jax.lax.conv_general_dilated(
        x, to_dense(w), (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    got = jax.jit(partial(conv2d, stride=stride, padding=padding))(x, w)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the dense-kernel path (im2col + matmul) is the same convolution
    dense = jax.jit(partial(conv2d, stride=stride, padding=padding))(x, to_dense(w))
    np.testing.assert_allclose(dense, want, rtol=1e-5, atol=1e-5)


def test_conv2d_batched_kernel_values():
    w = _random_sparse(jax.random.PRNGKey(5), (3, 3, 1, 3), 7, (2,))
    x = jax.random.normal(jax.random.PRNGKey(6), (4, 5, 5, 1))
    got = jax.jit(conv2d)(x, w)
    for k in range(2):
        wk = SparseTensor(w.idx, w.values[k], w.dense_shape)
        np.testing.assert_allclose(got[k], conv2d(x, to_dense(wk)), rtol=1e-5, atol=1e-5)


def test_matmul_cost_is_linear_in_nse():
    # the compiled program holds no [n_in, n_out] buffer: its largest intermediate is [B, s]
    x = jnp.ones((8, 512))
    w = _random_sparse(jax.random.PRNGKey(7), (512, 1024), 100)
    text = jax.jit(matmul).lower(x, w).as_text()
    assert "512x1024" not in text and "524288" not in text


def test_sparse_normal_log_prob_and_kl_are_over_the_active_set():
    idx = jnp.array([0, 3, 4], jnp.int32)
    loc, scale = jnp.array([0.1, -0.2, 0.3]), jnp.array([0.5, 1.5, 0.7])
    p = SparseNormal(loc, scale, idx, (2, 3))
    q = SparseNormal(0.0, 1.0, idx, (2, 3))
    v = SparseTensor(idx, jnp.array([1.0, 2.0, -1.0]), (2, 3))
    np.testing.assert_allclose(p.log_prob(v), Normal(loc, scale).log_prob(v.values).sum(), 1e-6)
    want = kl_divergence(Normal(loc, scale), Normal(0.0, 1.0)).sum()
    np.testing.assert_allclose(kl_divergence(p, q), want, rtol=1e-6)
    with pytest.raises(ValueError, match="idx mismatch"):
        kl_divergence(p, SparseNormal(0.0, 1.0, jnp.array([0, 1, 2]), (2, 3)))


def test_bad_input():
    w = _random_sparse(jax.random.PRNGKey(0), (4, 3), 2)
    with pytest.raises(ValueError, match="n_in"):
        matmul(jnp.ones((2, 5)), w)
    with pytest.raises(ValueError, match="padding"):
        conv2d(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1)), padding="FULL")
    with pytest.raises(TypeError, match="SparseTensor"):
        to_dense(jnp.ones(3))


# (x shape, values batch): x @ w broadcasts like NumPy's matmul on the dense tensor
_MATMUL_CASES = [((5, 6), ()), ((6,), ()), ((2, 5, 6), ()), ((5, 6), (3,)), ((3, 5, 6), (3,))]


@pytest.mark.parametrize("x_shape,batch", _MATMUL_CASES)
def test_matmul_operator_dense_at_sparse(x_shape, batch):
    w = _random_sparse(jax.random.PRNGKey(8), (6, 4), 10, batch)
    want = np.asarray(jax.random.normal(jax.random.PRNGKey(9), x_shape), np.float64)
    dense_w = np.asarray(to_dense(w), np.float64)
    x = jnp.asarray(want, jnp.float32)
    ref = want @ dense_w
    for got in (x @ w, np.asarray(x) @ w, jax.jit(lambda x, w: x @ w)(x, w)):
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("y_shape,batch", [((4, 2), ()), ((4,), ()), ((3, 4, 2), (3,))])
def test_matmul_operator_sparse_at_dense(y_shape, batch):
    w = _random_sparse(jax.random.PRNGKey(10), (6, 4), 10, batch)
    y = jax.random.normal(jax.random.PRNGKey(11), y_shape)
    ref = np.asarray(to_dense(w), np.float64) @ np.asarray(y, np.float64)
    for got in (w @ y, w @ np.asarray(y), matmul(w, y), jax.jit(lambda w, y: w @ y)(w, y)):
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    # gradients w.r.t. the active values equal the dense ones restricted to idx
    gv = jax.grad(lambda v: (SparseTensor(w.idx, v, w.dense_shape) @ y).sum())(w.values)
    gd = jax.grad(lambda d: (d @ y).sum())(to_dense(w))
    np.testing.assert_allclose(gv, gd.reshape(batch + (-1,))[..., w.idx], rtol=1e-5, atol=1e-6)


def test_matmul_operator_bad_shapes():
    w = _random_sparse(jax.random.PRNGKey(12), (4, 3), 5)
    with pytest.raises(ValueError, match="n_in = 4"):
        jnp.ones((2, 5)) @ w
    with pytest.raises(ValueError, match="n = 3 columns"):
        w @ jnp.ones((4, 2))
    with pytest.raises(ValueError, match="scalar"):
        matmul(jnp.float32(2.0), w)
    with pytest.raises(TypeError, match="two SparseTensors"):
        matmul(w, w)
    with pytest.raises(TypeError, match="unsupported operand"):
        w @ w  # no sparse-sparse product: Python's own TypeError
    kernel = _random_sparse(jax.random.PRNGKey(13), (3, 3, 1, 2), 4)
    with pytest.raises(ValueError, match="conv2d"):
        jnp.ones((2, 3)) @ kernel
