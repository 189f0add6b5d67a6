"""Independent acceptance tests for the Markov approximation of fBM (spec ``fbm.md``).

Written from ``shared/specs/fbm.md`` (§1 maths, §4 tests 1, 2, 3, 4, 5, 8, 10, 12) and the
public API contract only, without reading the implementation.  Every expected value is either
a [NUM] number of the spec's §4 tables or computed in this file by a small numpy/scipy float64
reference written from the spec's maths:

* the geometric grid γ_k = r^{k−n}, n = (K+1)/2, r = γ_max^{2/(K−1)} (§1.2);
* the MA basis Z_k(t) = Y_k(t) (type II, Y_0 = 0) or Y_k(t) − Y_k(0) (type I, stationary
  Y_0 ~ N(0, C), C_ij = 1/(γ_i+γ_j)), with its covariance re-derived by hand;
* A_ij = ∫_0^T E[Z_i Z_j] dt (closed form re-derived), b_k = ∫_0^T E[B^H_t Z_k(t)] dt and
  c = ∫_0^T E[(B^H_t)²] dt by *nested* scipy quadrature of the stochastic-integral kernels
  (MvN with the Γ(H+½)⁻¹ prefactor for type I, Riemann–Liouville for type II);
* the true covariances (type I closed form with V_H = 1/(Γ(2H+1) sin πH), type II by quadrature);
* the exact covariance of the Euler–Maruyama recursion of §1.4 (to separate the O(dt) bias of
  the scheme from Monte Carlo noise), and an own Euler loop for the wiring of §1.4;
* a dense Gaussian-process log-likelihood of the linear model dX = −θX dt + σ dB̂ built from
  Van Loan matrix exponentials of the augmented system (no Kalman recursion).

Beyond the listed spec tests: the exact Euler wiring with control and KL (and the constant
control of §4 test 6), and the accuracy of the float32 ω of a default ``markov_sde`` (§4 says ω
"must be solved in float64, or with a small ridge term").

Statistical tests use fixed seeds and bounds of 4.5 standard errors computed from the
reference covariance; the cheap default versions use 2·10⁴ paths, the full-size versions
(10⁵ paths, as in the spec) are marked ``slow``.

Float64 is enabled locally (``x64`` fixture, ``jax.enable_x64`` context manager) where the
tolerance needs it; nothing switches x64 on globally.
"""

import functools
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, linalg, special, stats

from ppl.transforms import fbm

T_VIDEO = 2.4  # the spec's default horizon (§4: K=5, γ_max=20, T=2.4)
HS_TABLE = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

# §4 table 1: relative integrated L2 error (c − bᵀω)/c at the optimal ω [NUM].
ERR_TABLE = {
    "II": (2.0e-1, 3.6e-2, 5.0e-3, 4.0e-4, 2e-8, 3.9e-5, 4.7e-5, 3.1e-5, 1.6e-5),
    "I": (2.6e-1, 5.7e-2, 1.3e-2, 1.2e-2, 3.0e-2, 7.4e-2, 1.6e-1, 3.3e-1, 6.0e-1),
}
# §4 table 2: max |C_MA − C_true| / max |C_true| over the 24-point grid on (0, 2.4] [NUM].
COV_TABLE = {
    "II": {0.2: 3.3e-2, 0.3: 6.4e-3, 0.5: 1.5e-4, 0.7: 1.3e-3, 0.8: 1.4e-3},
    "I": {0.2: 5.1e-2, 0.3: 1.3e-2, 0.5: 3.3e-2, 0.7: 1.8e-1, 0.8: 3.6e-1},
}


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture
def inf():
    """The inference module (imported lazily so that its absence fails only its own tests)."""
    return importlib.import_module("ppl.inference.fbm")


def _np(x):
    return np.asarray(x, dtype=np.float64)


# ============================================================================ numpy references

_QUAD = dict(epsabs=0.0, epsrel=1e-13, limit=500)


def ref_gammas(num_ou, gamma_max):
    if num_ou == 1:
        return np.array([1.0])
    r = gamma_max ** (2.0 / (num_ou - 1))
    n = (num_ou + 1) / 2.0
    return r ** (np.arange(1, num_ou + 1) - n)


def ref_vh(h):
    return 1.0 / (special.gamma(2 * h + 1) * math.sin(math.pi * h))


def _kexp(alpha, gam, t):
    """∫_0^t v^alpha e^{−gam v} dv (algebraic end-point weight handles the singularity)."""
    return integrate.quad(
        lambda v: np.exp(-gam * v), 0.0, t, weight="alg", wvar=(alpha, 0), **_QUAD
    )[0]


@functools.cache
def _tail_pow(alpha, gam):
    """∫_0^∞ w^alpha e^{−gam w} dw by quadrature."""
    cut = 1.0 / gam
    head = _kexp(alpha, gam, cut)
    tail = integrate.quad(lambda w: w**alpha * np.exp(-gam * w), cut, np.inf, **_QUAD)[0]
    return head + tail


def _shifted(alpha, gam, t):
    """∫_0^∞ (t+w)^alpha e^{−gam w} dw by quadrature."""
    return integrate.quad(lambda w: (t + w) ** alpha * np.exp(-gam * w), 0.0, np.inf, **_QUAD)[0]


def _cross_cov(h, gam, t, fbm_type):
    """E[B^H_t Z(t)] for one OU speed, from the Wiener-integral kernels.

    Type II: Γ(a)⁻¹ ∫_0^t (t−u)^{H−½} e^{−γ(t−u)} du.
    Type I:  the same over (0, t) plus, for u = −w < 0,
             Γ(a)⁻¹ ∫_0^∞ [(t+w)^{H−½} − w^{H−½}] (e^{−γ(t+w)} − e^{−γw}) dw.
    """
    alpha = h - 0.5
    val = _kexp(alpha, gam, t)
    if fbm_type == "I":
        val += np.expm1(-gam * t) * (_shifted(alpha, gam, t) - _tail_pow(alpha, gam))
    return val / special.gamma(h + 0.5)


@functools.cache
def ref_b_quad(h, gammas, horizon, fbm_type):
    """b_k = ∫_0^T E[B^H_t Z_k(t)] dt by nested quadrature (gammas: a tuple)."""
    out = []
    for gam in gammas:
        val = integrate.quad(
            lambda t, gam=gam: _cross_cov(h, gam, t, fbm_type),
            0.0,
            horizon,
            epsabs=0.0,
            epsrel=1e-12,
            limit=200,
        )[0]
        out.append(val)
    return np.array(out)


