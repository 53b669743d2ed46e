"""SIGTERM and SIGINT: stop at a clean point, keep the work, say how to go on.

SLURM and Kubernetes send SIGTERM before they preempt a job (and SIGKILL after a grace
period); Ctrl-C sends SIGINT. The command line installs handlers for both (``handling()``,
never at import) that behave like this:

- Inside ``deferred()`` -- the stages of a training run, the teacher-cache loop -- the
  first signal only sets a flag. The loop polls it (``requested()``, or ``agreed()``, which
  every process of a launch calls at the same point), finishes what it is doing (the
  optimizer step in progress; the batches already computed), saves, and raises
  ``Interrupted`` saying what it kept. A signal that came in too late for the loop to see
  is raised when the block ends.
- Outside it (loading models, compressing, evaluating), the first signal raises
  ``Interrupted`` at once, like Ctrl-C's ``KeyboardInterrupt`` (which it subclasses).
  Every file is written atomically, so nothing half-written is ever used.
- A second signal ends the process at once (the default action, restored by the first):
  what it cuts short is a temporary file or an unmarked checkpoint, which no later run
  uses. At a terminal, the first signal says so.

Exit codes are the shell's: 128 + the signal number (143 for SIGTERM, 130 for SIGINT).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_installed = False
_received: int | None = None  # the first signal of this process, or None
_seen = False  # the loop has seen (and acts on) the signal
_depth = 0  # nesting of deferred() blocks


class Interrupted(KeyboardInterrupt):
    """The process stops because of a SIGTERM or SIGINT.

    Attributes:
        signum: the signal.
        what: what was done before stopping (``"at global step 5; checkpoint ... written"``),
            or "" when it stopped at once.
        checkpoint: the training checkpoint to resume from, or None.
        everywhere: every process of a launch raises the same (only one needs to say so).
    """

    def __init__(self, signum: int, what: str = "", checkpoint=None, everywhere: bool = False):
        super().__init__(f"interrupted by {signal_name(signum)}" + (f" {what}" if what else ""))
        self.signum, self.what, self.checkpoint, self.everywhere = int(signum), what, checkpoint, everywhere

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_code(signum: int) -> int:
    return 128 + int(signum)


def _handle(signum, frame):
    global _received
    if _received is not None:  # pragma: no cover - a second signal finds the default action (below)
        os._exit(exit_code(signum))
    _received = signum
    # A second signal takes the default action: the process ends at once, even inside a long
    # C call (a forward pass, a collective) where no Python handler could run.
    for s in SIGNALS:
        signal.signal(s, signal.SIG_DFL)
    if _depth and os.isatty(2):  # someone at a terminal pressed Ctrl-C: say that it is being handled
        os.write(2, f"\n{signal_name(signum)}: stopping at the next clean point and saving; "
                    f"press Ctrl-C (or send {signal_name(signum)}) again to stop at once\n".encode())
    if _depth == 0:
        raise Interrupted(signum)


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Handle SIGTERM and SIGINT as described above for the duration of the block (a command),
    then restore the previous handlers. A no-op outside the main thread, where Python
    cannot install handlers."""
    global _installed, _received, _seen, _depth
    if threading.current_thread() is not threading.main_thread() or _installed:
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _received, _seen, _depth = None, False, 0
    for s in SIGNALS:
        signal.signal(s, _handle)
    _installed = True
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _installed = False
        _received, _seen, _depth = None, False, 0


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block whose code polls ``requested()`` / ``agreed()`` and stops at a clean point
    itself: a first signal inside only sets the flag. A signal the block did not act on
    is raised as ``Interrupted`` when it ends."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    if _depth == 0 and _received is not None and not _seen:
        raise Interrupted(_received)


def requested() -> int | None:
    """The signal this process received (and is now acting on), or None."""
    global _seen
    if _received is not None:
        _seen = True
    return _received


def agreed(device=None) -> int | None:
    """``requested()`` agreed by every process of a launch (the largest signal number of all;
    one scalar all-reduce when a process group is set up -- every process must call this
    at the same point, e.g. at the end of each optimizer step). None when none received one,
    and always None when no handlers are installed (a library caller keeps its own)."""
    global _seen
    if not _installed:
        return None
    mine = requested() or 0
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        import torch  # loaded: torch.distributed is

        t = torch.tensor([mine], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        mine = int(t.item())
    if mine:
        _seen = True
    return mine or None


def end_progress_bars() -> None:
    """Close the open tqdm bars (which ends their line), so that a message printed next is not
    glued to one, nor redrawn over."""
    tqdm = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot close must not hide the message
            pass


def fresh_line() -> str:
    """What to print before a message so that it starts a line of its own: open tqdm bars are
    closed (``end_progress_bars``); a bar closed earlier may have left the cursor after its
    text (in a log file, ``\\r`` does not start a line), so a terminal gets the line cleared
    and anything else a newline."""
    end_progress_bars()
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        tty = False
    return "\r\x1b[K" if tty else "\n"
