"""Packaging: one distribution, import name ``ppl``, nothing generic at top level.

The repo's folders ``inference/``, ``models/``, ``transforms/`` must install as
``ppl.inference``, ``ppl.models``, ``ppl.transforms`` -- from a wheel into a fresh venv and
in the editable install -- and never as top-level ``inference``/``models``/``transforms``.
Also checks that the README, ``.ci/run`` and ``constraints.txt`` agree with each other.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("inference", "models", "transforms")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PACKAGE_DIR: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]

# Imports ppl and its subpackages, then tries the generic top-level names; prints JSON.
PROBE = """
import importlib, json, sys
import ppl, ppl.inference, ppl.models, ppl.transforms
out = {"files": {m: sys.modules[m].__file__
                 for m in ("ppl", "ppl.inference", "ppl.models", "ppl.transforms")},
       "generic": {}}
for name in ("inference", "models", "transforms"):
    try:
        mod = importlib.import_module(name)
    except ModuleNotFoundError as e:
        out["generic"][name] = None if e.name == name else f"ModuleNotFoundError({e.name!r})"
    else:
        out["generic"][name] = getattr(mod, "__file__", None) or repr(mod)
print(json.dumps(out))
"""


def _env() -> dict[str, str]:
    """The current environment minus anything that would leak the repo onto sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{cmd} failed ({proc.returncode})\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    return proc


def _probe(python: str, cwd: Path) -> dict:
    out = _run([python, "-c", PROBE], cwd=cwd).stdout
    return json.loads(out.strip().splitlines()[-1])


def _assert_no_generic_modules(generic: dict) -> None:
    for name in SUBPACKAGES:
        assert generic[name] is None, (
            f"`import {name}` should raise ModuleNotFoundError, got {generic[name]}"
        )


def _source_files() -> dict[str, Path]:
    """Every file the mapped package folders hold, keyed by its expected path in the wheel."""
    files = {}
    for pkg, folder in PACKAGE_DIR.items():
        root = REPO / folder
        for path in root.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                rel = path.relative_to(root).as_posix()
                files["/".join(pkg.split(".")) + "/" + rel] = path
    return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel from a clean copy of the sources.

    Building in the repo itself would write ``build/`` and ``*.egg-info`` into the shared
    working tree, and a stale ``build/lib`` can carry deleted modules into the wheel.
    """
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "setup.py", "setup.cfg", "MANIFEST.in"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    for lic in REPO.glob("LICENSE*"):
        shutil.copy2(lic, src / lic.name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in set(PACKAGE_DIR.values()):
        shutil.copytree(REPO / folder, src / folder, ignore=ignore)
    dist = tmp_path_factory.mktemp("dist")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            ".",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
        ],
        cwd=src,
    )
    (whl,) = dist.glob("ppl-*.whl")
    return whl


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> Path:
    """A new venv holding only the wheel; third-party deps come from this env via a .pth."""
    venv = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=venv)
    python = venv / "bin" / "python"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(wheel),
        ],
        cwd=venv,
    )
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        cwd=venv,
    ).stdout.strip()
    # Plain path lines: they only extend sys.path. The editable install's own .pth (an
    # `import` line that installs its finder) is not processed for directories added this way.
    deps = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"]])
    (Path(purelib) / "_ppl_test_deps.pth").write_text("".join(f"{p}\n" for p in deps))
    return venv


def test_wheel_contents(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        eps = zf.read(entry_points).decode()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        tops = zf.read(top_level).decode().split()
    for sub in SUBPACKAGES:
        assert f"ppl/{sub}/__init__.py" in names
        assert not any(n.startswith(f"{sub}/") for n in names), f"top-level {sub}/ in wheel"
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"ppl"}
    assert tops == ["ppl"]
    # Every file of the mapped folders ships (catches subpackages missing from
    # `packages` and data files missing from package-data).
    missing = sorted(set(_source_files()) - names)
    assert not missing, f"not in the wheel: {missing}"
    # The console script is declared.
    assert re.search(r"^\[console_scripts\]\s*$", eps, re.M), eps
    assert re.search(r"^ppl\s*=\s*ppl\.cli:main\s*$", eps, re.M), eps


def test_wheel_installs_and_imports_in_fresh_venv(fresh_venv, tmp_path):
    cwd = tmp_path / "neutral"
    cwd.mkdir()
    out = _probe(str(fresh_venv / "bin" / "python"), cwd)
    root = fresh_venv.resolve()
    for mod, file in out["files"].items():
        assert Path(file).resolve().is_relative_to(root), f"{mod} imported from {file}"
    assert out["files"]["ppl.inference"].endswith("ppl/inference/__init__.py")
    assert out["files"]["ppl.models"].endswith("ppl/models/__init__.py")
    assert out["files"]["ppl.transforms"].endswith("ppl/transforms/__init__.py")
    _assert_no_generic_modules(out["generic"])
    assert (fresh_venv / "bin" / "ppl").is_file(), "console script `ppl` not installed"


def test_editable_install_maps_subpackages(tmp_path):
    # Look in site-packages only: `python -m pytest` puts the repo (and any stale
    # ppl.egg-info there) on sys.path.
    dist = next(metadata.distributions(name="ppl", path=site.getsitepackages()), None)
    if dist is None:
        pytest.skip("ppl is not installed in this environment")
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    if not direct_url.get("dir_info", {}).get("editable"):
        pytest.skip("ppl is not installed editable in this environment")
    out = _probe(sys.executable, tmp_path)
    assert Path(out["files"]["ppl"]).resolve() == REPO / "ppl" / "__init__.py"
    for sub in SUBPACKAGES:
        got = Path(out["files"][f"ppl.{sub}"]).resolve()
        assert got == REPO / sub / "__init__.py", f"ppl.{sub} imported from {got}"
    _assert_no_generic_modules(out["generic"])


def _readme_commands() -> list[str]:
    """The one-line shell commands in README.md's fenced ```bash blocks, in order."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip()]


