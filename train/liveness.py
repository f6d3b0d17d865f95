"""Whether the job's processes still run, asked without races: a DataLoader worker that ends
with its rank (`die_with`), and a rank's watch over the other ranks (`PeerWatch`, the protocol
behind `train.watchdog.RankWatchdog`).

A pidfd (Linux >= 5.3) turns readable the moment its process ends, zombie or not, and never
names a later process that reuses the pid; where pidfds are missing, `/proc` is polled instead.
Free of torch and Lightning: DataLoader workers import it (through `train.data.stream`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch.distributed as dist

POLL_S = 1.0
"""How often a process is polled where there is no pidfd."""


def open_pid(pid: int) -> int | None:
    """A pidfd of `pid`, or None where this system has none (poll `alive` instead). Raises
    ProcessLookupError when the process is already gone."""
    try:
        return os.pidfd_open(pid)
    except AttributeError:  # not Linux, or Python built without it
        return None
    except ProcessLookupError:
        raise
    except OSError as err:
        if err.errno in (errno.ENOSYS, errno.EPERM, errno.EACCES, errno.EINVAL):
            return None  # an old kernel, or a seccomp profile that forbids the call
        raise


def alive(pid: int) -> bool:
    """`pid` runs (a zombie does not: it has ended and waits for its parent to read it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc to ask: kill(0) said it exists
    return state not in ("Z", "X")


def wait_gone(pid: int, timeout_s: float | None = None) -> bool:
    """Block until `pid` ends (True) or `timeout_s` passes (False)."""
    try:
        fd = open_pid(pid)
    except ProcessLookupError:
        return True
    if fd is None:
        waited = 0.0
        while alive(pid):
            if timeout_s is not None and waited >= timeout_s:
                return False
            step = POLL_S if timeout_s is None else min(POLL_S, timeout_s - waited)
            threading.Event().wait(step)
            waited += step
        return True
    try:
        return bool(select.select([fd], [], [], timeout_s)[0])
    finally:
        os.close(fd)


def die_with(pid: int, exit_code: int = 1) -> None:
    """End this process as soon as process `pid` ends, from a daemon thread.

    For DataLoader workers: a worker started by a forkserver is the forkserver's child, so
    DataLoader's own check (has my parent changed?) never sees its rank die; and the forkserver
    itself lives on while any worker holds its pipe. With each worker watching the rank, a
    killed rank's workers end at once and the forkserver and resource tracker follow them."""

    def watch() -> None:
        wait_gone(pid)
        os._exit(exit_code)  # nothing here is worth finishing: the process it served is gone

    threading.Thread(target=watch, name=f"die-with-{pid}", daemon=True).start()


PREFIX = "upweight/watchdog/"


@dataclass(frozen=True)
class Peer:
    """Who a rank is: its pid means something only on the same `machine`."""

    host: str
    machine: str
    pid: int

    def __str__(self) -> str:
        return f"pid {self.pid} on host {self.host}"

    def encode(self) -> str:
        return f"{self.host}\n{self.machine}\n{self.pid}"

    @staticmethod
    def decode(value: bytes) -> Peer:
        host, machine, pid = value.decode().split("\n")
        return Peer(host, machine, int(pid))


def this_process() -> Peer:
    return Peer(socket.gethostname(), machine_id(), os.getpid())


def machine_id() -> str:
    """The boot id and pid namespace: two ranks compare pids only when both match (containers
    on one host can share a hostname and still see different pids)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""  # unknown: heartbeats only


def first_line(err: BaseException) -> str:
    # c10d errors carry a C++ stack trace after the first line.
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


class PeerWatch:
    """One rank's watch over the others (see `train.watchdog` for the protocol and its bounds):
    `on_dead(text)` is called once, from a watch thread, with e.g. "rank 1 (pid 7 on host h)
    died"."""

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world: int,
        *,
        timeout_s: float,
        interval_s: float,
        on_dead: Callable[[str], None],
        address: str = "",
        me: Peer | None = None,
    ) -> None:
        self.store, self.rank, self.world = store, rank, world
        self.timeout_s, self.interval_s = timeout_s, interval_s
        self.on_dead = on_dead
        self.address = address
        self.me = me or this_process()
        self.closed = threading.Event()
        self.wake = threading.Event()
        """Set for a store round now rather than after the interval: a peer's pid is gone."""
        self.peers: dict[int, Peer] = {}
        self.generation = 0
        self.active = False
        self.lock = threading.Lock()
        self.reported: str | None = None
        self.report_seen = threading.Event()
        self.suspects: set[int] = set()
        self.store_ok_at = time.monotonic()
        self.store_error: str | None = None
        self.beats: dict[int, tuple[int, float]] = {}
        """The last heartbeat count seen of a rank, and when it last changed."""

    # The main thread: at the start and end of each trainer call.

    def start(self) -> None:
        # One connection per thread: a store operation of one must never wait behind another's.
        self.store.set(f"{PREFIX}who/{self.rank}", self.me.encode())
        if self.me.machine:
            self.store.append(self._machine_key(), f"{self.rank} {self.me.pid},")
        self.io = self.store.clone()
        self.store_thread = threading.Thread(
            target=self._store_loop, name="rank-watchdog-store", daemon=True
        )
        self.store_thread.start()
        threading.Thread(target=self._pid_loop, name="rank-watchdog-pids", daemon=True).start()

    def begin(self) -> None:
        self.generation += 1
        self.active = True

    def end(self) -> None:
        """This rank finished the current trainer call; rank 0 waits (up to `timeout_s`) for
        the others to finish it too, so the store it hosts outlives every rank's watch."""
        self.store.set(self._done_key(self.generation, self.rank), "1")
        self.active = False
        if self.rank == 0:
            keys = [self._done_key(self.generation, r) for r in range(1, self.world)]
            try:
                self.store.wait(keys, timedelta(seconds=self.timeout_s))
            except RuntimeError as err:
                print(
                    f"warning: not every rank finished within {self.timeout_s:g} s of rank 0 "
                    f"({first_line(err)})",
                    file=sys.stderr,
                    flush=True,
                )

    def wait_report(self, timeout_s: float) -> str | None:
        self.report_seen.wait(timeout_s)
        return self.reported

    def close(self, wait_s: float = 0.0) -> None:
        """Stop watching and beating; wait up to `wait_s` for the store thread to leave (at
        exit: no thread should be inside the store's C++ code while the interpreter ends)."""
        self.closed.set()
        self.wake.set()
        if wait_s > 0:
            self.store_thread.join(wait_s)

    # The watch threads.

    def _store_loop(self) -> None:
        """Heartbeats, the successor's heartbeat, deaths others saw, suspects to confirm."""
        while not self.closed.is_set():
            self.wake.clear()
            try:
                self._store_round()
            except RuntimeError as err:  # the connection to rank 0's store broke
                self.store_error = first_line(err)
                if self.active:
                    self._declare(0, self._store_gone())
                return
            self.store_ok_at = time.monotonic()
            self.wake.wait(self.interval_s)

    def _store_round(self) -> None:
        io = self.io
        io.add(f"{PREFIX}beat/{self.rank}", 1)
        if self.me.machine:  # the ranks on this machine so far
            for entry in io.get(self._machine_key()).decode().split(",")[:-1]:
                r, pid = map(int, entry.split())
                if r != self.rank:
                    with self.lock:
                        self.peers.setdefault(r, Peer(self.me.host, self.me.machine, pid))
        if self.rank and 0 not in self.peers and io.check([f"{PREFIX}who/0"]):
            # Learned ahead: the store that would tell goes with rank 0.
            self._learn(0)
        if not self.active:  # a death the others saw waits for this rank's next trainer call
            return
        if io.check([f"{PREFIX}dead"]):
            self._report(io.get(f"{PREFIX}dead").decode())
        generation = self.generation
        with self.lock:
            suspects = sorted(self.suspects)
        for r in suspects:
            if not io.check([self._done_key(generation, r)]):
                self._declare(r, "died", publish=True)
        successor = self._successor(generation)
        if successor is None:
            return
        if successor not in self.peers and io.check([f"{PREFIX}who/{successor}"]):
            self._learn(successor)
        count = io.add(f"{PREFIX}beat/{successor}", 0)
        now = time.monotonic()
        seen, since = self.beats.get(successor, (-1, now))
        if count != seen:
            self.beats[successor] = (count, now)
        elif now - since > self.timeout_s and not io.check([self._done_key(generation, successor)]):
            self._declare(successor, f"has not answered for {self.timeout_s:g} s", publish=True)

    def _learn(self, rank: int) -> None:
        peer = Peer.decode(self.io.get(f"{PREFIX}who/{rank}"))
        with self.lock:
            self.peers[rank] = peer

    def _successor(self, generation: int) -> int | None:
        """The next rank in the ring that has not finished this trainer call."""
        for step in range(1, self.world):
            r = (self.rank + step) % self.world
            if not self.io.check([self._done_key(generation, r)]):
                return r
        return None

    def _pid_loop(self) -> None:
        """Peers on this machine, watched through pidfds; and the store's health."""
        fds: dict[int, int] = {}  # rank -> pidfd
        polled: dict[int, int] = {}  # rank -> pid, where there is no pidfd
        gone: set[int] = set()
        try:
            while not self.closed.is_set():
                with self.lock:
                    here = self.me.machine
                    local = {r: p.pid for r, p in self.peers.items() if here and p.machine == here}
                for r in local.keys() - fds.keys() - polled.keys() - gone:
                    try:
                        fd = open_pid(local[r])
                    except ProcessLookupError:
                        gone.add(r)
                        continue
                    if fd is None:
                        polled[r] = local[r]
                    else:
                        fds[r] = fd
                ready = set(select.select(list(fds.values()), [], [], self.interval_s)[0])
                gone |= {r for r, fd in fds.items() if fd in ready}
                gone |= {r for r, pid in polled.items() if not alive(pid)}
                for r in gone & fds.keys():
                    os.close(fds.pop(r))
                for r in gone & polled.keys():
                    del polled[r]
                if self.active:
                    self._judge(gone)
        finally:
            for fd in fds.values():
                os.close(fd)

    def _judge(self, gone: set[int]) -> None:
        if 0 in gone:
            # Rank 0 ends only after every rank finished the trainer call we are still in.
            self._declare(0, "died")
        with self.lock:  # the store thread asks whether they had finished first
            grew = not gone - {0} <= self.suspects
            self.suspects = gone - {0}
        if grew:
            self.wake.set()
        if self.store_error is not None:
            self._declare(0, self._store_gone())
        elif time.monotonic() - self.store_ok_at > self.timeout_s + self.interval_s:
            self._declare(0, f"has not answered for {self.timeout_s:g} s ({self._store()})")

    def _store(self) -> str:
        return f"the job's store{f' at {self.address}' if self.address else ''}"

    def _store_gone(self) -> str:
        return f"died ({self._store()} is gone: {self.store_error})"

    def _declare(self, rank: int, what: str, publish: bool = False) -> None:
        with self.lock:
            peer = self.peers.get(rank)
        text = f"rank {rank} ({peer or 'pid unknown'}) {what}"
        if publish:  # the others learn it from the store within an interval
            with contextlib.suppress(RuntimeError):
                self.io.compare_set(f"{PREFIX}dead", "", text)
        self._report(text)

    def _report(self, text: str) -> None:
        with self.lock:
            if self.reported is not None or self.closed.is_set():
                return
            self.reported = text
        self.report_seen.set()
        self.on_dead(text)

    def _done_key(self, generation: int, rank: int) -> str:
        return f"{PREFIX}done/{generation}/{rank}"

    def _machine_key(self) -> str:
        return f"{PREFIX}machine/{self.me.machine}"
