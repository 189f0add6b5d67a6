"""The model registry read by the ``ppl`` command.

A *family* is one module of ``ppl.models`` that builds its NumPyro program from its own
embedded data and registers it once, at import time::

    from ppl.models.registry import ModelSpec, Problem, register

    def build(opts):                        # opts: argparse.Namespace (common + own options)
        x = load_default(opts.size)
        return Problem(model, guide, args=(x,), data={"x": x})

    register(ModelSpec(
        name="my-model", description="one line for `ppl list`", build=build,
        options=lambda group: group.add_argument("--size", type=int, default=10, help="..."),
        plot=lambda fit, problem, out_dir: make_figure(fit.idata, problem.data),
        inference=("svi", "nuts"), default_steps=2000, default_lr=1e-2,
    ))

and adds its module name to ``ppl.models.FAMILIES`` (or exposes it through the
``ppl.models`` entry-point group from another distribution). The command's code never
changes for a new family.

Inference: ``"svi"`` (``ppl.inference.SVI`` + optax + an objective of :data:`OBJECTIVES`)
and ``"nuts"`` (``ppl.inference.NUTS``) are built in. A family with its own algorithm (EM,
CEP + Kalman, ...) names it in ``inference`` and passes a *driver* for it in ``drivers``:
``driver(spec, problem, opts, rng_key) -> FitResult``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BUILTIN_DRIVERS",
    "FitResult",
    "ModelSpec",
    "OBJECTIVES",
    "Problem",
    "make_objective",
    "register",
    "unregister",
    "fit_nuts",
    "fit_svi",
]


# ---------------------------------------------------------------------------------------
# Objectives selectable with `ppl fit ... --objective NAME --particles K [--alpha A]`.
# ONE table: name -> (factory(opts) -> objective, one-line help). Extend it here.
# ---------------------------------------------------------------------------------------


def _elbo(opts):
    from ppl import objectives

    k = opts.particles
    if k == 1:
        return objectives.elbo

    def elbo_particles(model, guide, *args, **kwargs):
        import ppl

        with ppl.particles(k):
            return objectives.elbo(model, guide, *args, **kwargs)

    return elbo_particles


def _iwelbo(opts):
    from ppl import objectives

    return objectives.iwelbo(opts.particles)


def _renyi(opts):
    from ppl import objectives

    return objectives.renyi(opts.alpha, opts.particles)


def _rws(opts):
    from ppl import objectives

    k = opts.particles
    return {"model": objectives.wake_theta(k), "guide": objectives.wake_phi(k)}


OBJECTIVES: dict[str, tuple[Callable[[argparse.Namespace], Any], str]] = {
    "elbo": (_elbo, "ELBO, averaged over K particles"),
    "iwelbo": (_iwelbo, "importance-weighted ELBO with K particles"),
    "renyi": (_renyi, "Renyi-alpha bound with K particles (--alpha, default 0.5)"),
    "rws": (_rws, "reweighted wake-sleep: wake-theta(K) for the model, wake-phi(K) for the guide"),
}


def make_objective(name: str, opts: argparse.Namespace):
    """The objective named ``name`` built from ``opts`` (``particles``, ``alpha``, ...)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r} (choose from {', '.join(OBJECTIVES)})")
    return OBJECTIVES[name][0](opts)