def test_readme_opens_with_main_job_and_test_commands():
    main_job, tests = _readme_commands()[:2]
    for cmd in (main_job, tests):
        assert cmd.startswith("python3 -m venv .venv && ")
        assert "-c constraints.txt" in cmd
    assert main_job.endswith("ppl fit vae --out runs/vae")
    assert "'.[dev]'" in tests and tests.endswith("python -m pytest -q")


def test_ci_runs_exactly_the_readme_test_command():
    ci = REPO / ".ci" / "run"
    assert os.access(ci, os.X_OK), ".ci/run is not executable"
    lines = [ln.strip() for ln in ci.read_text().splitlines()]
    code = [ln for ln in lines if ln and not ln.startswith("#")]
    assert "set -euo pipefail" in code
    # Last command, so the script's status is pytest's (5 = nothing collected fails too).
    assert code[-1] == _readme_commands()[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_constraints_pin_the_installed_dependency_closure():
    from packaging.requirements import Requirement

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s=;]+)", line)
            assert m, f"not an exact pin: {line!r}"
            pins[_norm(m[1])] = m[2]
    assert "ppl" not in pins

    # Walk ppl[dev]'s requirements and the build requirements (from pyproject; the wheel
    # test builds without isolation) through the installed distributions.
    project = PYPROJECT["project"]
    visited: set[tuple[str, frozenset]] = set()
    build = PYPROJECT["build-system"]["requires"]
    todo = [(None, [*project["dependencies"], *project["optional-dependencies"]["dev"], *build])]
    while todo:
        extras, reqs = todo.pop()
        for req in map(Requirement, reqs):
            envs = [{"extra": e} for e in extras or {""}]
            if req.marker and not any(req.marker.evaluate(env) for env in envs):
                continue
            node = (_norm(req.name), frozenset(req.extras))
            if node not in visited:
                visited.add(node)
                try:
                    requires = metadata.distribution(req.name).requires or []
                except metadata.PackageNotFoundError:
                    pytest.fail(f"{req.name} (needed by ppl[dev]) is not installed")
                todo.append((node[1], requires))
    seen = {name for name, _ in visited}
    wrong = {
        n: (pins.get(n), metadata.version(n))
        for n in sorted(seen)
        if pins.get(n) != metadata.version(n)
    }
    assert not wrong, f"constraints.txt vs installed (pin, installed): {wrong}"
