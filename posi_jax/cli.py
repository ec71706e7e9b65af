"""The one runner every command (`python -m posi_jax.X`) goes through: a PosiError becomes one `error: ...` line on
stderr and exit status 2, Ctrl-C exit status 130 without a traceback, and warnings print as one `warning: ...` line."""
from __future__ import annotations

import sys
import warnings
from typing import Callable

from posi_jax.errors import PosiError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def run(body: Callable[[], int | None], *, interrupted: str = "interrupted") -> int:
    """Run a command's body; its return value (None: 0) is the exit status. `interrupted` is printed on Ctrl-C (say
    what was kept and how to resume)."""
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    try:
        return body() or 0
    except PosiError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
