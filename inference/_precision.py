"""Local float64 for the exact (ill-conditioned) linear algebra of the inference drivers."""

import contextlib

import jax


@contextlib.contextmanager
def x64():
    """float64 inside (JAX x64 enabled locally unless it already is)."""
    if jax.config.jax_enable_x64:
        yield
    else:
        with jax.enable_x64(True):
            yield
