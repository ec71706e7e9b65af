"""The one runner every command (`python -m posi_jax.X`) goes through, and the argparse types they share.

`run`: a PosiError, or an OSError (a path that cannot be read or written), becomes one `error: ...` line on stderr
and exit status 2; Ctrl-C exits 130 at once without a traceback, also while XLA compiles or runs
(`posi_jax.interrupts`); warnings print as one `warning: ...` line.

The types (`number`, `setting`, `seed`, `output_dir`, `output_file`) refuse a bad value while the arguments are
parsed, before anything loads: argparse prints the usage and one `error:` line naming the flag, and exits 2. Numbers
are checked by the rule config keys follow (`posi_jax.config.number_problem`): finite, of the declared type, in range.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Callable

from posi_jax import interrupts
from posi_jax.config import number_problem, numeric_kind
from posi_jax.errors import PosiError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def run(body: Callable[[], int | None], *, interrupted: str = "interrupted") -> int:
    """Run a command's body; its return value (None: 0) is the exit status. `interrupted` is printed on Ctrl-C (say
    what was kept and how to resume)."""
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    with interrupts.exit_on_interrupt(interrupted, EXIT_INTERRUPTED):
        try:
            return body() or 0
        except PosiError as e:
            return _error(str(e))
        except OSError as e:
            where = f"{e.filename}: " if e.filename is not None else ""
            return _error(f"{where}{e.strerror or e}")
        except KeyboardInterrupt:  # where a library took SIGINT over for a while and gave it back (asyncio does)
            print(interrupted, file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED


def _error(message: str) -> int:
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_ERROR


# ---- argparse types -----------------------------------------------------------------------------------------------
def number(kind: type = float, interval: str | None = None) -> Callable[[str], int | float]:
    """An argparse type: an int or float (`kind`) that is finite and inside `interval` ("[1, inf)", "(0, 1]")."""

    def parse(text: str):
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        problem = number_problem(value, kind, interval)
        if problem is not None:
            raise argparse.ArgumentTypeError(f"{problem}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type by it in its messages
    return parse


def setting(cls, name: str) -> Callable[[str], int | float]:
    """The argparse type of a flag that sets the numeric field `name` of the config dataclass `cls`: its declared
    type and its interval in `cls.BOUNDS`, so the flag and the field accept the same values."""
    return number(numeric_kind(cls, name), getattr(cls, "BOUNDS", {}).get(name))


positive_int = number(int, "[1, inf)")
seed = number(int, "[0, inf)")
finite_float = number(float)


def output_dir(text: str) -> str:
    """An argparse type: a folder to write into (created later if missing), not an existing file."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    return text


def output_file(text: str) -> str:
    """An argparse type: a file to write (created later if missing), not an existing folder."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    return text
