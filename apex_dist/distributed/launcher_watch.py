"""Ranks that do not outlive their launcher.

`deepspeed` (single node) starts `deepspeed.launcher.launch`, which starts the ranks; killing the
`deepspeed` process leaves `launch` and the ranks running, and a launcher killed with SIGKILL
forwards nothing at all. Ranks left like that go on training and never save again.

`LauncherWatch` finds, at start-up, the launcher processes among this rank's ancestors (their
command line names `deepspeed`, `torchrun` or `torch.distributed.run` / `.launch`) and checks
them once a second from a daemon thread. When one is gone, it raises the preemption flag as a
SIGTERM would: the training loop combines the flag over all ranks after the current step, every
rank saves the same step (when `checkpoint.save_on_signal`) and exits. A rank started without a
launcher (plain `python launcher/run.py`) watches nothing.

What this cannot do: a launcher that SIGKILLs its ranks after a grace period (torchrun and
DeepSpeed's `launch` wait 30 s after forwarding a signal) ends a save that takes longer; use
SIGUSR1 to the ranks for large models (docs/journeys.md).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Optional

logger = logging.getLogger("apex_dist")

# Words in a process's command line that make it a launcher of ranks.
LAUNCHER_MARKERS = (
    "deepspeed.launcher.launch",
    "bin/deepspeed",
    "bin/torchrun",
    "torch.distributed.run",
    "torch.distributed.launch",
)
# Seconds between two checks of the launcher processes (a lost launcher stops the run at the
# end of the step in progress; a second of delay is nothing next to that).
CHECK_INTERVAL_SECONDS = 1.0
# Pid of init, where the ancestor walk ends.
INIT_PID = 1


def _stat_fields(pid: int) -> Optional[list[str]]:
    """Fields of /proc/<pid>/stat after the command name, or None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def parent_of(pid: int) -> Optional[int]:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def is_running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a dead process not yet reaped)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def command_line(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def launcher_ancestors(pid: Optional[int] = None) -> dict[int, str]:
    """Launcher processes among the ancestors of `pid` (default: this process): pid -> command."""
    found = {}
    current = parent_of(os.getpid() if pid is None else pid)
    while current is not None and current > INIT_PID:
        command = command_line(current)
        if any(marker in command for marker in LAUNCHER_MARKERS):
            found[current] = command
        current = parent_of(current)
    return found


class LauncherWatch:
    """A daemon thread that raises `flag` (a PreemptionFlag) when a launcher process exits.

    Args:
        flag: has `raise_flag(reason)`.
        launchers: pid -> command line of the processes to watch.
        interval: seconds between checks.
    """

    def __init__(self, flag, launchers: dict[int, str], interval: float = CHECK_INTERVAL_SECONDS):
        self.flag = flag
        self.launchers = dict(launchers)
        self.interval = interval
        self.parent = os.getppid()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="launcher-watch", daemon=True)
        if self.launchers:
            self._thread.start()

    @classmethod
    def for_this_process(cls, flag) -> LauncherWatch:
        """Watch this rank's launchers (none when started without one); log what is watched."""
        launchers = launcher_ancestors()
        if launchers:
            watched = ", ".join(
                f"{pid} ({command.strip()[:80]})" for pid, command in launchers.items()
            )
            logger.info("watching the launcher: %s", watched)
        return cls(flag, launchers)

    def lost(self) -> Optional[str]:
        """A description of the first launcher that is gone, or None."""
        for pid, command in self.launchers.items():
            reparented = pid == self.parent and os.getppid() != pid
            if reparented or not is_running(pid):
                return f"launcher exited (pid {pid}: {command.strip()[:120]})"
        return None

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            reason = self.lost()
            if reason is not None:
                logger.warning("%s: saving and stopping after this step", reason)
                self.flag.raise_flag(reason)
                return

    def stop(self) -> None:
        self._stopped.set()
