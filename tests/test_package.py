"""The wheel is the job: built from the checkout, installed into a fresh venv, it runs
`python -m train` and `python -m train.report` from a folder outside the checkout, with the
Hydra configs it ships (train/conf) and no checkout on the path.

Offline: the wheel is built with `--no-build-isolation` (setuptools from this venv), and the fresh
venv sees this venv's site-packages through a `.pth` file, so torch, Lightning and Hydra resolve
without a download while `train` itself can only come from the wheel.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.helpers import TINY

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "train"


def run(*args: str | Path, cwd: Path, env: dict[str, str], timeout: int = 600):
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def fail_text(done: subprocess.CompletedProcess) -> str:
    return f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"


def shipped_source(dest: Path) -> Path:
    """What a clean checkout builds from: pyproject.toml, README.md (the long description) and
    train/, without bytecode. Building a copy keeps the checkout free of build/ (whose stale files
    setuptools would put into the next wheel)."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(PACKAGE, dest / "train", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def deps_paths() -> list[str]:
    """This interpreter's site-packages folders (torch, Lightning, Hydra, ...)."""
    paths = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    paths += site.getsitepackages()
    if site.ENABLE_USER_SITE:
        paths.append(site.getusersitepackages())
    return list(dict.fromkeys(p for p in paths if Path(p).is_dir()))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of the checkout's current tree (built once for the module)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = shipped_source(tmp / "src")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--verbose",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-w",
        tmp / "dist",
        src,
        cwd=tmp,
        env=env,
    )
    assert done.returncode == 0, fail_text(done)
    # Data files that setuptools installs only by accident (a folder that looks like a package, a
    # glob that misses) are announced in the build log.
    log = done.stdout + done.stderr
    for warning in ("absent from the `packages` configuration", "as data is deprecated"):
        assert warning not in log, log[-4000:]
    (built,) = (tmp / "dist").glob("upweight-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory) -> Path:
    """A fresh venv (no system site-packages) with only the wheel installed in it."""
    new = tmp_path_factory.mktemp("venv") / "venv"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = run(sys.executable, "-m", "venv", "--without-pip", new, cwd=new.parent, env=env)
    assert done.returncode == 0, fail_text(done)
    python = new / "bin" / "python"
    purelib = run(
        python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=new, env=env
    )
    assert purelib.returncode == 0, fail_text(purelib)
    # Lines of a .pth are appended after the venv's own site-packages: the installed `train` wins.
    Path(purelib.stdout.strip(), "_upweight_test_deps.pth").write_text("\n".join(deps_paths()))
    done = run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--no-deps",
        "--no-index",
        "--quiet",
        wheel,
        cwd=new.parent,
        env=env,
    )
    assert done.returncode == 0, fail_text(done)
    return new


def outside_env(tmp: Path) -> dict[str, str]:
    """The environment of a user of the installed job: no PYTHONPATH, no other venv."""
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["UPWEIGHT_RUNS"] = str(tmp / "outputs")
    env["HYDRA_FULL_ERROR"] = "1"
    return env


def test_wheel_ships_every_config_and_module(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        shipped_yaml = {n for n in names if n.startswith("train/conf/") and n.endswith(".yaml")}
        checkout_yaml = {p.relative_to(ROOT).as_posix() for p in (PACKAGE / "conf").rglob("*.yaml")}
        assert "train/conf/train.yaml" in shipped_yaml
        assert checkout_yaml - shipped_yaml == set(), "configs missing from the wheel"
        assert shipped_yaml - checkout_yaml == set(), "the wheel ships configs the checkout lacks"
        for name in sorted(checkout_yaml):
            assert z.read(name) == (ROOT / name).read_bytes(), f"{name} differs in the wheel"
        modules = {
            p.relative_to(ROOT).as_posix()
            for p in PACKAGE.rglob("*.py")
            if "__pycache__" not in p.parts
        }
        assert modules - names == set(), "modules missing from the wheel"


def test_installed_wheel_runs_the_job_and_the_report(venv: Path, tmp_path: Path):
    python = venv / "bin" / "python"
    env = outside_env(tmp_path)

    where = run(python, "-c", "import train; print(train.__file__)", cwd=tmp_path, env=env)
    assert where.returncode == 0, fail_text(where)
    imported = Path(where.stdout.strip()).resolve()
    assert imported.is_relative_to(venv.resolve()), f"train imported from {imported}, not the venv"
    assert not imported.is_relative_to(ROOT), f"train imported from the checkout: {imported}"

    out = tmp_path / "run"
    overrides = [*TINY, "trainer.max_epochs=1", f"paths.output_dir={out}"]
    done = run(python, "-m", "train", *overrides, cwd=tmp_path, env=env)
    assert done.returncode == 0, fail_text(done)
    assert (out / "metrics.json").is_file(), sorted(p.name for p in out.iterdir())
    assert (out / "config.yaml").is_file(), sorted(p.name for p in out.iterdir())

    rep = tmp_path / "rep"
    done = run(python, "-m", "train.report", out, "--out", rep, cwd=tmp_path, env=env)
    assert done.returncode == 0, fail_text(done)
    assert (rep / "report.md").is_file(), sorted(p.name for p in rep.iterdir())