def _mvn_var_quad(h, t):
    """Var B^H_t for the Γ-normalised MvN integral, by quadrature (no self-similarity used)."""
    al = h - 0.5
    # (0, t): ∫ v^{2H−1} dv
    inner = integrate.quad(lambda v: 1.0, 0.0, t, weight="alg", wvar=(2 * al, 0), **_QUAD)[0]
    # (−∞, 0): ∫_0^∞ ((t+w)^α − w^α)² dw, split at w = 1 with algebraic weights near 0.
    near = (
        integrate.quad(lambda w: (t + w) ** (2 * al), 0.0, 1.0, **_QUAD)[0]
        - 2
        * integrate.quad(lambda w: (t + w) ** al, 0.0, 1.0, weight="alg", wvar=(al, 0), **_QUAD)[0]
        + integrate.quad(lambda w: 1.0, 0.0, 1.0, weight="alg", wvar=(2 * al, 0), **_QUAD)[0]
    )
    # [1, ∞) with w = 1/x: ∫_0^1 x^{−2α} g(x) dx, g(x) = (expm1(α log1p(t x))/x)², g(0) = (αt)².
    far = integrate.quad(
        lambda x: (np.expm1(al * np.log1p(t * x)) / x) ** 2 if x > 0 else (al * t) ** 2,
        0.0,
        1.0,
        weight="alg",
        wvar=(-2 * al, 0),
        **_QUAD,
    )[0]
    return (inner + near + far) / special.gamma(h + 0.5) ** 2


def _rl_var_quad(h, t):
    return (
        integrate.quad(lambda v: 1.0, 0.0, t, weight="alg", wvar=(2 * h - 1, 0), **_QUAD)[0]
        / special.gamma(h + 0.5) ** 2
    )


@functools.cache
def ref_c_quad(h, horizon, fbm_type):
    var = _mvn_var_quad if fbm_type == "I" else _rl_var_quad
    return integrate.quad(lambda t: var(h, t), 0.0, horizon, epsabs=0.0, epsrel=1e-11, limit=200)[0]


def ref_a_matrix(gammas, horizon, fbm_type):
    """A_ij = ∫_0^T E[Z_i(t) Z_j(t)] dt (closed form of the integrand re-derived below)."""
    g = np.asarray(gammas, dtype=float)
    gi, gj = g[:, None], g[None, :]
    s = gi + gj
    if fbm_type == "II":  # E[Y_i Y_j](t) = (1 − e^{−(γi+γj)t})/(γi+γj)
        return (horizon + np.expm1(-s * horizon) / s) / s
    # E[Z_i Z_j](t) = (2 − e^{−γi t} − e^{−γj t})/(γi+γj)
    return (2 * horizon + np.expm1(-gi * horizon) / gi + np.expm1(-gj * horizon) / gj) / s


@functools.cache
def ref_solution(h, num_ou, gamma_max, horizon, fbm_type):
    """(ω*, relative error) from the quadrature b, c and the re-derived A, in float64."""
    g = ref_gammas(num_ou, gamma_max)
    a = ref_a_matrix(g, horizon, fbm_type)
    b = ref_b_quad(h, tuple(g), horizon, fbm_type)
    c = ref_c_quad(h, horizon, fbm_type)
    omega = np.linalg.solve(a, b)
    return omega, (c - b @ omega) / c


def _stat_cov(t, s, g):
    """Cov(Y_i(t), Y_j(s)) of stationary OU processes driven by the same W: [..., K, K]."""
    tt, ss = t[..., None, None], s[..., None, None]
    gi, gj = g[:, None], g[None, :]
    rate = np.where(tt >= ss, gi, gj)
    return np.exp(-rate * np.abs(tt - ss)) / (gi + gj)


def ref_ma_cov(t, s, gammas, omega, fbm_type):
    """Cov(B̂_t, B̂_s) of the K-term MA process, broadcast over t and s."""
    t, s = np.broadcast_arrays(_np(t), _np(s))
    g, w = _np(gammas), _np(omega)
    gi, gj = g[:, None], g[None, :]
    if fbm_type == "II":
        tt, ss = t[..., None, None], s[..., None, None]
        m = np.minimum(tt, ss)
        mat = (np.exp(-gi * (tt - m) - gj * (ss - m)) - np.exp(-gi * tt - gj * ss)) / (gi + gj)
    else:
        z = np.zeros_like(t)
        mat = _stat_cov(t, s, g) - _stat_cov(t, z, g) - _stat_cov(z, s, g) + _stat_cov(z, z, g)
    return np.einsum("i,...ij,j->...", w, mat, w)


def _rl_cov_scalar(t, s, h):
    lo, hi = min(t, s), max(t, s)
    if lo == hi:
        val = lo ** (2 * h) / (2 * h)
    else:  # ∫_0^lo (hi−u)^{H−½} (lo−u)^{H−½} du
        val = integrate.quad(
            lambda u: (hi - u) ** (h - 0.5), 0.0, lo, weight="alg", wvar=(0, h - 0.5), **_QUAD
        )[0]
    return val / special.gamma(h + 0.5) ** 2


def ref_fbm_cov(t, s, h, fbm_type):
    t, s = np.broadcast_arrays(_np(t), _np(s))
    if fbm_type == "I":
        return 0.5 * ref_vh(h) * (t ** (2 * h) + s ** (2 * h) - np.abs(t - s) ** (2 * h))
    return np.vectorize(lambda a, b: _rl_cov_scalar(a, b, h))(t, s)


def ref_euler_cov(gammas, omega, fbm_type, dt, num_steps, idx, sigma=1.0):
    """Exact covariance of the Euler recursion of §1.4 (zero drift, constant σ) at steps idx.

    Z = (X, Y_1..Y_K), Z_{n+1} = F Z_n + G ΔW_n with F = I + dt·[[0, −σ(ω∘γ)ᵀ], [0, −diag γ]],
    G = (σ Σω, 1, …, 1); X_0 = 0, Y_0 ~ N(0, C) (type I) or 0 (type II).
    Returns the covariance of the full state, [len(idx), len(idx), K+1, K+1].
    """
    g, w = _np(gammas), _np(omega)
    k = len(g)
    drift = np.zeros((k + 1, k + 1))
    drift[0, 1:] = -sigma * w * g
    drift[1:, 1:] = -np.diag(g)
    f = np.eye(k + 1) + dt * drift
    col = np.concatenate([[sigma * w.sum()], np.ones(k)])
    p = np.zeros((k + 1, k + 1))
    if fbm_type == "I":
        p[1:, 1:] = 1.0 / (g[:, None] + g[None, :])
    ps = [p]
    for _ in range(num_steps):
        p = f @ p @ f.T + dt * np.outer(col, col)
        ps.append(p)
    out = np.zeros((len(idx), len(idx), k + 1, k + 1))
    for a, i in enumerate(idx):
        for c, j in enumerate(idx):
            if i >= j:  # Cov(Z_i, Z_j) = F^{i−j} P_j
                out[a, c] = np.linalg.matrix_power(f, i - j) @ ps[j]
            else:
                out[a, c] = (np.linalg.matrix_power(f, j - i) @ ps[i]).T
    return out


