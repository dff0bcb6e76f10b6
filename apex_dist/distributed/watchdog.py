"""A rank that stops making progress ends the run, named, within `train.watchdog_seconds`.

A rank stopped by SIGSTOP, hung on a stalled filesystem or lost with its host leaves the others
waiting in their next collective, silently, until the process group's own timeout (30 minutes
under DeepSpeed) ends them without saying which rank it was. While the training loop runs, each
rank keeps two daemon threads:

- the publisher writes `<output_dir>/.watchdog/rank_<rank:05d>.json` every `interval` (the
  timeout / BEATS_PER_TIMEOUT): {"token", "rank", "host", "pid", "beat" (a counter), "step",
  "phase", "progress_age" (seconds since the loop last marked progress), "verdict"}, and reads
  the files it watches: rank 0 reads every rank's, the other ranks read rank 0's (two reads
  per rank per interval, however large the job);
- the judge touches no file: from what the publisher saw (when each watched counter last
  changed, by this host's monotonic clock, so the clocks of different hosts are never compared)
  it decides, in this order:
  1. rank 0 published a verdict: end with its message;
  2. a watched rank's beat has not changed for the timeout: it is stopped (SIGSTOP), hung as a
     whole process, or its host is gone: named, with its last step and phase;
  3. this rank's publisher has not completed a write for the timeout: the filesystem of
     train.output_dir is stalled on this host;
  4. the loop of this rank has not marked progress for the timeout: the ranks that missed
     heartbeats are named if any; otherwise rank 0 names the ranks that are behind (lowest step,
     then oldest progress), and another rank waits two more intervals for rank 0's verdict
     before reporting its own stall.

A rank blocked in a collective cannot be interrupted, so the judge logs the verdict, writes it
to its file (rank 0's is read by every rank) and ends the process with `os._exit`
(`WATCHDOG_EXIT_CODE`); the launcher (deepspeed, torchrun) then stops the remaining ranks.

Progress marks come from the loop (`Watchdog.progress(step)`, once per step) and from the
checkpoint manager (`mark_progress(phase)` around every save), so the longest legitimate silence
is one step, one validation grid or one checkpoint save: `train.watchdog_seconds` must exceed
that (its default is explained in apex_dist/config.py). Files of an earlier run are told apart
by a token that rank 0 draws at start and broadcasts.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from apex_dist.atomic import atomic_write_text
from apex_dist.distributed.runtime import RankInfo, broadcast_integer, logger

WATCHDOG_DIRECTORY = ".watchdog"
# Exit code of a run ended by the watchdog (0 done, 1 error, 2 invalid configuration in
# launcher/run.py).
WATCHDOG_EXIT_CODE = 3
# Heartbeats per timeout: a rank is declared stopped after missing this many in a row, so one
# slow write on a loaded shared filesystem never ends a run.
BEATS_PER_TIMEOUT = 10
# Shortest interval between heartbeats (seconds), for tiny test timeouts.
MINIMUM_INTERVAL_SECONDS = 0.1
# Missed heartbeats that make a rank the suspect when the loop has stalled (rule 4).
SUSPECT_MISSED_BEATS = 3
# Extra intervals a rank other than 0 waits for rank 0's verdict before reporting its own stall.
VERDICT_GRACE_INTERVALS = 2
# Seconds the verdict write may take before the process ends anyway (the filesystem may be the
# stalled part).
VERDICT_WRITE_SECONDS = 5.0

_ACTIVE: Optional[Watchdog] = None


def mark_progress(phase: str) -> None:
    """Record progress of this rank's loop in the active watchdog (none: nothing happens)."""
    if _ACTIVE is not None:
        _ACTIVE.mark(phase)


def heartbeat_file(directory: Path, rank: int) -> Path:
    return directory / f"rank_{rank:05d}.json"


@dataclass
class PeerView:
    """What this rank knows of a watched rank: when its beat last changed (local monotonic
    time), and its last published step, phase and progress age."""

    rank: int
    last_change: float
    beat: Optional[int] = None
    step: Optional[int] = None
    phase: str = "starting"
    progress_age: Optional[float] = None
    seen: bool = False
    stopped: bool = False


