"""A server restarted in about a second instead of several: its next process is started ahead and primed.

Killing and restarting `armt serve` a hundred times is the crash harness's job, and most of a start is importing
torch, transformers and the service (seconds on 2 busy cores), none of which touches the data directory or the
port. `PrimedServer` therefore starts the next processes while the current one still serves (two, so each has two
kill points' time): they import those modules, then block on their stdin. `start()` releases the oldest, and only
then does it run the real `armt serve` (same command line, same environment), which loads the model, rebuilds the
session index from the data directory and binds the port. What a restart after a crash does is unchanged; only the
imports happened earlier.

    python -m bench.primed serve --port P --model M    # what PrimedServer runs: waits for a line, then `armt ...`
"""
from __future__ import annotations

import subprocess
import sys
from collections import deque

from bench.common import Server


class PrimedServer(Server):
    """`depth` next processes wait primed; each restart releases the oldest and primes another."""

    def __init__(self, *args, depth: int = 2, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cmd = [sys.executable, "-m", "bench.primed", *self.cmd[3:]]  # in place of `-m service.cli`
        self.depth = depth
        self.waiting: deque[subprocess.Popen] = deque()

    def start(self, timeout: float = 60.0) -> "PrimedServer":
        self._prime()
        self.proc = self.waiting.popleft()
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.close()
        self.wait_healthy(timeout)
        self._prime()
        return self

    def _prime(self) -> None:
        while len(self.waiting) < self.depth:
            self.waiting.append(self.spawn(stdin=subprocess.PIPE))

    def stop(self) -> None:
        super().stop()
        while self.waiting:
            proc = self.waiting.popleft()
            proc.kill()
            proc.wait(10)


def main() -> None:
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import uvicorn  # noqa: F401

    import model  # noqa: F401
    import service.http.app  # noqa: F401
    from service.cli import app

    if sys.stdin.readline():  # end of input without a line: the harness went away, never serve
        app(sys.argv[1:])


if __name__ == "__main__":
    main()
