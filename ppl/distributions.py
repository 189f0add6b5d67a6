"""Scale priors for scale mixtures of Gaussian processes (spec ``nngp.md`` §1.2).

Each is a NumPyro distribution on a *variance* ``s = σ² > 0``, usable as the ``prior`` of
:func:`ppl.inference.nngp.fit` or inside a NumPyro model:

* :class:`BurrXII` -- scipy's ``burr12(c, d)``: density ``c·d·s^{c−1}(1+s^c)^{−d−1}``, tail
  index ``κ = c·d`` (moments of the mixture exist below order ``2κ``);
* :class:`HalfCauchyScale` -- ``σ ~ HalfCauchy(scale)`` written on ``σ² = s`` (``κ = ½``).

The other priors of the spec are NumPyro's own: ``dist.InverseGamma(a, b)`` (Student-t
process, closed form), ``dist.LogNormal(loc, scale)`` (a log-normal prior on ``σ²``:
``ln σ² ~ N(loc, scale²)``; pass it as is, it is *not* a prior on σ) and ``dist.Delta(v)``
(the plain NNGP with ``σ² = v``).

Example::

    >>> import jax, jax.numpy as jnp
    >>> from ppl.distributions import BurrXII, HalfCauchyScale
    >>> p = BurrXII(2.0, 2.0)
    >>> round(float(jnp.exp(p.log_prob(1.0))), 6)      # 2·2·1·2^{-3}
    0.5
    >>> p.sample(jax.random.PRNGKey(0), (3,)).shape
    (3,)
    >>> round(float(HalfCauchyScale(1.0).cdf(1.0)), 6)  # P(σ ≤ 1) for a unit half-Cauchy
    0.5
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.special import gammaln
from numpyro.distributions import constraints
from numpyro.distributions.distribution import Distribution
from numpyro.distributions.util import promote_shapes, validate_sample

__all__ = ["BurrXII", "HalfCauchyScale"]


def _check_positive(**values):
    """ValueError naming the argument when a concrete value is not (finite and) > 0."""
    for name, v in values.items():
        if isinstance(v, jax.core.Tracer):
            continue
        arr = np.asarray(v, dtype=float)
        if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
            raise ValueError(f"{name} must be finite and > 0, got {v!r}")


class BurrXII(Distribution):
    """Burr type XII on ``s > 0`` (scipy ``burr12(c, d)``, scale 1).

    ``p(s) = c·d·s^{c−1}(1+s^c)^{−d−1}``, CDF ``1 − (1+s^c)^{−d}``; sampled by inverse CDF.
    Tail ``p(s) ~ s^{−cd−1}``: used as a heavy-tailed prior on the readout variance σ²
    (the reference code's second prior, spec §1.2).

    :param c: shape ``> 0`` (batch shape broadcasts with ``d``).
    :param d: shape ``> 0``.

    Example::

        >>> import jax.numpy as jnp
        >>> from ppl.distributions import BurrXII
        >>> round(float(BurrXII(2.0, 2.0).cdf(1.0)), 6)    # 1 − 2^{-2}
        0.75
        >>> round(float(BurrXII(2.0, 2.0).mean), 6)         # d·B(d − 1/c, 1 + 1/c)
        0.785398
    """

    arg_constraints = {"c": constraints.positive, "d": constraints.positive}
    support = constraints.positive
    reparametrized_params = ["c", "d"]

    def __init__(self, c, d, *, validate_args=None):
        _check_positive(c=c, d=d)
        self.c, self.d = promote_shapes(c, d)
        batch_shape = lax.broadcast_shapes(jnp.shape(c), jnp.shape(d))
        super().__init__(batch_shape=batch_shape, validate_args=validate_args)

    @validate_sample
    def log_prob(self, value):
        c, d = self.c, self.d
        return jnp.log(c) + jnp.log(d) + (c - 1) * jnp.log(value) - (d + 1) * jnp.log1p(value**c)

    def cdf(self, value):
        return -jnp.expm1(-self.d * jnp.log1p(value**self.c))

    def icdf(self, q):
        # (1 − q)^{−1/d} − 1, then the 1/c-th power
        return jnp.expm1(-jnp.log1p(-q) / self.d) ** (1.0 / self.c)

    def sample(self, key, sample_shape=()):
        shape = sample_shape + self.batch_shape
        u = jax.random.uniform(key, shape, minval=0.0, maxval=1.0)
        return self.icdf(u)

    @property
    def mean(self):
        c, d = self.c, self.d
        m = d * jnp.exp(gammaln(d - 1 / c) + gammaln(1 + 1 / c) - gammaln(d + 1))
        return jnp.where(c * d > 1, m, jnp.inf)

    @property
    def variance(self):
        c, d = self.c, self.d
        m2 = d * jnp.exp(gammaln(d - 2 / c) + gammaln(1 + 2 / c) - gammaln(d + 1))
        return jnp.where(c * d > 2, m2 - self.mean**2, jnp.inf)


class HalfCauchyScale(Distribution):
    """The variance ``s = σ²`` of a half-Cauchy ``σ ~ HalfCauchy(scale)``.

    ``p(s) = 1 / (π·γ·√s·(1 + s/γ²))`` with ``γ = scale``; tail ``s^{−3/2}`` (``κ = ½``: the
    scale mixture has no finite mean). Use it when the prior is stated on σ (Gelman's
    half-Cauchy) but the model is parameterised by the variance.

    :param scale: the half-Cauchy scale ``γ > 0`` of σ.

    Example::

        >>> import jax
        >>> from ppl.distributions import HalfCauchyScale
        >>> p = HalfCauchyScale(2.0)
        >>> round(float(p.icdf(0.5)), 6)                    # median of σ² is γ²
        4.0
        >>> bool((p.sample(jax.random.PRNGKey(1), (5,)) > 0).all())
        True
    """

    arg_constraints = {"scale": constraints.positive}
    support = constraints.positive
    reparametrized_params = ["scale"]

    def __init__(self, scale=1.0, *, validate_args=None):
        _check_positive(scale=scale)
        self.scale = scale
        super().__init__(batch_shape=jnp.shape(scale), validate_args=validate_args)

    @validate_sample
    def log_prob(self, value):
        g = self.scale
        return -math.log(math.pi) - jnp.log(g) - 0.5 * jnp.log(value) - jnp.log1p(value / g**2)

    def cdf(self, value):
        return (2 / math.pi) * jnp.arctan(jnp.sqrt(value) / self.scale)

    def icdf(self, q):
        return (self.scale * jnp.tan(0.5 * math.pi * q)) ** 2

    def sample(self, key, sample_shape=()):
        shape = sample_shape + self.batch_shape
        sigma = self.scale * jnp.abs(jax.random.cauchy(key, shape))
        return sigma**2

    @property
    def mean(self):
        return jnp.full(self.batch_shape, jnp.inf)

    @property
    def variance(self):
        return jnp.full(self.batch_shape, jnp.inf)
