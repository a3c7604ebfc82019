"""Ctrl-C and SIGTERM stop training at a checkpoint: the loop saves one on KeyboardInterrupt
(train/loop.py), and these handlers turn SIGTERM (`kill PID`, a machine shutting down) into
one too. For the processes a user or a shutdown signals: the command line's and
`reproduce --jobs`' workers. `train()` does not install them itself: under submitit or
torchrun the launcher owns SIGTERM (pre-emption, requeue, restarts).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stop_once(signum: int, frame: Any) -> None:
    for sig in STOP_SIGNALS:  # a second signal must not cut the save short
        signal.signal(sig, signal.SIG_IGN)
    # DataLoader workers ended by the same signal (a shutdown signals every process) must
    # not raise through torch's SIGCHLD handler during the save; this process is ending.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    raise KeyboardInterrupt


@contextlib.contextmanager
def stop_at_a_checkpoint(respect_ignored: bool = True) -> Iterator[None]:
    """Within: Ctrl-C or SIGTERM raises KeyboardInterrupt once, and both are ignored after;
    the handlers before are restored on leaving. `respect_ignored`: a signal this process
    was started ignoring (SIGINT for `cmd &` in a script) stays ignored."""
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig, handler in before.items():
        if not (respect_ignored and handler is signal.SIG_IGN):
            signal.signal(sig, _stop_once)
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
