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


@pytest.mark.parametrize("fbm_type", ["I", "II"])
@pytest.mark.parametrize(
    "num_ou, gamma_max, horizon",
    [(5, 10.0, 2.4), (5, 20.0, 1.0), (5, 20.0, 6.0), (3, 200.0 / 2.4, 2.4), (7, 20.0, 2.4)],
)
def test_float32_series_matches_float64(fbm_type, num_ou, gamma_max, horizon):
    """In-graph series (no callback): ω within 2e-6 and dω/dH within 1e-5 of their float64
    values, relative to the largest entry, over H ∈ [0.02, 0.98]."""
    g = gamma_grid(num_ou, gamma_max)
    assert not _uses_callback(g, horizon, fbm_type)
    w, dw = _omega_and_slope(HS, g, horizon, fbm_type, "float32")
    w64, dw64 = _float64(HS, g, horizon, fbm_type)
    assert np.abs(w - w64).max() <= 2e-6 * np.abs(w64).max()
    assert np.abs(dw - dw64).max() <= 1e-5 * np.abs(dw64).max()


def test_ill_conditioned_grid_keeps_the_host_solve():
    """Type II with K = 8, γ_max = 100, T = ½ (|ω| ~ 1e5, cancelling; cond(A) so large that two
    float64 solves agree to ~2e-6 only): the float32 series would miss by more than 1e-6 of
    max|ω|, so each call solves in float64 on the host; ω agrees with the x64 path to 2e-5."""
    g, horizon = gamma_grid(8, 100.0), 0.5
    assert fbm._omega_chebyshev(tuple(np.asarray(g).tolist()), horizon, "II") is None
    assert _uses_callback(g, horizon, "II")
    hs = HS[::6].astype(np.float32).astype(np.float64)  # the H the float32 call sees
    w, _ = _omega_and_slope(hs, g, horizon, "II", "float32")
    w64, _ = _float64(hs, g, horizon, "II")
    assert np.abs(w - w64).max() <= 2e-5 * np.abs(w64).max()