def judge(
    now: float,
    timeout: float,
    interval: float,
    rank: int,
    step: int,
    phase: str,
    last_progress: float,
    last_publish: float,
    peers: list[PeerView],
    verdict: Optional[str] = None,
) -> Optional[str]:
    """The reason to end this rank now, or None (the rules of the module doc, in order)."""
    if verdict:
        return f"rank 0 ended the run: {verdict}"
    live = [peer for peer in peers if not peer.stopped]
    silent = [peer for peer in live if now - peer.last_change > timeout]
    if silent:
        return _stopped_message(silent, now)
    if now - last_publish > timeout:
        return (
            f"rank {rank} could not write its heartbeat for {now - last_publish:.0f} s: the "
            "filesystem of train.output_dir is stalled on this host"
        )
    stalled_for = now - last_progress
    if stalled_for <= timeout:
        return None
    suspects = [peer for peer in live if now - peer.last_change > SUSPECT_MISSED_BEATS * interval]
    if suspects:
        return _stopped_message(suspects, now)
    if rank != 0:
        if stalled_for <= timeout + VERDICT_GRACE_INTERVALS * interval:
            return None
        return (
            f"rank {rank} made no progress for {stalled_for:.0f} s since step {step} ({phase}); "
            "every rank it watches is alive: it, or a rank it waits for in a collective, is "
            "stuck (a stalled filesystem or data source, a deadlock)"
        )
    states = [(rank, step, phase, stalled_for)] + [
        (peer.rank, peer.step, peer.phase, peer.progress_age) for peer in live if peer.seen
    ]
    lowest = min(state[1] for state in states if state[1] is not None)
    behind = [state for state in states if state[1] == lowest]
    if len(behind) < len(states):
        named = ", ".join(f"rank {r} (step {s}, {p})" for r, s, p, _ in behind)
        return (
            f"no progress for {stalled_for:.0f} s: {named} fell behind the others (at step "
            f"{max(state[1] for state in states if state[1] is not None)}); they are alive but "
            "stuck (a stalled filesystem or data source, a deadlock)"
        )
    oldest = max(state[3] or 0.0 for state in states)
    named = ", ".join(
        f"rank {r} ({p}, {age or 0:.0f} s)"
        for r, s, p, age in states
        if (age or 0.0) >= oldest - interval
    )
    return (
        f"no rank finished step {lowest + 1} within {stalled_for:.0f} s; last progress of the "
        f"slowest: {named}; they are alive but stuck (a stalled filesystem or data source, a "
        "deadlock)"
    )


def _stopped_message(peers: list[PeerView], now: float) -> str:
    named = ", ".join(
        f"rank {peer.rank} (no heartbeat for {now - peer.last_change:.0f} s"
        + (f", last at step {peer.step}, {peer.phase})" if peer.seen else ", never seen)")
        for peer in peers
    )
    return (
        f"{named} stopped responding: a stopped (SIGSTOP) or hung process, or a lost host; "
        "the run cannot continue without it"
    )


