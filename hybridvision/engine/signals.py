"""SIGINT/SIGTERM: finish the current step, checkpoint, exit with the status a shell expects.

The main process turns the first signal into a flag the loop reads after every optimizer step (a
second one stops at once); DataLoader workers ignore both, so they survive until the checkpoint is
written. A run stopped this way owes the process exit status 128 + signal (130 SIGINT, 143
SIGTERM), recorded here and read back by stage scripts through :func:`pending_exit_code`.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import Any

#: exit status of the last interrupted ``fit`` in this process (0: none), see :func:`pending_exit_code`
_PENDING_EXIT = 0


def exit_code(result: dict[str, Any]) -> int:
    """Process exit status for a ``fit`` result: 0, or 128 + signal (130 SIGINT, 143 SIGTERM)."""
    signum = result.get("signal")
    return 128 + int(signum) if signum else 0


def pending_exit_code() -> int:
    """Exit status owed by this process: 128 + signal if a ``fit`` was interrupted, else 0.

    Stage scripts end with ``sys.exit(cli_main(...) or pending_exit_code())`` so an interrupted run
    exits 130 (SIGINT) / 143 (SIGTERM), as a shell or scheduler expects, and never looks successful.
    """
    return _PENDING_EXIT


def record_exit_code(code: int) -> None:
    """Remember the exit status an interrupted ``fit`` owes (a 0 leaves an earlier one in place)."""
    global _PENDING_EXIT
    if code:
        _PENDING_EXIT = code


class StopFlag:
    """SIGINT/SIGTERM → finish the current step, checkpoint, exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Route SIGINT and SIGTERM to this flag, remembering the previous handlers (main thread only)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. notebooks running in a thread)
                pass

    def restore(self) -> None:
        """Put back the handlers :meth:`install` replaced."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def name(self) -> str:
        """The received signal's name (``SIGTERM``), for messages."""
        return signal.Signals(self.signum).name if self.signum else "a signal"

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum


#: the signals a scheduler or a terminal stops a run with
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back (not lost: delivered on exit) while DataLoader workers start.

    A worker is forked with the main process's handlers and only ignores the stop signals once
    :class:`WorkerInit` runs; a signal to the process group in between (a loaded machine makes the
    window seconds long) killed the worker and failed the run instead of checkpointing it. Forked
    workers inherit the blocked mask, and :class:`WorkerInit` unblocks it after ignoring both.
    """
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks (and no fork)
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class WorkerInit:
    """``worker_init_fn`` of training loaders: workers ignore SIGINT/SIGTERM.

    A scheduler (SLURM, Kubernetes, a terminal's Ctrl-C) signals the whole process group. Left to
    the default handler, every DataLoader worker dies and the main process fails with "DataLoader
    worker ... is killed by signal" before it can checkpoint. Workers therefore ignore both; the
    main process finishes the step, saves, and shuts its workers down itself (a worker whose parent
    dies exits on its own).
    """

    def __init__(self, inner: Callable[[int], None] | None = None) -> None:
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        """Make DataLoader worker ``worker_id`` ignore SIGINT/SIGTERM, then run the wrapped init function."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # started under stop_signals_blocked(): a signal held back since the fork is dropped here
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        if self.inner is not None:
            self.inner(worker_id)
