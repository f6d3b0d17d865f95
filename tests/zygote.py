"""Entry points run as real processes without paying their imports each time.

`python -m train` spends ~10 s of CPU importing Lightning before it reads its first argument,
which is the whole cost of a job that exits at once on a bad input. A `Zygote` is one
interpreter that imports the entry points once and then forks a child per job: the child runs
the module as `python -m <module> <args>` would (`runpy`, `sys.argv`, its own working folder,
environment, stdout and stderr), and its exit status is the one the parent reads (a non-zero
code for `sys.exit("error: ...")`, the traceback and 1 for an uncaught exception, minus the
signal's number for a signal), as from `run_job`. Tests that check the entry point's import
itself (a fresh interpreter) or start several processes (DDP) keep `run_job`.

Protocol (this file is also the server, `python -m tests.zygote MODULE...`): one JSON request a
line on stdin; for each, a waiter process forks the job, writes "<id> <pid>" on stdout, waits
for the job and writes "<id> <pid> <code>".
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import importlib
import itertools
import json
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path

from tests.helpers import ENV, ROOT, assert_succeeded, job_env


class Finished(subprocess.CompletedProcess):
    """A job's end, as `run_job` gives it, and its process id (with `new_session`, also the id
    of its session: `helpers.session_processes(pid)` lists what it left running)."""

    def __init__(self, args: list[str], pid: int, code: int, stdout: str, stderr: str) -> None:
        super().__init__(args, code, stdout, stderr)
        self.pid = pid


class Zygote:
    """The server for `modules`, started with the environment `run_job` gives a job; `run`
    is thread-safe (jobs run side by side); `close` ends it and anything it left running."""

    def __init__(self, *modules: str) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.zygote", *modules],
            cwd=ROOT,
            env={**os.environ, **ENV},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its jobs are in its process group: `close` ends them all
        )
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._pids: dict[int, int] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._process.stdout:
            number, pid, *code = (int(x) for x in line.split())
            with self._lock:
                if code:
                    self._pids.pop(number, None)
                    self._pending.pop(number).set_result((pid, code[0]))
                else:
                    self._pids[number] = pid
        with self._lock:  # the server died: nothing more will come
            for future in self._pending.values():
                future.set_exception(RuntimeError("the zygote process ended"))
            self._pending.clear()

    def run(
        self,
        *args: str,
        cwd: Path,
        module: str = "train",
        env: Mapping[str, str] | None = None,
        timeout: float = 600,
        check: bool = False,
        merge_stderr: bool = False,
        new_session: bool = False,
    ) -> Finished:
        """`python -m <module> <args>` in `cwd`, as `run_job` runs it (same environment), to
        its end: its exit code, stdout and stderr (in stdout with `merge_stderr`). `check=True`
        asserts exit code 0, showing the output's end otherwise. `new_session`: the job in a
        session of its own (id: its pid), as `start_job` puts it. Past `timeout` the job (its
        process group with `new_session`) is killed and `subprocess.TimeoutExpired` raised."""
        with tempfile.TemporaryDirectory() as folder:
            out, err = Path(folder) / "stdout", Path(folder) / "stderr"
            future: Future = Future()
            with self._lock:
                number = next(self._ids)
                self._pending[number] = future
                request = {
                    "id": number,
                    "module": module,
                    "args": list(args),
                    "cwd": str(cwd),
                    "env": job_env(cwd, env),
                    "stdout": str(out),
                    "stderr": str(out if merge_stderr else err),
                    "new_session": new_session,
                }
                self._process.stdin.write(json.dumps(request) + "\n")
                self._process.stdin.flush()
            try:
                pid, code = future.result(timeout=timeout)
            except concurrent.futures.TimeoutError:  # not the builtin before Python 3.11
                self._kill(number, new_session)
                raise subprocess.TimeoutExpired(
                    [sys.executable, "-m", module, *args],
                    timeout,
                    out.read_text() if out.exists() else "",
                ) from None
            done = Finished(
                [sys.executable, "-m", module, *args],
                pid,
                code,
                out.read_text(),
                "" if merge_stderr else err.read_text(),
            )
        if check:
            assert_succeeded(done)
        return done

    def _kill(self, number: int, group: bool) -> None:
        deadline = time.monotonic() + 30  # a request still queued gets its pid soon
        while time.monotonic() < deadline:
            with self._lock:
                pid = self._pids.get(number)
                if pid is None and number not in self._pending:
                    return  # it ended meanwhile
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    (os.killpg if group else os.kill)(pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    def close(self) -> None:
        self._process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=10)  # ends once it has reaped its waiters
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGKILL)  # whatever a job left running
        self._process.wait(timeout=30)
        self._process.stdout.close()


def _exit_code(exit: SystemExit) -> int:
    """What the interpreter makes of an uncaught SystemExit."""
    if exit.code is None:
        return 0
    if isinstance(exit.code, int):
        return exit.code
    print(exit.code, file=sys.stderr)
    return 1


def _job(request: dict) -> None:
    """The child: becomes `python -m <module> <args>`; never returns."""
    code = 1
    try:
        if request["new_session"]:
            os.setsid()
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        with open(os.devnull) as null:
            os.dup2(null.fileno(), 0)
        with open(request["stdout"], "w") as handle:
            os.dup2(handle.fileno(), 1)
        if request["stderr"] == request["stdout"]:
            os.dup2(1, 2)
        else:
            with open(request["stderr"], "w") as handle:
                os.dup2(handle.fileno(), 2)
        sys.path[0] = os.getcwd()  # as `python -m` puts it
        sys.argv = [request["module"], *request["args"]]
        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exit:
            code = _exit_code(exit)
        except BaseException:
            traceback.print_exc()
            code = 1
        try:
            atexit._run_exitfuncs()
        except SystemExit as exit:
            code = _exit_code(exit)
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _reap(*_: object) -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _serve(modules: list[str]) -> None:
    for module in modules:
        importlib.import_module(module)
    # Each waiter waits for its job, and this server for the waiters as they end: every job's
    # CPU time adds up to this process's children's, as a subprocess's would to pytest's.
    signal.signal(signal.SIGCHLD, _reap)
    for line in sys.stdin:
        request = json.loads(line)
        if os.fork():
            continue
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the job's own children are waited for
        pid = os.fork()
        if pid == 0:
            _job(request)
        os.write(1, f"{request['id']} {pid}\n".encode())
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        os.write(1, f"{request['id']} {pid} {code}\n".encode())
        os._exit(0)


if __name__ == "__main__":
    _serve(sys.argv[1:])