class Watchdog:
    """Heartbeat publisher and judge of one rank (module doc). `start` returns a running
    watchdog, or a disabled one when `timeout` is 0."""

    def __init__(self, directory: Path, info: RankInfo, timeout: float, token: int):
        self.directory = directory
        self.info = info
        self.timeout = timeout
        self.interval = max(MINIMUM_INTERVAL_SECONDS, timeout / BEATS_PER_TIMEOUT)
        self.token = token
        self.enabled = timeout > 0
        now = time.monotonic()
        self.step = 0
        self.phase = "starting"
        self.last_progress = now
        self.last_publish = now
        self.beat = 0
        watched = range(info.world_size) if info.rank == 0 else [0]
        self.peers = {rank: PeerView(rank, now) for rank in watched if rank != info.rank}
        self.verdict_seen: Optional[str] = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    @classmethod
    def start(cls, output_dir: str | os.PathLike, info: RankInfo, timeout: float) -> Watchdog:
        """Collective when enabled (the token is broadcast): every rank calls it."""
        global _ACTIVE
        if timeout <= 0:
            return cls(Path(output_dir) / WATCHDOG_DIRECTORY, info, 0.0, 0)
        token = broadcast_integer(random.SystemRandom().getrandbits(62), info.device)
        watchdog = cls(Path(output_dir) / WATCHDOG_DIRECTORY, info, float(timeout), token)
        try:
            watchdog.directory.mkdir(parents=True, exist_ok=True)
            watchdog._publish()
        except OSError as error:  # not raised: the other ranks are already training; the
            # judge names the filesystem if writing keeps failing for the timeout
            logger.warning("watchdog: cannot write %s: %s", watchdog.directory, error)
        for target, name in ((watchdog._publisher, "publisher"), (watchdog._judge, "judge")):
            thread = threading.Thread(target=target, name=f"watchdog-{name}", daemon=True)
            thread.start()
            watchdog._threads.append(thread)
        _ACTIVE = watchdog
        logger.info(
            "watchdog: a rank silent or without progress for %.0f s ends the run "
            "(train.watchdog_seconds)",
            timeout,
        )
        return watchdog

    # ---- called by the training loop --------------------------------------------------------

    def progress(self, step: int, phase: str = "training") -> None:
        with self._lock:
            self.step = step
            self.phase = phase
            self.last_progress = time.monotonic()

    def mark(self, phase: str) -> None:
        with self._lock:
            self.phase = phase
            self.last_progress = time.monotonic()

    def stop(self) -> None:
        """End both threads and mark this rank's file as stopped (watchers then ignore it)."""
        global _ACTIVE
        if _ACTIVE is self:
            _ACTIVE = None
        if not self.enabled or self._stop.is_set():
            return
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.interval * 2 + 1)
        with contextlib.suppress(OSError):
            self._publish(stopped=True)

    # ---- threads ----------------------------------------------------------------------------

    def _state(self, stopped: bool = False, verdict: Optional[str] = None) -> dict[str, Any]:
        with self._lock:
            return {
                "token": self.token,
                "rank": self.info.rank,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "beat": self.beat,
                "step": self.step,
                "phase": self.phase,
                "progress_age": time.monotonic() - self.last_progress,
                "stopped": stopped,
                "verdict": verdict,
            }

    def _publish(self, stopped: bool = False, verdict: Optional[str] = None) -> None:
        path = heartbeat_file(self.directory, self.info.rank)
        atomic_write_text(path, json.dumps(self._state(stopped, verdict)), durable=False)

    def _read_peers(self) -> None:
        now = time.monotonic()
        for peer in self.peers.values():
            try:
                state = json.loads(heartbeat_file(self.directory, peer.rank).read_text())
            except (OSError, ValueError):
                continue  # not written yet (or being replaced): judged by its age
            if not isinstance(state, dict) or state.get("token") != self.token:
                continue  # a file of an earlier run
            if not peer.seen or state.get("beat") != peer.beat:
                peer.last_change = now
            peer.beat = state.get("beat")
            peer.seen = True
            peer.step = state.get("step")
            peer.phase = str(state.get("phase"))
            peer.progress_age = state.get("progress_age")
            peer.stopped = bool(state.get("stopped"))
            if peer.rank == 0 and state.get("verdict"):
                self.verdict_seen = str(state["verdict"])

    def _publisher(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with self._lock:
                    self.beat += 1
                self._publish()
                self.last_publish = time.monotonic()
                self._read_peers()
            except OSError as error:
                logger.warning("watchdog: heartbeat in %s failed: %s", self.directory, error)

    def _judge(self) -> None:
        while not self._stop.wait(self.interval / 2):
            with self._lock:
                step, phase, last_progress = self.step, self.phase, self.last_progress
            verdict = judge(
                time.monotonic(),
                self.timeout,
                self.interval,
                self.info.rank,
                step,
                phase,
                last_progress,
                self.last_publish,
                list(self.peers.values()),
                self.verdict_seen,
            )
            if verdict is not None:
                self._end(verdict)

    def _end(self, verdict: str) -> None:
        message = (
            f"watchdog (train.watchdog_seconds={self.timeout:g}): {verdict}; rank "
            f"{self.info.rank} ends the run at step {self.step} with exit code "
            f"{WATCHDOG_EXIT_CODE}"
        )
        logger.error(message)
        if self.info.rank == 0:  # rank 0 logs to stdout; the verdict belongs with the errors
            print(f"[rank 0] {message}", file=sys.stderr, flush=True)
        writer = threading.Thread(
            target=self._publish_quietly, args=(verdict,), name="watchdog-verdict", daemon=True
        )
        writer.start()
        writer.join(VERDICT_WRITE_SECONDS)
        for handler in logger.handlers:
            handler.flush()
        os._exit(WATCHDOG_EXIT_CODE)

    def _publish_quietly(self, verdict: str) -> None:
        with contextlib.suppress(OSError):
            self._publish(verdict=verdict)