def ref_dense_x_cov(ts, gammas, omega, fbm_type, drift_rate, sigma):
    """Dense covariance of X at ts for dX = −θX dt + σ dB̂, X_0 = 0 (Van Loan, no filter)."""
    g, w = _np(gammas), _np(omega)
    k = len(g)
    n = k + 1
    f = np.zeros((n, n))
    f[0, 0] = -drift_rate
    f[0, 1:] = -sigma * w * g
    f[1:, 1:] = -np.diag(g)
    col = np.concatenate([[sigma * w.sum()], np.ones(k)])
    p = np.zeros((n, n))
    if fbm_type == "I":
        p[1:, 1:] = 1.0 / (g[:, None] + g[None, :])
    ps, prev = [], 0.0
    for t in ts:
        big = np.zeros((2 * n, 2 * n))
        big[:n, :n] = -f
        big[:n, n:] = np.outer(col, col)
        big[n:, n:] = f.T
        e = linalg.expm(big * (t - prev))
        phi = e[n:, n:].T
        p = phi @ p @ phi.T + phi @ e[:n, n:]
        ps.append(p)
        prev = t
    m = len(ts)
    cov = np.zeros((m, m))
    for i in range(m):
        for j in range(i, m):
            cov[j, i] = cov[i, j] = (linalg.expm(f * (ts[j] - ts[i])) @ ps[i])[0, 0]
    return cov


# ============================================================================ §4 test 12: grid


@pytest.mark.parametrize(
    "gamma_max, expected",
    [(20.0, (0.05, 0.2236, 1.0, 4.472, 20.0)), (10.0, (0.1, 0.316, 1.0, 3.16, 10.0))],
)
def test_gamma_grid_spec_values(gamma_max, expected):
    g = _np(fbm.gamma_grid(5, gamma_max))
    assert g.shape == (5,)
    np.testing.assert_allclose(g, expected, rtol=2e-3)
    np.testing.assert_allclose(g, ref_gammas(5, gamma_max), rtol=1e-6)


