"""`python -m posi_jax.serve` in a child process for the scripts (load_serve.py, screenshot_playground.py): started on
a free loopback port, ready when it prints its URL, stopped with SIGTERM (it drains) when the block ends."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class ServeProcess:
    def __init__(self, args: list[str], *, log_path: str | Path, start_timeout_s: float = 1800.0):
        self.args, self.log_path, self.start_timeout_s = list(args), Path(log_path), start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> "ServeProcess":
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "posi_jax.serve", "--host", "127.0.0.1", "--port", "0",
                                      *self.args], stdout=subprocess.PIPE, stderr=self._log, text=True, env=env,
                                     cwd=REPO)
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(self.start_timeout_s)
        if not line or not line[0].startswith("serving on "):
            self.__exit__(None, None, None)
            tail = self.log_path.read_text()[-1500:]
            raise RuntimeError(f"the server did not start (log {self.log_path}):\n{tail}")
        self.url = line[0].split()[-1]
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
