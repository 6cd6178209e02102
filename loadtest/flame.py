"""``python -m loadtest.flame FILE [--top N] [--match TEXT]``: summarise py-spy raw stacks.

``python -m loadtest SCENARIO --profile DIR`` records collapsed stacks (``py-spy record
--format raw --subprocesses``: one ``frame;frame;… count`` line per distinct stack, only
samples where a thread was running, not idle). Flame graphs are for eyes; this prints the
numbers a write-up needs: samples per process kind (services vs agents), and the top
functions by *self* time (where the CPU is) and by *inclusive* time (which loop it is in),
each as a share of that process kind's samples.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from pathlib import Path

__all__ = ["summarise"]

_PROC = re.compile(r'^process \d+:"(?P<cmd>[^"]*)"$')


def _kind(frames: list[str]) -> str:
    """Which process a stack belongs to. py-spy names a child by the command line it read
    when it first saw it, which for a forked agent can still be the parent's (read before
    ``exec``), so nesting decides: a stack under a second ``process`` frame, or running
    ``agent_main``, is an agent's (the services process has no other Python children)."""
    procs = [m.group("cmd") for f in frames if (m := _PROC.match(f))]
    if len(procs) > 1 or any("agent_main" in f for f in frames):
        return "agent"
    if procs and "services_host" in procs[0]:
        return "services"
    return procs[0].split()[-1] if procs and procs[0] else "?"


def _short(frame: str) -> str:
    """``func (path/file.py:123)`` → ``func (file.py)``: lines vary, functions don't."""
    return re.sub(r"\(([^():]*/)?([^/():]+):\d+\)", r"(\2)", frame)


def summarise(path: Path, top: int = 15, match: str | None = None) -> str:
    self_t: dict[str, Counter[str]] = defaultdict(Counter)
    incl: dict[str, Counter[str]] = defaultdict(Counter)
    totals: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        kind = _kind(frames)
        code = [_short(f) for f in frames if not f.startswith(("process ", "thread "))]
        if not code:
            continue
        totals[kind] += count
        self_t[kind][code[-1]] += count
        for frame in set(code):
            incl[kind][frame] += count
    out = [f"{path}: {sum(totals.values())} samples (running threads only)"]
    for kind, total in totals.most_common():
        out.append(f"\n== {kind}: {total} samples ({total / sum(totals.values()):.0%})")
        for title, table in (("self", self_t[kind]), ("inclusive", incl[kind])):
            out.append(f"-- top {title}")
            shown = 0
            for frame, n in table.most_common():
                if match and match not in frame:
                    continue
                out.append(f"{n / total:6.1%}  {frame}")
                shown += 1
                if shown >= top:
                    break
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.flame", description=__doc__)
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--match", default=None, help="only frames containing this text")
    args = parser.parse_args()
    print(summarise(args.file, args.top, args.match))


if __name__ == "__main__":
    main()
