"""Model families with their embedded default data, and the registry of the ``ppl`` command.

Installed as ``ppl.models``. Each family is one module that ends with
``register(ModelSpec(...))`` (see :mod:`ppl.models.registry`); to make it fittable by
``ppl fit NAME``, add the module's name to :data:`FAMILIES` below. Packages outside this
repository can do the same through the ``ppl.models`` entry-point group (the value names a
module that registers on import)::

    [project.entry-points."ppl.models"]
    mymodel = "mypackage.mymodel"

Family modules are imported lazily, on the first :func:`available` / :func:`get` (or on
attribute access such as ``ppl.models.vae``), so ``import ppl.models`` stays cheap and a
family that fails to import does not take the others down (see :func:`failed`).
"""

from __future__ import annotations

import importlib
import traceback

from ppl.models.registry import _SPECS as _specs
from ppl.models.registry import (
    OBJECTIVES,
    FitResult,
    ModelSpec,
    Problem,
    make_objective,
    register,
    unregister,
)

#: The family modules of ``ppl.models``, in ``ppl list`` order: one line per family.
FAMILIES: tuple[str, ...] = (
    "vae",
    "eight_schools",
    "krosbl",
    "nngp",
    "fbm_sde",
    "funbat",
    "bnn",
)

ENTRY_POINT_GROUP = "ppl.models"

__all__ = [
    "FAMILIES",
    "OBJECTIVES",
    "FitResult",
    "ModelSpec",
    "Problem",
    "available",
    "failed",
    "get",
    "load_families",
    "make_objective",
    "register",
    "specs",
    "unregister",
]

_loaded = False
_failed: dict[str, str] = {}


def load_families() -> None:
    """Import every family module (and entry point) once so that each registers itself."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    targets = [(f"{__name__}.{mod}", mod) for mod in FAMILIES]
    try:
        from importlib.metadata import entry_points

        targets += [(ep.value, ep.name) for ep in entry_points(group=ENTRY_POINT_GROUP)]
    except Exception:  # pragma: no cover - broken metadata must not break the command
        pass
    for module, label in targets:
        try:
            importlib.import_module(module.split(":")[0])
        except Exception as exc:  # a broken family must not break the others
            line = traceback.format_exception_only(type(exc), exc)[-1].strip()
            _failed[label] = line


def specs() -> list[ModelSpec]:
    """The registered :class:`ModelSpec` objects: those of :data:`FAMILIES` in its order,
    then the others in registration order."""
    load_families()
    rank = {f"{__name__}.{mod}": i for i, mod in enumerate(FAMILIES)}
    order = sorted(
        enumerate(_specs.values()),
        key=lambda item: (rank.get(getattr(item[1].build, "__module__", None), len(rank)), item[0]),
    )
    return [spec for _, spec in order]


def available() -> list[str]:
    """Names of the registered models, in :func:`specs` order."""
    return [spec.name for spec in specs()]


def get(name: str) -> ModelSpec:
    """The :class:`ModelSpec` registered as ``name`` (``KeyError`` naming the choices)."""
    load_families()
    try:
        return _specs[name]
    except KeyError:
        raise KeyError(
            f"unknown model {name!r} (available: {', '.join(_specs) or 'none'})"
        ) from None


def failed() -> dict[str, str]:
    """``{family: one-line error}`` for family modules that failed to import."""
    load_families()
    return dict(_failed)


def __getattr__(name):
    if name in FAMILIES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
