"""When one rank of a multi-process job dies, every other rank stops soon after, naming it.

Without this, a rank whose peer died learns it only from its next collective: at once when the
peer's kernel closed its sockets (gloo: "Connection closed by peer", naming an address, not a
rank), after the process group's timeout (30 min) when a node vanished without a word.

How (`train.liveness.PeerWatch`: two daemon threads per rank, talking through the job's own
store, the TCPStore that rank 0 hosts, or torchrun's agent):
- each rank records who it is (host, pid) and bumps a heartbeat counter every `interval_s`;
- a peer on the same machine is watched through its pidfd: its death is seen at once;
- each rank watches the heartbeat of the next rank (a ring: a few store operations per rank and
  interval, whatever the world size); one that has not moved for `timeout_s` is dead;
- the first rank to see a death writes it to the store; every rank reads it each interval;
- the store failing (rank 0's process is gone), or not answering for `timeout_s` (its machine
  is), means rank 0 died.
A rank that learns of a death prints `error: rank R (pid P on host H) died; stopping rank S`
and exits with code 1: within `timeout_s + 2 * interval_s` of the death; within `interval_s`
when the dead rank ran on the same machine, or was rank 0 and its kernel closed its sockets.
Its DataLoader workers end with it (`train.liveness.die_with`), then their forkserver.

A rank's normal end is no death: each rank marks each trainer call (fit, validate, test) done
in the store at its teardown, or when it leaves with the others (SystemExit: Requeued,
NonFiniteError), and rank 0 keeps the store up until every rank has, so neither a rank that
finishes early and exits nor rank 0 exiting last alarms anybody.
"""

from __future__ import annotations

import atexit
import os
from typing import Any

import lightning as L
import torch.distributed as dist

from train.liveness import PeerWatch


def peer_failure(err: BaseException) -> bool:
    """An error that a dead peer causes in a collective or a store operation."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        s in text for s in ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer")
    )


class RankWatchdog(L.Callback):
    """Every rank stops within `timeout_s + 2 * interval_s` of any rank's death, with one line
    naming the dead rank (see the module docstring). Active only with several ranks."""

    def __init__(self, timeout_s: float = 60.0, interval_s: float = 1.0) -> None:
        if not (timeout_s > 0 and interval_s > 0):
            raise ValueError(f"timeout_s={timeout_s}, interval_s={interval_s}: expected > 0")
        self.timeout_s, self.interval_s = timeout_s, interval_s
        self.watch: PeerWatch | None = None
        self.rank = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.watch is None and trainer.world_size > 1 and dist.is_initialized():
            store = dist.distributed_c10d._get_default_store()
            self.rank = trainer.global_rank
            self.watch = PeerWatch(
                store,
                self.rank,
                trainer.world_size,
                timeout_s=self.timeout_s,
                interval_s=self.interval_s,
                on_dead=self._stop,
                address=_address(store),
            )
            self.watch.start()
            atexit.register(self.watch.close, self.interval_s)
        if self.watch is not None:
            self.watch.begin()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.watch is not None:
            self.watch.end()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if self.watch is None:
            return
        if isinstance(exception, SystemExit | KeyboardInterrupt):
            # A stop every rank takes at the same step (Requeued, NonFiniteError) or Ctrl-C:
            # ranks leaving this way finish the trainer call, they do not die.
            self.watch.end()
        elif peer_failure(exception):
            # A collective failed because a peer died: give the watch the time it needs to
            # learn which (it then ends this process, naming it) rather than end with gloo's
            # address of the peer.
            self.watch.wait_report(self.timeout_s + 2 * self.interval_s)

    def _stop(self, text: str) -> None:
        # os.write: no lock that the main thread may hold; os._exit: the main thread may be
        # blocked in a collective that never returns. The DataLoader workers follow this
        # process (train.liveness.die_with).
        os.write(2, f"error: {text}; stopping rank {self.rank}\n".encode())
        os._exit(1)


def _address(store: Any) -> str:
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    if isinstance(store, dist.TCPStore):
        return f"{store.host}:{store.port}"
    return ""
