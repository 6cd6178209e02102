"""A CLI process for first-hour tests: its stderr read as it comes, so a test can wait for a
line (the process keeps running), plus small workflow files."""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType

from test_cli import JETREDUCE

from support import env_without_jetreduce

REPO = Path(__file__).resolve().parents[2]
NOWHERE = "nats://127.0.0.1:1"
"""Nothing listens on port 1: every connection is refused at once."""


class Cli:
    """A CLI process whose stderr is read as it comes, so a test can wait for a line."""

    def __init__(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [*JETREDUCE, *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env_without_jetreduce() | (env or {}),
        )
        self.err: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)
            self._lines.put(line)

    def wait_line(self, needle: str, timeout_s: float = 30) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no line with {needle!r} within {timeout_s}s:\n{self.stderr}"
            try:
                line = self._lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                assert self._reader.is_alive(), f"exited without {needle!r}:\n{self.stderr}"
                continue
            if needle in line:
                return line

    def finish(self, timeout_s: float) -> tuple[int, str]:
        """Exit code and stdout; fails the test if the process outlives ``timeout_s``."""
        try:
            out, _ = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"still running after {timeout_s}s:\n{self.stderr}") from None
        self._reader.join(5)
        return self.proc.returncode, out

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def __enter__(self) -> Cli:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def workflow_file(tmp_path: Path, steps: str = '"true"', items: int = 3) -> Path:
    wf = tmp_path / "wf.yml"
    wf.write_text(
        f'name: day-one\nmap:\n  input: "seq 1 {items}"\n  max_parallel: 2\n'
        f"  agent_template:\n    - shell: {steps}\n"
    )
    return wf
