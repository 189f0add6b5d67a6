"""BlackJAX NUTS on a NumPyro model's potential: ``ppl.inference.NUTS``.

The model's potential energy in the unconstrained space comes from
:func:`numpyro.infer.util.initialize_model` (the same function NumPyro's own ``NUTS``
uses), so the sampler sees exactly the density NumPyro would. Each chain is warmed up by
its own :func:`blackjax.window_adaptation` (step size and diagonal mass matrix, Stan's
windows) and then sampled with :func:`blackjax.nuts`; chains are ``jax.vmap``-ed and steps
``lax.scan``-ned, all under ``jax.jit``. Draws are mapped back to the constrained space by
the returned ``postprocess_fn`` and converted by
:func:`ppl.inference.arviz.build_inference_data` -- the same code that converts SVI
results -- so ``az.compare({"svi": idata_vi, "nuts": idata_mcmc})`` lines up.

Example::

    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> from ppl.inference import NUTS
    >>> def model(x):
    ...     mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    ...     with numpyro.plate("data", x.shape[0]):
    ...         numpyro.sample("x", dist.Normal(mu, 1.0), obs=x)
    >>> x = jnp.array([0.9, 1.4, 1.1, 0.6])
    >>> nuts = NUTS(model, num_warmup=200, num_samples=100, num_chains=2)
    >>> idata = nuts.run(jax.random.PRNGKey(0), x)
    >>> idata.posterior["mu"].shape
    (2, 100)
    >>> sorted(idata.sample_stats.data_vars)  # doctest: +NORMALIZE_WHITESPACE
    ['acceptance_rate', 'diverging', 'energy', 'lp', 'n_steps', 'step_size',
     'tree_depth']
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Callable

import arviz as az
import blackjax
import jax
import jax.numpy as jnp
from blackjax.adaptation.base import get_filter_adapt_info_fn
from jax.flatten_util import ravel_pytree
from numpyro.infer.util import initialize_model

from .arviz import as_prng_key, build_inference_data, check_model_args, check_positive_int

__all__ = ["NUTS"]

# progress-bar updates over the sampling phase (when progress_bar=True)
_PROGRESS_CHUNKS = 20


class NUTS:
    """The No-U-Turn sampler of BlackJAX on a NumPyro model, several chains vmapped.

    :param model: a NumPyro model with continuous latent sites.
    :param int num_warmup: warmup (adaptation) steps per chain; 0 skips adaptation
        (step size 1 and unit mass matrix -- rarely what you want).
    :param int num_samples: draws kept per chain.
    :param int num_chains: independent chains, each with its own initial point (NumPyro's
        ``init_to_uniform``), adaptation and PRNG stream.
    :param float target_accept: target mean acceptance rate of the step-size adaptation,
        in ``(0, 1)``; raise it (0.9, 0.95) when there are divergences.
    :param int max_tree_depth: maximum number of trajectory doublings (``2**depth``
        leapfrog steps at most), during warmup and sampling.
    :param bool progress_bar: a tqdm bar (on a TTY) over warmup and sampling: warmup
        counts as one block, sampling is updated in chunks.

    After :meth:`run`:

    :ivar dict samples: ``{site: array[num_chains, num_samples, *site_shape]}``, the
        constrained draws of the latent and deterministic sites (like NumPyro's
        ``MCMC.get_samples(group_by_chain=True)``).
    :ivar idata: the ``arviz.InferenceData`` that :meth:`run` returned.
    :ivar dict adapted: ``{"step_size": [num_chains], "inverse_mass_matrix":
        [num_chains, dim]}``, the adapted kernel parameters.
    """

    def __init__(
        self,
        model: Callable,
        *,
        num_warmup: int = 500,
        num_samples: int = 500,
        num_chains: int = 4,
        target_accept: float = 0.8,
        max_tree_depth: int = 10,
        progress_bar: bool = False,
    ):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        self.model = model
        self.num_warmup = check_positive_int(num_warmup, "num_warmup", minimum=0)
        self.num_samples = check_positive_int(num_samples, "num_samples")
        self.num_chains = check_positive_int(num_chains, "num_chains")
        self.max_tree_depth = check_positive_int(max_tree_depth, "max_tree_depth")
        if (
            isinstance(target_accept, bool)
            or not isinstance(target_accept, numbers.Real)
            or not 0.0 < float(target_accept) < 1.0
        ):
            raise ValueError(f"target_accept must be a float in (0, 1), got {target_accept!r}")
        self.target_accept = float(target_accept)
        if not isinstance(progress_bar, bool):
            raise TypeError(f"progress_bar must be a bool, got {progress_bar!r}")
        self.progress_bar = progress_bar
        self.samples: dict | None = None
        self.idata: az.InferenceData | None = None
        self.adapted: dict | None = None

    def __repr__(self):
        return (
            f"NUTS({getattr(self.model, '__name__', self.model)!r}, "
            f"num_warmup={self.num_warmup}, num_samples={self.num_samples}, "
            f"num_chains={self.num_chains}, target_accept={self.target_accept}, "
            f"max_tree_depth={self.max_tree_depth})"
        )

    def run(self, rng_key, *args, **kwargs) -> az.InferenceData:
        """Warm up and sample every chain, then convert the draws.

        :param rng_key: a PRNG key (``jax.random.PRNGKey(seed)``).
        :param args: positional arguments of the model (including observed data).
        :param kwargs: keyword arguments of the model.
        :return: ``arviz.InferenceData`` with

            * ``posterior``: ``{site: [num_chains, num_samples, *site_dims]}`` for latent
              and deterministic sites, plate dims named after the plates;
            * ``posterior_predictive``, ``log_likelihood`` (pointwise), ``observed_data``;
            * ``sample_stats``: ``[num_chains, num_samples]`` arrays ``diverging``
              (bool), ``step_size``, ``tree_depth`` (trajectory doublings), ``n_steps``
              (leapfrog steps), ``acceptance_rate``, ``energy`` (Hamiltonian), ``lp``
              (log density in the unconstrained space, Jacobian included).
        :raises ValueError: non-finite data in ``args``/``kwargs`` (named), before any
            compilation; ``RuntimeError`` when no chain finds a finite initial point.
        """
        rng_key = as_prng_key(rng_key, "rng_key")
        check_model_args(self.model, args, kwargs)
        c = self.num_chains
        key_init, key_warm, key_sample, key_post = jax.random.split(rng_key, 4)

        info, potential_fn, postprocess_fn, _ = initialize_model(
            jax.random.split(key_init, c),
            self.model,
            model_args=args,
            model_kwargs=kwargs,
        )
        positions = info.z  # {site: [chains, *unconstrained_shape]}
        if not bool(jnp.all(jnp.isfinite(info.potential_energy))):
            raise RuntimeError("NUTS could not find a finite initial point for every chain")

        logdensity_fn = lambda z: -potential_fn(z)
        depth = self.max_tree_depth

        def warmup_one(key, position):
            if self.num_warmup == 0:
                state = blackjax.nuts.init(position, logdensity_fn)
                imm = jnp.ones(ravel_pytree(position)[0].shape)
                return state, jnp.asarray(1.0), imm
            warmup = blackjax.window_adaptation(
                blackjax.nuts,
                logdensity_fn,
                target_acceptance_rate=self.target_accept,
                adaptation_info_fn=get_filter_adapt_info_fn(),
                max_num_doublings=depth,
            )
            (state, parameters), _ = warmup.run(key, position, num_steps=self.num_warmup)
            return state, parameters["step_size"], parameters["inverse_mass_matrix"]

        bar = _progress(self.num_warmup + self.num_samples, self.progress_bar)
        warm = jax.jit(jax.vmap(warmup_one))
        states, step_size, imm = warm(jax.random.split(key_warm, c), positions)
        if bar is not None:
            bar.update(self.num_warmup)

        def step_one(state, key, eps, inv_mass):
            kernel = blackjax.nuts(logdensity_fn, eps, inv_mass, max_num_doublings=depth)
            state, info = kernel.step(key, state)
            stats = {
                "diverging": info.is_divergent,
                "tree_depth": info.num_trajectory_expansions,
                "n_steps": info.num_integration_steps,
                "acceptance_rate": info.acceptance_rate,
                "energy": info.energy,
                "lp": state.logdensity,
            }
            return state, (state.position, stats)

        def chunk(states, keys, eps, inv_mass):  # keys: [chains, steps, 2]
            def one_chain(state, ks, e, m):
                return jax.lax.scan(lambda s, k: step_one(s, k, e, m), state, ks)

            return jax.vmap(one_chain)(states, keys, eps, inv_mass)

        chunk = jax.jit(chunk)
        n = self.num_samples
        # equal chunks (one compilation); the few steps past n in the last one are dropped
        num_chunks = min(n, _PROGRESS_CHUNKS) if self.progress_bar else 1
        size = math.ceil(n / num_chunks)
        keys = jax.vmap(lambda k: jax.random.split(k, num_chunks * size))(
            jax.random.split(key_sample, c)
        )
        draws, stats = [], []
        for i in range(num_chunks):
            states, (z, s) = chunk(states, keys[:, i * size : (i + 1) * size], step_size, imm)
            draws.append(z)
            stats.append(s)
            if bar is not None:
                bar.update(min(size, n - i * size))
        if bar is not None:
            bar.close()
        cat = lambda *xs: jnp.concatenate(xs, axis=1)[:, :n]
        z = jax.tree.map(cat, *draws)
        sample_stats = jax.tree.map(cat, *stats)
        sample_stats["step_size"] = jnp.broadcast_to(step_size[:, None], (c, n))

        constrained = jax.jit(jax.vmap(jax.vmap(postprocess_fn)))(z)
        self.samples = constrained
        self.adapted = {"step_size": step_size, "inverse_mass_matrix": imm}
        self.idata = build_inference_data(
            self.model,
            constrained,
            args,
            kwargs,
            rng_key=key_post,
            sample_stats=sample_stats,
            attrs={
                "inference": "nuts",
                "sampler": "blackjax.nuts",
                "num_warmup": self.num_warmup,
                "target_accept": self.target_accept,
                "max_tree_depth": self.max_tree_depth,
            },
        )
        return self.idata


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="NUTS warmup+sampling", disable=not sys.stderr.isatty())
