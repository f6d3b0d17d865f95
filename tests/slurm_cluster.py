"""A real one-node Slurm cluster for tests: munged + slurmctld + slurmd as root, every file in
one scratch folder, on free ports (other clusters on the machine are left alone).

The Debian packages (`slurmctld slurmd slurm-client munge`, Slurm 22.05 on bookworm) are
installed when missing; `SlurmCluster.start` raises `Unavailable` (the tests skip with the
reason) when that is impossible: not root, no apt-get, no package archive. Client commands
need `cluster.env` (SLURM_CONF) in their environment.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import free_port

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


class Unavailable(RuntimeError):
    """Slurm cannot run here; the message says why."""


def install() -> None:
    """The Debian packages, when slurmctld is missing (as root, through apt-get)."""
    if shutil.which("slurmctld") and shutil.which("sbatch") and shutil.which("munged"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable("Slurm is not installed and cannot be (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise Unavailable(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")


@dataclass
class SlurmCluster:
    folder: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.folder / "slurm.conf"

    def start(self) -> SlurmCluster:
        install()
        d = self.folder
        for sub in ("munge", "state", "spool", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "munge").chmod(0o755)  # munged insists the socket folder is world-executable
        key = d / "munge" / "munge.key"
        if not key.exists():
            self._run(["mungekey", "-c", "-k", str(key)])
        host = socket.gethostname().split(".")[0]
        probe = self._run(["slurmd", "-C"]).stdout
        memory = int(re.search(r"RealMemory=(\d+)", probe).group(1)) - 256
        self.conf.write_text(
            CONF.format(
                d=d,
                host=host,
                cpus=os.cpu_count() or 1,
                memory=max(memory, 256),
                ctld_port=free_port(),
                slurmd_port=free_port(),
            )
        )
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._run(
            [
                "munged",
                f"--key-file={key}",
                f"--socket={d}/munge/munge.sock",
                f"--pid-file={d}/munge/munged.pid",
                f"--log-file={d}/log/munged.log",
                f"--seed-file={d}/munge/munged.seed",
            ]
        )
        self._run(["slurmctld", "-c"])  # -c: a clean state
        self._run(["slurmd"])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = subprocess.run(
                ["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True
            )
            if state.stdout.strip() == "idle":
                return self
            time.sleep(0.2)
        self.stop()
        raise Unavailable(f"the Slurm node never became idle; logs in {d}/log")

    def stop(self) -> None:
        for pid_file in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"):
            path = self.folder / pid_file
            if not path.exists():
                continue
            pid = int(path.read_text().strip() or 0)
            try:
                os.kill(pid, 15)
            except (ProcessLookupError, PermissionError):
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)

    def _run(self, command: list[str]) -> subprocess.CompletedProcess:
        done = subprocess.run(
            command, env=self.env or None, capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            raise Unavailable(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")
        return done

    # ----------------------------------------------------------------------------- jobs

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        done = subprocess.run(
            ["sbatch", "--parsable", *args],
            env={**self.env, **(env or {})},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, RestartCnt, ExitCode, ...); {} once gone."""
        done = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], env=self.env, capture_output=True, text=True
        )
        if done.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", done.stdout))

    def command(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60)

    def logs(self, tail: int = 4000) -> str:
        """The ends of slurmctld's and slurmd's logs: what a failed job's own output cannot say
        (a launch that failed, a node that drained)."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.folder / "log" / name
            text = path.read_text(errors="replace") if path.exists() else "(none)"
            parts.append(f"--- {path} (last {tail} characters)\n{text[-tail:]}")
        return "\n".join(parts)

    def start_requeued(self, job_id: str, timeout: float = 300) -> None:
        """Starts a requeued job now rather than after Slurm's ~120 s hold, once the clock has
        passed the second in which its last run was killed. slurmd refuses a launch whose
        credential was made in the second of the job's revocation or before it (whole seconds:
        `slurm_cred_revoked`'s `ctime <= revoked`), and the job then fails at once (FAILED,
        RunTime 0, none of its own output); the hold is what keeps that from happening."""
        self.wait(job_id, {"PENDING"}, timeout)  # killed, and requeued, before this moment
        time.sleep(1.05 - time.time() % 1)  # into the next whole second
        done = self.command("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        if done.returncode != 0:  # refused only if the job has left PENDING by itself (it runs)
            state = self.job(job_id).get("JobState")
            assert state != "PENDING", f"{done.stderr}\n{self.logs()}"

    def wait(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        """Poll until the job is in one of `states` (polling: `sbatch --wait` is slow here)."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout:.0f} s: {info}")


CONF = """\
ClusterName=upweighttest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.sock
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