# ---------------------------------------------------------------------------------------
# What a family provides and what a driver returns.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """A model on its data, as built by ``ModelSpec.build(opts)``.

    :param model: the NumPyro model, called ``model(*args, **kwargs)``.
    :param guide: the guide (same signature), or ``None`` for NUTS/custom drivers only.
    :param args, kwargs: the arguments the drivers fit with.
    :param eval_args, eval_kwargs: arguments for drawing the posterior written to
        ``posterior.nc`` after SVI (default: ``args``/``kwargs``), e.g. the held-out split
        without minibatching.
    :param data: anything the family's plot needs (test set, ground truth, ...).
    """

    model: Callable
    guide: Callable | None = None
    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    eval_args: tuple | None = None
    eval_kwargs: Mapping[str, Any] | None = None
    data: Any = None


@dataclass
class FitResult:
    """What a driver returns to the command.

    :param idata: the ``arviz.InferenceData`` written to ``posterior.nc``.
    :param losses: the per-step value that was *minimised* (``-objective`` for SVI), or
        ``None`` (NUTS: ``loss.png`` then shows a trace plot).
    :param final_objective: the objective at the end, reported in ``summary.txt``.
    :param params: learned parameters (constrained), if any.
    :param result: the driver's own result object (e.g. ``SVIRunResult``).
    :param loss_label: y-axis label of ``loss.png``.
    :param notes: extra ``"key: value"`` lines for ``summary.txt``.
    """

    idata: Any
    losses: Any = None
    final_objective: float | None = None
    params: Mapping[str, Any] | None = None
    result: Any = None
    loss_label: str = "loss (-objective)"
    notes: list[str] = field(default_factory=list)


Driver = Callable[["ModelSpec", Problem, argparse.Namespace, Any], FitResult]
PlotFn = Callable[[FitResult, Problem, Path], Any]


@dataclass(frozen=True)
class ModelSpec:
    """One fittable model of the ``ppl`` command.

    :param name: the name used in ``ppl fit NAME`` (lowercase, dashes).
    :param description: one line, shown by ``ppl list`` and ``ppl fit --help``.
    :param build: ``build(opts) -> Problem``: load the embedded default data (no network)
        and return the model, guide and arguments. Called after validation.
    :param plot: ``plot(fit, problem, out_dir) -> Figure | {stem: Figure}``: the model's
        own plot(s); the command saves each atomically as ``<stem>.png`` (a single figure
        as ``<name>.png``) and closes it. ``None``: no model plot.
    :param options: ``options(group)`` adds the family's argparse arguments to the
        ``ppl fit NAME`` parser (``group`` is an argument group named after the model).
    :param validate: ``validate(opts)`` raises ``ValueError`` for bad option values; runs
        before any data is loaded or anything compiled (exit status 2).
    :param inference: the ``--inference`` choices, the first being the default; built in:
        ``"svi"``, ``"nuts"``; others need a driver in ``drivers``.
    :param drivers: ``{name: driver}``, ``driver(spec, problem, opts, rng_key) -> FitResult``;
        also overrides a built-in one.
    :param objectives: the ``--objective`` names this model accepts (default: all of
        :data:`OBJECTIVES`); ``default_objective`` is used when none is given.
    :param optimizer: ``optimizer(lr) -> optax.GradientTransformation`` (default Adam).
    :param summary: ``summary(idata) -> pandas.DataFrame`` for ``summary.txt`` (default
        ``arviz.summary`` of the whole posterior).
    :param details: longer text for ``ppl fit NAME --help``.
    """

    name: str
    description: str
    build: Callable[[argparse.Namespace], Problem]
    plot: PlotFn | None = None
    options: Callable[[Any], None] | None = None
    validate: Callable[[argparse.Namespace], None] | None = None
    inference: tuple[str, ...] = ("svi",)
    drivers: Mapping[str, Driver] = field(default_factory=dict)
    objectives: Sequence[str] | None = None
    default_objective: str = "elbo"
    default_steps: int = 2000
    default_lr: float = 1e-2
    default_particles: int = 1
    default_num_samples: int = 1000
    default_num_warmup: int = 500
    default_num_chains: int = 4
    optimizer: Callable[[float], Any] | None = None
    summary: Callable[[Any], Any] | None = None
    details: str | None = None

    def __post_init__(self):
        if not self.name or self.name != self.name.strip() or " " in self.name:
            raise ValueError(f"ModelSpec.name must be a non-empty word, got {self.name!r}")
        if "\n" in self.description:
            raise ValueError(f"ModelSpec.description of {self.name!r} must be one line")
        if not callable(self.build):
            raise TypeError(f"ModelSpec.build of {self.name!r} must be callable")
        if not self.inference:
            raise ValueError(f"ModelSpec.inference of {self.name!r} must name at least one")
        for inf in self.inference:
            if inf not in BUILTIN_DRIVERS and inf not in self.drivers:
                raise ValueError(
                    f"ModelSpec {self.name!r}: inference {inf!r} is neither built in "
                    f"({', '.join(BUILTIN_DRIVERS)}) nor given in drivers"
                )
        for obj in self.allowed_objectives:
            if obj not in OBJECTIVES:
                raise ValueError(f"ModelSpec {self.name!r}: unknown objective {obj!r}")
        if self.uses("svi") and self.default_objective not in self.allowed_objectives:
            raise ValueError(
                f"ModelSpec {self.name!r}: default_objective {self.default_objective!r} "
                "is not among its objectives"
            )
        for attr in ("default_steps", "default_particles", "default_num_samples"):
            if int(getattr(self, attr)) < 1:
                raise ValueError(f"ModelSpec {self.name!r}: {attr} must be >= 1")
        if not (self.default_lr > 0 and math.isfinite(self.default_lr)):
            raise ValueError(f"ModelSpec {self.name!r}: default_lr must be > 0")

    @property
    def allowed_objectives(self) -> tuple[str, ...]:
        return tuple(OBJECTIVES) if self.objectives is None else tuple(self.objectives)

    def uses(self, inference: str) -> bool:
        return inference in self.inference

    def driver(self, inference: str) -> Driver:
        if inference not in self.inference:
            raise ValueError(
                f"model {self.name!r} does not support --inference {inference} "
                f"(supported: {', '.join(self.inference)})"
            )
        return self.drivers.get(inference) or BUILTIN_DRIVERS[inference]


# ---------------------------------------------------------------------------------------
# Built-in drivers.
# ---------------------------------------------------------------------------------------


def fit_svi(spec: ModelSpec, problem: Problem, opts: argparse.Namespace, rng_key) -> FitResult:
    """``ppl.inference.SVI`` with ``spec.optimizer(opts.lr)`` on ``opts.objective``, then
    ``opts.num_samples`` guide draws converted by ``ppl.inference.to_inference_data``."""
    import jax
    import numpy as np
    import optax

    from ppl.inference import SVI, to_inference_data

    if problem.guide is None:
        raise ValueError(f"model {spec.name!r} has no guide, so it cannot be fitted by SVI")
    objective = make_objective(opts.objective, opts)
    optimizer = (spec.optimizer or optax.adam)(opts.lr)
    svi = SVI(problem.model, problem.guide, optimizer, objective)
    key_fit, key_post = jax.random.split(rng_key)
    result = svi.run(
        key_fit, opts.steps, *problem.args, progress_bar=opts.progress, **dict(problem.kwargs)
    )
    eval_args = problem.args if problem.eval_args is None else problem.eval_args
    eval_kwargs = problem.kwargs if problem.eval_kwargs is None else problem.eval_kwargs
    idata = to_inference_data(
        result,
        problem.model,
        problem.guide,
        *eval_args,
        num_samples=opts.num_samples,
        key=key_post,
        **dict(eval_kwargs),
    )
    losses = np.asarray(result.losses, dtype=np.float64).reshape(-1)
    tail = losses[-max(1, len(losses) // 10) :]
    notes = []
    if len(losses):
        notes.append(f"objective at last step: {-losses[-1]:.6g}")
    return FitResult(
        idata=idata,
        losses=losses,
        final_objective=float(-np.mean(tail)) if len(losses) else None,
        params=dict(result.params),
        result=result,
        loss_label=f"-{opts.objective} (minimised)",
        notes=notes,
    )


def fit_nuts(spec: ModelSpec, problem: Problem, opts: argparse.Namespace, rng_key) -> FitResult:
    """``ppl.inference.NUTS`` (BlackJAX) on the model's potential."""
    from ppl.inference import NUTS

    nuts = NUTS(
        problem.model,
        num_warmup=opts.num_warmup,
        num_samples=opts.num_samples,
        num_chains=opts.num_chains,
        progress_bar=bool(getattr(opts, "progress", False)),
    )
    idata = nuts.run(rng_key, *problem.args, **dict(problem.kwargs))
    notes = []
    stats = getattr(idata, "sample_stats", None)
    if stats is not None:
        for name in ("diverging", "divergences"):
            if name in stats:
                notes.append(f"divergent transitions: {int(stats[name].values.sum())}")
                break
    return FitResult(idata=idata, result=nuts, notes=notes)


BUILTIN_DRIVERS: dict[str, Driver] = {"svi": fit_svi, "nuts": fit_nuts}


# ---------------------------------------------------------------------------------------
# The table of registered models.
# ---------------------------------------------------------------------------------------

_SPECS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec, *, replace: bool = False) -> ModelSpec:
    """Register ``spec`` under ``spec.name``; a second registration of the same name is
    an error unless ``replace=True`` (re-importing the same module is harmless)."""
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"register() expects a ModelSpec, got {type(spec).__name__}")
    old = _SPECS.get(spec.name)
    if old is not None and not replace and _origin(old) != _origin(spec):
        raise ValueError(f"a model named {spec.name!r} is already registered ({_origin(old)})")
    _SPECS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a registered model (tests, interactive use)."""
    _SPECS.pop(name, None)


def _origin(spec: ModelSpec) -> str:
    build = spec.build
    return f"{getattr(build, '__module__', '?')}.{getattr(build, '__qualname__', '?')}"
