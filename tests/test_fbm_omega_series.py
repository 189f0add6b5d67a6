"""ω(H) in float32: a Chebyshev series fitted in float64 once per grid (no host round trip per
step), with the float64 host solve kept where the series would be inaccurate.

The reference is the x64 path of :func:`optimal_omega` (b(H) in-graph in float64, A⁻¹ from
NumPy), and its derivative by autodiff of the closed form.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppl.transforms import fbm
from ppl.transforms.fbm import _clenshaw, gamma_grid, optimal_omega

HS = np.linspace(0.02, 0.98, 49)


def _omega_and_slope(hs, gammas, horizon, fbm_type, dtype):
    def one(h):
        return jax.jvp(lambda x: optimal_omega(x, gammas, horizon, fbm_type=fbm_type), (h,), (1.0,))

    w, dw = jax.vmap(one)(jnp.asarray(hs, dtype=dtype))
    assert w.dtype == dw.dtype == jnp.dtype(dtype)
    return np.asarray(w, np.float64), np.asarray(dw, np.float64)


def _float64(hs, gammas, horizon, fbm_type):
    with jax.enable_x64(True):
        return _omega_and_slope(hs, gammas, horizon, fbm_type, "float64")


def _uses_callback(gammas, horizon, fbm_type):
    jaxpr = jax.make_jaxpr(lambda h: optimal_omega(h, gammas, horizon, fbm_type=fbm_type))(0.3)
    return "callback" in str(jaxpr)


def test_clenshaw_is_chebval():
    """The recurrence sums Σ c_k T_k(x) (NumPy's ``chebval`` as the reference)."""
    rng = np.random.default_rng(0)
    coef, x = rng.normal(size=(9, 3)), np.linspace(-1.0, 1.0, 17)
    want = np.polynomial.chebyshev.chebval(x, coef).T  # [17, 3]
    np.testing.assert_allclose(_clenshaw(coef, x), want, rtol=1e-12, atol=1e-12)
    got = _clenshaw(jnp.asarray(coef), jnp.asarray(x))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


SERIES_GRIDS = [  # (fbm_type, K, γ_max, T): grids whose float32 series passes its check
    ("I", 5, 10.0, 2.4),
    ("I", 5, 20.0, 1.0),
    ("I", 7, 20.0, 2.4),
    ("I", 3, 200.0 / 2.4, 2.4),
    ("II", 5, 10.0, 2.4),
    ("II", 5, 20.0, 2.0),
    ("II", 5, 20.0, 6.0),
    ("II", 3, 200.0 / 2.4, 2.4),
]


def _per_h_error(w, w64):
    """max_k |δω_k(H)| / max_k |ω_k(H)|, the worst over H."""
    return float((np.abs(w - w64).max(axis=1) / np.abs(w64).max(axis=1)).max())


@pytest.mark.parametrize("fbm_type, num_ou, gamma_max, horizon", SERIES_GRIDS)
def test_float32_series_matches_float64(fbm_type, num_ou, gamma_max, horizon):
    """In-graph series (no callback): at every H of [0.02, 0.98] and within 1e-6 of the
    ends, ω within 2e-6 of max_k |ω_k(H)| and dω/dH within 2e-5 of max_k |dω_k/dH|, against
    float64."""
    g = gamma_grid(num_ou, gamma_max)
    assert not _uses_callback(g, horizon, fbm_type)
    hs = np.concatenate([HS, [1e-6, 1.0 - 1e-6]]).astype(np.float32).astype(np.float64)
    w, dw = _omega_and_slope(hs, g, horizon, fbm_type, "float32")
    w64, dw64 = _float64(hs, g, horizon, fbm_type)
    assert _per_h_error(w, w64) <= 2e-6
    assert _per_h_error(dw, dw64) <= 2e-5


def test_gradient_at_the_ends_is_whole():
    """H = 0 and H = 1 exactly (a saturated sigmoid): the gradient is the series' slope
    there, not half of it (``jnp.clip`` would split it between its branches at a tie)."""
    g = gamma_grid(5, 10.0)
    _, dw = _omega_and_slope(np.array([0.0, 1.0]), g, 2.4, "I", "float32")
    _, dw64 = _omega_and_slope(np.array([1e-7, 1.0 - 1e-7]), g, 2.4, "I", "float32")
    np.testing.assert_allclose(dw, dw64, rtol=1e-3, atol=1e-6 * np.abs(dw64).max())


def test_short_horizon_type_ii_keeps_the_host_solve():
    """Type II at T = 1 (cond(A) ~ 1e7; |ω| spans ~1e1 to ~1e5 over H): the float32 series
    would miss ω(½) by more than 1e-6 of its size, so each call solves in float64 on the host.
    At H = ½ type II is Brownian motion: Σω = 1; dω/dH (a float64 five-point difference)
    matches float64 autodiff."""
    g, horizon = gamma_grid(5, 20.0), 1.0
    assert fbm._omega_chebyshev(tuple(np.asarray(g).tolist()), horizon, "II") is None
    assert _uses_callback(g, horizon, "II")
    hs = np.array([0.3, 0.5, 0.7])
    w, dw = _omega_and_slope(hs, g, horizon, "II", "float32")
    w64, dw64 = _float64(hs, g, horizon, "II")
    assert abs(w[1].sum() - 1.0) <= 1e-5
    assert _per_h_error(w, w64) <= 1e-6
    assert _per_h_error(dw, dw64) <= 1e-4