@pytest.mark.parametrize("num_ou", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("gamma_max", [1.5, 20.0, 200.0 / T_VIDEO])
def test_gamma_grid_properties(x64, num_ou, gamma_max):
    g = _np(fbm.gamma_grid(num_ou, gamma_max))
    assert g.shape == (num_ou,)
    np.testing.assert_allclose(g, ref_gammas(num_ou, gamma_max), rtol=1e-12)
    np.testing.assert_allclose(g[0] * g[-1], 1.0, rtol=1e-12)
    np.testing.assert_allclose([g[0], g[-1]], [1.0 / gamma_max, gamma_max], rtol=1e-12)
    ratios = g[1:] / g[:-1]
    np.testing.assert_allclose(ratios, gamma_max ** (2.0 / (num_ou - 1)), rtol=1e-12)
    if num_ou % 2 == 1:
        np.testing.assert_allclose(g[num_ou // 2], 1.0, rtol=1e-12)


def test_gamma_grid_single():
    np.testing.assert_allclose(_np(fbm.gamma_grid(1, 20.0)), [1.0])


@pytest.mark.parametrize("num_ou", [0, -3])
def test_gamma_grid_bad_num_ou(num_ou):
    with pytest.raises(ValueError, match="num_ou"):
        fbm.gamma_grid(num_ou, 20.0)


@pytest.mark.parametrize("gamma_max", [1.0, 0.5, -2.0, float("inf"), float("nan")])
def test_gamma_grid_bad_gamma_max(gamma_max):
    with pytest.raises(ValueError, match="gamma_max"):
        fbm.gamma_grid(5, gamma_max)


# ============================================================================ V_H


def test_mvn_variance_values(x64):
    # §1.1 [NUM]: V_0.1=3.524, V_0.3=1.383, V_0.5=1, V_0.7=0.995, V_0.9=1.930.
    for h, v in [(0.1, 3.524), (0.3, 1.383), (0.5, 1.0), (0.7, 0.995), (0.9, 1.930)]:
        got = float(fbm.mvn_variance(h))
        np.testing.assert_allclose(got, v, rtol=1e-3)
        np.testing.assert_allclose(got, ref_vh(h), rtol=1e-12)
        # V_H is Var B^H_1 of the Γ-normalised MvN integral: check by quadrature.
        np.testing.assert_allclose(got, _mvn_var_quad(h, 1.0), rtol=1e-8)


# ============================================================================ §4 test 1: ω solve


@pytest.mark.parametrize("fbm_type", ["I", "II"])
@pytest.mark.parametrize("hurst", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_omega_solve(x64, fbm_type, hurst):
    g = fbm.gamma_grid(5, 20.0)
    a, b, c = (_np(v) for v in fbm.omega_system(hurst, g, T_VIDEO, fbm_type=fbm_type))
    assert a.shape == (5, 5) and b.shape == (5,) and c.shape == ()
    # A is the re-derived Gram matrix, symmetric positive definite.
    np.testing.assert_allclose(a, ref_a_matrix(_np(g), T_VIDEO, fbm_type), rtol=1e-12)
    np.testing.assert_allclose(a, a.T, rtol=1e-14)
    assert np.all(np.linalg.eigvalsh(a) > 0)

    omega = _np(fbm.optimal_omega(hurst, g, T_VIDEO, fbm_type=fbm_type))
    assert omega.shape == (5,)
    assert np.linalg.norm(a @ omega - b) <= 1e-9 * np.linalg.norm(b)

    def cost(w):
        return w @ a @ w - 2 * b @ w + c

    j_star = cost(omega)
    np.testing.assert_allclose(j_star, c - b @ omega, rtol=1e-8, atol=1e-10 * c)
    assert j_star >= -1e-12 * c

    rng = np.random.default_rng(1)
    for scale in (1e-3, 1e-1, 1.0):
        delta = scale * rng.standard_normal(5)
        gain = cost(omega + delta) - j_star
        quad_form = delta @ a @ delta
        assert quad_form > 0 and gain > 0
        np.testing.assert_allclose(gain, quad_form, rtol=1e-6, atol=1e-12 * c)

    err = float(fbm.approximation_error(hurst, g, T_VIDEO, fbm_type=fbm_type))
    np.testing.assert_allclose(err, (c - b @ omega) / c, rtol=1e-6, atol=1e-10)

    # ω* against the independent (quadrature) solution.
    omega_ref, _ = ref_solution(hurst, 5, 20.0, T_VIDEO, fbm_type)
    np.testing.assert_allclose(omega, omega_ref, rtol=0, atol=1e-7 * np.abs(omega_ref).max())


def test_omega_unit_variance_type1(x64):
    g = fbm.gamma_grid(5, 20.0)
    for h in (0.2, 0.5, 0.8):
        w = _np(fbm.optimal_omega(h, g, T_VIDEO, fbm_type="I"))
        wu = _np(fbm.optimal_omega(h, g, T_VIDEO, fbm_type="I", unit_variance=True))
        np.testing.assert_allclose(wu, w / math.sqrt(ref_vh(h)), rtol=1e-10)


# ============================================================================ §4 test 2: b, c


@pytest.mark.parametrize("fbm_type", ["I", "II"])
@pytest.mark.parametrize("hurst", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_b_and_c_against_quadrature(x64, fbm_type, hurst):
    g = _np(fbm.gamma_grid(5, 20.0))
    _, b, c = fbm.omega_system(hurst, jnp.asarray(g), T_VIDEO, fbm_type=fbm_type)
    b_ref = ref_b_quad(hurst, tuple(g), T_VIDEO, fbm_type)
    np.testing.assert_allclose(_np(b), b_ref, rtol=1e-8, atol=1e-8 * np.abs(b_ref).max())
    c_ref = ref_c_quad(hurst, T_VIDEO, fbm_type)
    np.testing.assert_allclose(float(c), c_ref, rtol=1e-8)


@pytest.mark.parametrize("fbm_type", ["I", "II"])
def test_b_against_quadrature_other_grid(x64, fbm_type):
    """A second grid and horizon (K=3, γ_max=10, T=6 as in the bridge experiment)."""
    g = _np(fbm.gamma_grid(3, 10.0))
    for h in (0.25, 0.65) if fbm_type == "II" else (0.65,):  # type-I nested quad is slow
        _, b, c = fbm.omega_system(h, jnp.asarray(g), 6.0, fbm_type=fbm_type)
        b_ref = ref_b_quad(h, tuple(g), 6.0, fbm_type)
        np.testing.assert_allclose(_np(b), b_ref, rtol=1e-8, atol=1e-8 * np.abs(b_ref).max())
        np.testing.assert_allclose(float(c), ref_c_quad(h, 6.0, fbm_type), rtol=1e-8)


# ============================================================================ §4 test 3: tables


@pytest.mark.parametrize("fbm_type", ["I", "II"])
@pytest.mark.parametrize("i", range(len(HS_TABLE)))
def test_approximation_error_table(x64, fbm_type, i):
    h = HS_TABLE[i]
    g = fbm.gamma_grid(5, 20.0)
    err = float(fbm.approximation_error(h, g, T_VIDEO, fbm_type=fbm_type))
    expected = ERR_TABLE[fbm_type][i]
    _, err_ref = ref_solution(h, 5, 20.0, T_VIDEO, fbm_type)
    if fbm_type == "II" and h == 0.5:
        assert 0 <= err < 1e-6
        assert abs(err - err_ref) < 1e-9
    else:
        np.testing.assert_allclose(err, expected, rtol=0.1)
        np.testing.assert_allclose(err, err_ref, rtol=1e-4)


def _grid24():
    return T_VIDEO / 24 * np.arange(1, 25)


@pytest.mark.parametrize(
    "fbm_type, hurst",
    [(t, h) for t in ("II", "I") for h in (0.2, 0.3, 0.5, 0.7, 0.8)],
)
def test_covariance_error_table(x64, fbm_type, hurst):
    g = fbm.gamma_grid(5, 20.0)
    omega = fbm.optimal_omega(hurst, g, T_VIDEO, fbm_type=fbm_type)
    tt = _grid24()
    t, s = jnp.asarray(tt[:, None]), jnp.asarray(tt[None, :])
    c_ma = _np(fbm.ma_covariance(t, s, g, omega, fbm_type=fbm_type))
    c_true = _np(fbm.fbm_covariance(t, s, hurst, fbm_type=fbm_type))
    assert c_ma.shape == (24, 24) and c_true.shape == (24, 24)
    np.testing.assert_allclose(c_ma, c_ma.T, rtol=1e-12, atol=1e-15)

    # Each piece against the independent references.
    ref_ma = ref_ma_cov(tt[:, None], tt[None, :], _np(g), _np(omega), fbm_type)
    np.testing.assert_allclose(c_ma, ref_ma, rtol=1e-10, atol=1e-12)
    ref_true = ref_fbm_cov(tt[:, None], tt[None, :], hurst, fbm_type)
    np.testing.assert_allclose(c_true, ref_true, rtol=1e-9, atol=1e-12)

    rel = np.abs(c_ma - c_true).max() / np.abs(c_true).max()
    np.testing.assert_allclose(rel, COV_TABLE[fbm_type][hurst], rtol=0.15)
    # Fully independent value: own ω (quadrature b), own covariances.
    omega_ref, _ = ref_solution(hurst, 5, 20.0, T_VIDEO, fbm_type)
    ref_ma_own = ref_ma_cov(tt[:, None], tt[None, :], ref_gammas(5, 20.0), omega_ref, fbm_type)
    rel_ref = np.abs(ref_ma_own - ref_true).max() / np.abs(ref_true).max()
    np.testing.assert_allclose(rel, rel_ref, rtol=1e-4)


def test_ma_covariance_broadcast_and_start(x64):
    g = fbm.gamma_grid(5, 20.0)
    for fbm_type in ("I", "II"):
        omega = fbm.optimal_omega(0.35, g, T_VIDEO, fbm_type=fbm_type)
        t = jnp.array([[0.3], [1.1], [2.0]])
        s = jnp.array([0.0, 0.3, 1.7, 2.4])
        c = _np(fbm.ma_covariance(t, s, g, omega, fbm_type=fbm_type))
        assert c.shape == (3, 4)
        np.testing.assert_allclose(c, ref_ma_cov(t, s, g, omega, fbm_type), rtol=1e-10)
        # Both MA types start at 0: Cov(B̂_t, B̂_0) = 0.
        assert np.all(np.abs(c[:, 0]) < 1e-14)


@pytest.mark.parametrize("hurst", [0.15, 0.35, 0.5, 0.85])
def test_fbm_covariance_closed_forms(x64, hurst):
    tt = np.array([0.05, 0.4, 1.0, 1.7, 2.4])
    t, s = tt[:, None], tt[None, :]
    c1 = _np(fbm.fbm_covariance(jnp.asarray(t), jnp.asarray(s), hurst, fbm_type="I"))
    np.testing.assert_allclose(c1, ref_fbm_cov(t, s, hurst, "I"), rtol=1e-12)
    c1u = _np(
        fbm.fbm_covariance(jnp.asarray(t), jnp.asarray(s), hurst, fbm_type="I", unit_variance=True)
    )
    np.testing.assert_allclose(
        c1u, 0.5 * (t ** (2 * hurst) + s ** (2 * hurst) - np.abs(t - s) ** (2 * hurst)), rtol=1e-12
    )
    c2 = _np(fbm.fbm_covariance(jnp.asarray(t), jnp.asarray(s), hurst, fbm_type="II"))
    np.testing.assert_allclose(c2, ref_fbm_cov(t, s, hurst, "II"), rtol=1e-9)
    # RL variance t^{2H}/(2H Γ(H+½)²).
    np.testing.assert_allclose(
        np.diag(c2), tt ** (2 * hurst) / (2 * hurst * special.gamma(hurst + 0.5) ** 2), rtol=1e-10
    )
    if hurst == 0.5:  # both are Brownian motion
        np.testing.assert_allclose(c1, np.minimum(t, s), rtol=1e-12)
        np.testing.assert_allclose(c2, np.minimum(t, s), rtol=1e-10)


# ============================================================================ §4 test 4: MC


@pytest.mark.parametrize(
    "fbm_type, hurst, horizon",
    [("II", h, t) for h in (0.3, 0.5, 0.7) for t in (1.0, T_VIDEO)] + [("I", 0.5, 1.0)],
)
def test_markov_sde_float32_omega_accuracy(fbm_type, hurst, horizon):
    """The ω of a default (float32) markov_sde is the J-optimal one up to float32 rounding.

    §4: cond(A) is large for type II, "so ω must be solved in float64, or with a small ridge
    term".  Criterion: the relative cost J(ω)/c of the returned ω (evaluated in float64 with
    the independent A, b, c) exceeds the optimum (c − bᵀω*)/c by at most 1e-5.
    """
    sde = fbm.markov_sde(_zero_drift, _unit_diffusion, hurst, horizon=horizon, fbm_type=fbm_type)
    w = _np(sde.omega)
    g = ref_gammas(5, 20.0)
    a = ref_a_matrix(g, horizon, fbm_type)
    b = ref_b_quad(hurst, tuple(g), horizon, fbm_type)
    c = ref_c_quad(hurst, horizon, fbm_type)
    _, err_star = ref_solution(hurst, 5, 20.0, horizon, fbm_type)
    rel_cost = (w @ a @ w - 2 * b @ w + c) / c
    assert rel_cost - err_star <= 1e-5, (rel_cost, err_star)


def _zero_drift(t, x):
    return jnp.zeros_like(x)


def _unit_diffusion(t, x):
    return jnp.ones_like(x)


def _simulate_products(fbm_type, hurst, num_paths, horizon, dt, idx, seed, chunk=20_000):
    """Run euler in chunks; return E[X_i X_j], E[Y_i Y_j] (uncentred, over paths) at idx,
    E[Y_0 Y_0ᵀ], the sde, and the max violation of X_n − X_0 = Σ ω_k (Y_k,n − Y_k,0)."""
    sde = fbm.markov_sde(_zero_drift, _unit_diffusion, hurst, horizon=horizon, fbm_type=fbm_type)
    num_steps = int(round(horizon / dt))
    key = jax.random.PRNGKey(seed)
    sum_x = np.zeros((len(idx), len(idx)))
    sum_y = np.zeros((len(idx), len(idx), len(sde.gammas), len(sde.gammas)))
    sum_y0 = np.zeros((len(sde.gammas), len(sde.gammas)))
    identity_gap = 0.0
    omega = _np(sde.omega)
    done = 0
    while done < num_paths:
        n = min(chunk, num_paths - done)
        key, k0, k1 = jax.random.split(key, 3)
        y0 = sde.sample_y0(k0, (n,), 1)
        dw = jax.random.normal(k1, (num_steps, n, 1)) * math.sqrt(dt)
        xs, ys, kl = sde.euler(jnp.zeros((n, 1)), y0, dw, dt)
        xs, ys = _np(xs), _np(ys)
        assert xs.shape == (num_steps + 1, n, 1)
        assert ys.shape == (num_steps + 1, n, 1, len(sde.gammas))
        assert np.all(_np(kl) == 0.0)
        # §1.4 with b = 0, σ = 1: X_n − X_0 = Σ_k ω_k (Y_k,n − Y_k,0).
        lin = np.einsum("k,tnk->tn", omega, ys[:, :, 0, :] - ys[:1, :, 0, :])
        identity_gap = max(identity_gap, float(np.abs(xs[:, :, 0] - lin).max()))
        x = xs[idx, :, 0]  # [m, n]
        y = ys[idx, :, 0, :]  # [m, n, K]
        sum_x += x @ x.T
        sum_y += np.einsum("ank,bnl->abkl", y, y)
        sum_y0 += ys[0, :, 0, :].T @ ys[0, :, 0, :]
        done += n
    return sum_x / num_paths, sum_y / num_paths, sum_y0 / num_paths, sde, identity_gap


def _se_products(cov):
    """Standard error of the uncentred product mean of zero-mean Gaussians, per N."""
    v = np.diagonal(cov)
    return np.sqrt(np.multiply.outer(v, v) + cov**2)


def _check_mc(fbm_type, hurst, num_paths, horizon, seed):
    dt = 0.01
    num_steps = int(round(horizon / dt))
    idx = np.linspace(0, num_steps, 11).astype(int)[1:]
    emp_x, emp_y, emp_y0, sde, gap = _simulate_products(
        fbm_type, hurst, num_paths, horizon, dt, idx, seed
    )
    g, w = _np(sde.gammas), _np(sde.omega)
    assert sde.fbm_type == fbm_type
    np.testing.assert_allclose(g, ref_gammas(5, 20.0), rtol=1e-6)
    assert gap < 1e-4 * max(1.0, np.abs(w).sum())

    tt = idx * dt
    disc = ref_euler_cov(g, w, fbm_type, dt, num_steps, idx)  # [m, m, K+1, K+1]
    cont_x = ref_ma_cov(tt[:, None], tt[None, :], g, w, fbm_type)
    lib_x = _np(
        fbm.ma_covariance(
            jnp.asarray(tt[:, None]), jnp.asarray(tt[None, :]), sde.gammas, sde.omega, fbm_type
        )
    )
    # (float32 ma_covariance: Σ ω_i ω_j M_ij cancels for type II, where |ω| ~ 40 at T = 1)
    np.testing.assert_allclose(lib_x, cont_x, rtol=0, atol=2e-3 * np.abs(cont_x).max())

    tol_x = 4.5 * _se_products(disc[..., 0, 0]) / math.sqrt(num_paths)
    # (a) against the exact covariance of the Euler recursion (pure Monte Carlo error);
    assert np.all(np.abs(emp_x - disc[..., 0, 0]) <= tol_x), np.abs(emp_x - disc[..., 0, 0]).max()
    # (b) against the analytic MA covariance, allowing the computed O(dt) Euler bias.
    bias_x = np.abs(disc[..., 0, 0] - cont_x)
    assert np.all(np.abs(emp_x - lib_x) <= tol_x + bias_x)
    assert bias_x.max() < 0.05 * np.abs(cont_x).max()  # the bias is small at dt = 0.01

    if fbm_type == "II":
        assert np.all(emp_y0 == 0.0)
        return
    # Type I: Y_0 ~ N(0, C) and Cov(Y_k(t), Y_j(s)) = e^{−γ_k(t−s)}/(γ_k+γ_j), t ≥ s.
    cmat = 1.0 / (g[:, None] + g[None, :])
    assert np.all(np.abs(emp_y0 - cmat) <= 4.5 * _se_products(cmat) / math.sqrt(num_paths))
    m, k = len(idx), len(g)
    for a_ in range(m):
        for b_ in range(a_ + 1):
            d = disc[a_, b_, 1:, 1:]
            se = np.sqrt(
                np.outer(np.diag(disc[a_, a_, 1:, 1:]), np.diag(disc[b_, b_, 1:, 1:])) + d**2
            )
            tol = 4.5 * se / math.sqrt(num_paths)
            assert np.all(np.abs(emp_y[a_, b_] - d) <= tol), (a_, b_)
            lag = tt[a_] - tt[b_]
            cont = np.exp(-g[:, None] * lag) * np.ones((1, k)) / (g[:, None] + g[None, :])
            bias = np.abs(d - cont)
            assert np.all(np.abs(emp_y[a_, b_] - cont) <= tol + bias)
            # the discretisation bias is visible only for the fastest OU (γ dt = 0.2).
            assert bias[:3, :3].max() < 0.02 * cmat.max()


@pytest.mark.parametrize(
    "fbm_type, hurst",
    [
        ("I", 0.3),
        ("II", 0.7),
        pytest.param("I", 0.7, marks=pytest.mark.slow),
        pytest.param("II", 0.3, marks=pytest.mark.slow),
    ],
)
def test_mc_wiring(fbm_type, hurst):
    _check_mc(fbm_type, hurst, num_paths=20_000, horizon=1.0, seed=11)


@pytest.mark.slow
@pytest.mark.parametrize("fbm_type", ["I", "II"])
@pytest.mark.parametrize("hurst", [0.2, 0.5, 0.8])
def test_mc_wiring_full(fbm_type, hurst):
    _check_mc(fbm_type, hurst, num_paths=100_000, horizon=T_VIDEO, seed=12)


def _own_euler(x0, y0, dw, dt, t0, gammas, omega, drift, diffusion, control):
    """§1.4 Itô Euler in numpy: dY_k = (−γ_k Y_k + u) dt + dW, dX = b dt + σ Σ_k ω_k dY_k."""
    x, y = x0.copy(), y0.copy()
    xs, ys, kl = [x.copy()], [y.copy()], np.zeros(x0.shape[:-1])
    for n in range(dw.shape[0]):
        t = t0 + n * dt
        u = control(t, x, y) if control is not None else np.zeros_like(x)
        dy = (-gammas * y + u[..., None]) * dt + dw[n][..., None]
        x = x + drift(t, x) * dt + diffusion(t, x) * np.einsum("...k,k->...", dy, omega)
        y = y + dy
        kl = kl + 0.5 * np.sum(u**2, axis=-1) * dt
        xs.append(x.copy())
        ys.append(y.copy())
    return np.stack(xs), np.stack(ys), kl


def _drift(xp):
    return lambda t, x: -0.7 * x + 0.3 * xp.sin(3.0 * t) - 0.1 * x**3


def _diffusion(xp):
    return lambda t, x: 0.8 + 0.3 * xp.tanh(x) + 0.1 * xp.cos(t)


def _control(xp):
    return lambda t, x, y: xp.tanh(0.5 * x + 0.3 * xp.sum(y, axis=-1)) + 0.2 * xp.sin(t)


@pytest.mark.parametrize("fbm_type", ["I", "II"])
@pytest.mark.parametrize("controlled", [False, True])
def test_euler_matches_own_recursion(x64, fbm_type, controlled):
    """Exact wiring of §1.4 (drift, diagonal σ, shared dW, control, KL, t0) in float64."""
    batch, dim, steps, dt, t0 = 6, 2, 50, 0.02, 0.3
    sde = fbm.markov_sde(_drift(jnp), _diffusion(jnp), 0.3, fbm_type=fbm_type, horizon=1.0)
    assert _np(sde.gammas).shape == (5,) and _np(sde.omega).shape == (5,)
    key = jax.random.PRNGKey(3)
    k0, k1, k2 = jax.random.split(key, 3)
    y0 = sde.sample_y0(k0, (batch,), dim)
    assert y0.shape == (batch, dim, 5)
    if fbm_type == "II":
        assert np.all(_np(y0) == 0.0)
    else:
        assert np.all(np.isfinite(_np(y0))) and np.abs(_np(y0)).max() > 0
    x0 = jax.random.normal(k1, (batch, dim), dtype=jnp.float64)
    dw = jax.random.normal(k2, (steps, batch, dim), dtype=jnp.float64) * math.sqrt(dt)
    ctrl = _control(jnp) if controlled else None
    xs, ys, kl = sde.euler(x0, y0, dw, dt, t0=t0, control=ctrl)
    assert xs.shape == (steps + 1, batch, dim)
    assert ys.shape == (steps + 1, batch, dim, 5)
    assert kl.shape == (batch,)
    rx, ry, rkl = _own_euler(
        _np(x0),
        _np(y0),
        _np(dw),
        dt,
        t0,
        _np(sde.gammas),
        _np(sde.omega),
        _drift(np),
        _diffusion(np),
        _control(np) if controlled else None,
    )
    np.testing.assert_allclose(_np(xs), rx, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(_np(ys), ry, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(_np(kl), rkl, rtol=1e-10, atol=1e-14)
    if controlled:
        assert np.all(_np(kl) > 0)
    else:
        assert np.all(_np(kl) == 0.0)


def test_constant_control_kl_and_mean_shift(x64):
    """u ≡ c: KL = ½c²T·D, and with dW = 0, b = 0, σ = 1 the Euler path is the deterministic
    recursion whose limit is E[X_T] shift c Σ ω_k (1 − e^{−γ_k T})/γ_k (spec §4 test 6)."""
    c_u, dim, horizon, dt = 0.7, 3, 1.0, 1e-3
    steps = int(round(horizon / dt))
    sde = fbm.markov_sde(_zero_drift, _unit_diffusion, 0.7, fbm_type="II", horizon=horizon)
    y0 = sde.sample_y0(jax.random.PRNGKey(0), (2,), dim)
    xs, _, kl = sde.euler(
        jnp.zeros((2, dim)),
        y0,
        jnp.zeros((steps, 2, dim)),
        dt,
        control=lambda t, x, y: jnp.full_like(x, c_u),
    )
    np.testing.assert_allclose(_np(kl), 0.5 * c_u**2 * horizon * dim, rtol=1e-10)
    g, w = _np(sde.gammas), _np(sde.omega)
    exact = c_u * np.sum(w * (1 - np.exp(-g * horizon)) / g)
    np.testing.assert_allclose(_np(xs[-1]), exact, rtol=2e-2)  # O(dt γ_max) Euler bias


# ============================================================================ §4 test 5: H = ½


def test_half_type2_is_bm(x64):
    g = fbm.gamma_grid(5, 20.0)
    w = _np(fbm.optimal_omega(0.5, g, T_VIDEO, fbm_type="II"))
    np.testing.assert_allclose(w.sum(), 1.0, atol=1e-3)
    assert float(fbm.approximation_error(0.5, g, T_VIDEO, fbm_type="II")) < 1e-6


def test_half_type1_three_percent(x64):
    g = fbm.gamma_grid(5, 20.0)
    err = float(fbm.approximation_error(0.5, g, T_VIDEO, fbm_type="I"))
    np.testing.assert_allclose(err, 3.0e-2, rtol=0.1)


@pytest.mark.parametrize("controlled", [False, True])
def test_exact_bm_fallback(x64, controlled):
    """hurst = ½ with exact_bm: γ=[0], ω=[1], type II, and the K=0 latent SDE exactly."""
    sde = fbm.markov_sde(_drift(jnp), _diffusion(jnp), 0.5, exact_bm=True)
    np.testing.assert_array_equal(_np(sde.gammas), [0.0])
    np.testing.assert_array_equal(_np(sde.omega), [1.0])
    assert sde.fbm_type == "II"
    batch, dim, steps, dt, t0 = 5, 3, 40, 0.025, 0.1
    k0, k1, k2 = jax.random.split(jax.random.PRNGKey(7), 3)
    y0 = sde.sample_y0(k0, (batch,), dim)
    assert y0.shape == (batch, dim, 1) and np.all(_np(y0) == 0.0)
    x0 = jax.random.normal(k1, (batch, dim), dtype=jnp.float64)
    dw = jax.random.normal(k2, (steps, batch, dim), dtype=jnp.float64) * math.sqrt(dt)
    ctrl = _control(jnp) if controlled else None
    xs, _, kl = sde.euler(x0, y0, dw, dt, t0=t0, control=ctrl)
    # K = 0 (torchsde-style) latent SDE: x_{n+1} = x_n + b dt + σ (dW + u dt).
    b, sig, u_fn = _drift(np), _diffusion(np), _control(np)
    # The single "OU" state has γ = 0: y_{n+1} = y_n + dW + u dt (the driving BM, seen by u).
    x, y = _np(x0), np.zeros((batch, dim, 1))
    ref, ref_kl = [x], np.zeros(batch)
    dwn = _np(dw)
    for n in range(steps):
        t = t0 + n * dt
        u = u_fn(t, x, y) if controlled else 0.0 * x
        x = x + b(t, x) * dt + sig(t, x) * (dwn[n] + u * dt)
        y = y + (dwn[n] + u * dt)[..., None]
        ref_kl = ref_kl + 0.5 * np.sum(u**2, axis=-1) * dt
        ref.append(x)
    np.testing.assert_allclose(_np(xs), np.stack(ref), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_np(kl), ref_kl, rtol=1e-12, atol=1e-15)


def test_exact_bm_requires_half():
    with pytest.raises(ValueError, match="exact_bm|hurst"):
        fbm.markov_sde(_zero_drift, _unit_diffusion, 0.7, exact_bm=True)


# ============================================================================ §4 test 8: MLE


def _irregular_times():
    return np.array([0.07, 0.19, 0.2, 0.55, 0.9, 1.31, 1.32, 1.8, 2.4])


@pytest.mark.parametrize(
    "fbm_type, hurst, drift_rate, sigma, obs_sd, num_ou, gamma_max",
    [
        ("I", 0.35, 0.0, 1.0, 0.1, 5, 20.0),
        ("II", 0.35, 0.0, 1.0, 0.1, 5, 20.0),
        ("II", 0.7, 0.8, 1.3, 0.05, 5, 20.0),
        ("I", 0.2, 1.5, 0.6, 0.01, 3, 10.0),
        pytest.param("I", 0.7, 0.8, 1.3, 0.05, 5, 20.0, marks=pytest.mark.slow),
        pytest.param("II", 0.55, 0.3, 2.0, 0.02, 4, 30.0, marks=pytest.mark.slow),
    ],
)
def test_kalman_matches_dense_gp(
    x64, inf, fbm_type, hurst, drift_rate, sigma, obs_sd, num_ou, gamma_max
):
    ts = _irregular_times()
    horizon = float(ts[-1])
    g = fbm.gamma_grid(num_ou, gamma_max)
    omega = fbm.optimal_omega(hurst, g, horizon, fbm_type=fbm_type)
    cov = ref_dense_x_cov(ts, g, omega, fbm_type, drift_rate, sigma)
    if drift_rate == 0.0 and sigma == 1.0:  # the dense model is the MA process itself
        np.testing.assert_allclose(
            cov, ref_ma_cov(ts[:, None], ts[None, :], g, omega, fbm_type), rtol=1e-9, atol=1e-12
        )
        lib = _np(fbm.ma_covariance(jnp.asarray(ts[:, None]), jnp.asarray(ts), g, omega, fbm_type))
        np.testing.assert_allclose(cov, lib, rtol=1e-9, atol=1e-12)
    cov_y = cov + obs_sd**2 * np.eye(len(ts))
    rng = np.random.default_rng(5)
    ys = rng.multivariate_normal(np.zeros(len(ts)), cov_y, size=3)
    ys[2] += 0.3 * rng.standard_normal(len(ts))  # a path off the model, too
    expected = stats.multivariate_normal(np.zeros(len(ts)), cov_y).logpdf(ys)
    got = _np(
        inf.kalman_log_likelihood(
            jnp.asarray(ts),
            jnp.asarray(ys),
            obs_sd,
            hurst,
            fbm_type=fbm_type,
            num_ou=num_ou,
            gamma_max=gamma_max,
            horizon=horizon,
            drift_rate=drift_rate,
            sigma=sigma,
        )
    )
    assert got.shape == (3,)
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-8)


def _true_fbm_paths(fbm_type, hurst, ts, num_paths, obs_sd, seed):
    cov = ref_fbm_cov(ts[:, None], ts[None, :], hurst, fbm_type)
    chol = np.linalg.cholesky(cov + 1e-12 * np.eye(len(ts)))
    rng = np.random.default_rng(seed)
    paths = rng.standard_normal((num_paths, len(ts))) @ chol.T
    return paths + obs_sd * rng.standard_normal(paths.shape)


@pytest.mark.parametrize("fbm_type", ["I", "II"])
@pytest.mark.parametrize("hurst", [0.3, 0.5, 0.7])
def test_hurst_mle_recovers(inf, fbm_type, hurst):
    ts = T_VIDEO / 48 * np.arange(1, 49)
    ys = _true_fbm_paths(fbm_type, hurst, ts, 64, 0.01, seed=100 + int(100 * hurst))
    est = inf.hurst_mle(jnp.asarray(ts), jnp.asarray(ys), 0.01, fbm_type=fbm_type)
    est = float(est)
    assert abs(est - hurst) <= 0.03, (fbm_type, hurst, est)


@pytest.mark.parametrize(
    "ts, ys, obs_sd, match",
    [
        ([0.1, 0.3, 0.2, 0.4], np.zeros((2, 4)), 0.1, "ts"),
        ([0.1, 0.2, 0.2, 0.4], np.zeros((2, 4)), 0.1, "ts"),
        ([0.0, 0.2, 0.3, 0.4], np.zeros((2, 4)), 0.1, "ts"),
        ([0.1, 0.2, 0.3, 0.4], [[0.0, np.nan, 0.0, 0.0], [0.0] * 4], 0.1, "ys"),
        ([0.1, 0.2, 0.3, 0.4], np.zeros((2, 3)), 0.1, "ys"),
        ([0.1, 0.2, 0.3, 0.4], np.zeros((2, 4)), 0.0, "obs_sd"),
        ([0.1, 0.2, 0.3, 0.4], np.zeros((2, 4)), -0.1, "obs_sd"),
    ],
)
def test_hurst_mle_bad_input(inf, ts, ys, obs_sd, match):
    with pytest.raises(ValueError, match=match):
        inf.hurst_mle(np.asarray(ts, dtype=float), np.asarray(ys, dtype=float), obs_sd)


# ============================================================================ §4 test 10: grads

# (γ_max, T) with γ_max·T = 200, 200, 48.  All gradient tests use the same 19-point H grid:
# the igamma derivatives are slow to compile, and equal shapes share JAX's compilation cache.
_GRAD_CONFIGS = [(200.0 / T_VIDEO, T_VIDEO), (20.0, 10.0), (20.0, T_VIDEO)]
_GRAD_HS = np.linspace(0.05, 0.95, 19)
_FD_CONFIGS = [
    (20.0, 10.0),
    (20.0, T_VIDEO),
    pytest.param(200.0 / T_VIDEO, T_VIDEO, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("fbm_type", ["I", "II"])
@pytest.mark.parametrize(
    # float64 finiteness is also asserted by the finite-difference test below (same grid).
    "dtype",
    ["float32", pytest.param("float64", marks=pytest.mark.slow)],
)
@pytest.mark.parametrize("gamma_max, horizon", _GRAD_CONFIGS)
def test_gradients_finite(fbm_type, dtype, gamma_max, horizon):
    hs = _GRAD_HS
    with jax.enable_x64(dtype == "float64"):
        g = fbm.gamma_grid(5, gamma_max)
        h = jnp.asarray(hs, dtype=dtype)

        def omega_jvp(hh):  # forward mode: (ω, dω/dH)
            return jax.jvp(
                lambda x: fbm.optimal_omega(x, g, horizon, fbm_type=fbm_type),
                (hh,),
                (jnp.ones_like(hh),),
            )

        def err(hh):
            return fbm.approximation_error(hh, g, horizon, fbm_type=fbm_type)

        w, dw = jax.vmap(omega_jvp)(h)
        e, de = jax.vmap(jax.value_and_grad(err))(h)  # reverse mode
        assert w.dtype == dw.dtype == de.dtype == jnp.dtype(dtype)
        w, dw, e, de = _np(w), _np(dw), _np(e), _np(de)
    assert w.shape == (19, 5) and dw.shape == (19, 5) and de.shape == (19,)
    for name, arr in [("omega", w), ("d omega/dH", dw), ("error", e), ("d error/dH", de)]:
        assert np.all(np.isfinite(arr)), (name, hs[np.argwhere(~np.isfinite(arr))[:, 0]])
    assert np.all(e > -1e-3) and np.all(e < 1.0)


@pytest.mark.parametrize("fbm_type", ["I", "II"])
@pytest.mark.parametrize("gamma_max, horizon", _FD_CONFIGS)
def test_gradients_against_finite_differences(x64, fbm_type, gamma_max, horizon):
    g = fbm.gamma_grid(5, gamma_max)
    step = 1e-5
    hs = jnp.asarray(_GRAD_HS)

    def omega(hh):
        return fbm.optimal_omega(hh, g, horizon, fbm_type=fbm_type)

    def err(hh):
        return fbm.approximation_error(hh, g, horizon, fbm_type=fbm_type)

    w_fn = jax.vmap(omega)
    w = _np(w_fn(hs))
    dw = _np(jax.vmap(jax.jacfwd(omega))(hs))
    fd = (_np(w_fn(hs + step)) - _np(w_fn(hs - step))) / (2 * step)
    assert np.all(np.isfinite(w)) and np.all(np.isfinite(dw))
    scale = np.abs(fd).max(axis=1, keepdims=True)
    assert np.all(np.abs(dw - fd) <= 1e-5 * scale), np.abs(dw - fd) / scale
    # and against the derivative of the independent numpy solution (own A, quadrature b)
    if gamma_max == 20.0 and horizon == T_VIDEO:
        # (nested type-I quadrature is slow: two points suffice there)
        for h in (0.3, 0.7) if fbm_type == "I" else (0.1, 0.3, 0.5, 0.7, 0.9):
            i = int(np.argmin(np.abs(_GRAD_HS - h)))
            h = float(_GRAD_HS[i])
            fd_ref = (
                ref_solution(h + step, 5, gamma_max, horizon, fbm_type)[0]
                - ref_solution(h - step, 5, gamma_max, horizon, fbm_type)[0]
            ) / (2 * step)
            assert np.all(np.abs(dw[i] - fd_ref) <= 1e-4 * scale[i]), (h, dw[i], fd_ref)

    de = _np(jax.vmap(jax.grad(err))(hs))  # reverse mode
    e_fn = jax.vmap(err)
    assert np.all(np.isfinite(_np(e_fn(hs)))) and np.all(np.isfinite(de))
    step_e = 1e-4  # the error is ~1e-8 near H = ½ (type II): a larger step beats round-off
    fde = (_np(e_fn(hs + step_e)) - _np(e_fn(hs - step_e))) / (2 * step_e)
    np.testing.assert_allclose(de, fde, rtol=1e-4, atol=1e-6)


# ============================================================================ bad input


@pytest.mark.parametrize("hurst", [0.0, 1.0, -0.2, 1.5])
def test_bad_hurst(hurst):
    g = fbm.gamma_grid(5, 20.0)
    with pytest.raises(ValueError, match="hurst"):
        fbm.optimal_omega(hurst, g, T_VIDEO)


@pytest.mark.parametrize("fbm_type", ["III", "1", "typeI", ""])
def test_bad_fbm_type(fbm_type):
    g = fbm.gamma_grid(5, 20.0)
    with pytest.raises(ValueError, match="fbm_type"):
        fbm.optimal_omega(0.3, g, T_VIDEO, fbm_type=fbm_type)


@pytest.mark.parametrize("horizon", [0.0, -1.0])
def test_bad_horizon(horizon):
    g = fbm.gamma_grid(5, 20.0)
    with pytest.raises(ValueError, match="horizon"):
        fbm.optimal_omega(0.3, g, horizon)
