"""Ctrl-C in the commands: exit status 130 at once, from any point, with no traceback and no crash.

Python's own handling raises KeyboardInterrupt in the main thread. Under JAX that goes wrong two ways. jaxlib checks
for signals while XLA compiles, and raises KeyboardInterrupt out of `compile_and_load` while XLA's compiler threads
go on; unwinding to the top then ends the process normally, and the C++ teardown at exit runs under those threads
and segfaults (exit 139, measured on `generate` and `sft` during compilation). Elsewhere the interrupt can land in a
Python callback that C++ invoked (jaxlib's GC callback), where it is swallowed ("Exception ignored in ...") and the
run goes on to exit 0.

So while `exit_on_interrupt` is active, SIGINT raises nothing: the Python-level handler is a no-op, and Python's
C-level handler writes the signal number to a pipe (`signal.set_wakeup_fd`). A watcher thread blocked on that pipe
wakes even while the main thread sits in a long compilation, flushes stdout, prints the message and ends the process
with `os._exit`: no unwinding, no finalizers, no teardown racing XLA's threads. What the commands write is already
safe against a sudden exit (JSONL lines are flushed as written, orbax commits a checkpoint by renaming its folder),
and `deferred()` lets a block finish first: the exit waits for a checkpoint being written.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

_critical = threading.RLock()  # held by `deferred()` blocks; the exit takes it first


@contextlib.contextmanager
def deferred():
    """Run the block to its end even if Ctrl-C arrives meanwhile: the exit waits for it (a checkpoint being written
    completes, rather than leaving only the previous one)."""
    with _critical:
        yield


def _ignore(signum, frame):  # the watcher thread acts; nothing may be raised into the main thread
    pass


@contextlib.contextmanager
def exit_on_interrupt(message: str, code: int):
    """While active, Ctrl-C prints `message` on stderr and exits with status `code` (see the module docstring).
    Does nothing outside the main thread or where SIGINT is ignored (a job started with `nohup` or `&`)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) in (
            signal.SIG_IGN, None):
        yield
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous_handler = signal.signal(signal.SIGINT, _ignore)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    watcher = threading.Thread(target=_watch, args=(read_fd, message, code), name="posi-jax-sigint", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGINT, previous_handler)
        os.close(write_fd)  # the watcher reads end-of-file and returns
        watcher.join()


def _watch(read_fd: int, message: str, code: int) -> None:
    try:
        while True:
            data = os.read(read_fd, 64)  # one byte per signal caught, its number
            if not data:
                return
            if signal.SIGINT in data:
                _exit_now(message, code)
    finally:
        os.close(read_fd)


def _exit_now(message: str, code: int) -> None:
    # Flush from a helper thread with a time limit: stdout may be a pipe nobody reads, and a flush must not keep a
    # Ctrl-C from ending the process.
    flusher = threading.Thread(target=_flush, daemon=True)
    flusher.start()
    flusher.join(2.0)
    try:
        os.write(2, f"\n{message}\n".encode())
    except OSError:
        pass
    with _critical:
        os._exit(code)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
