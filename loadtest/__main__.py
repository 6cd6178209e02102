"""``python -m loadtest SCENARIO... [--quick]``: run scenarios, print one JSON object per
scenario on stdout, and rewrite the table in ``docs/performance.md``.

Scenarios run one after another (never concurrently: they would share the 2 cores they
measure). A scenario that fails or times out is reported as an error row and the rest still
run; the exit status is 1 if any scenario errored, 0 otherwise (a missed target is a figure,
not an error — the table says pass/miss).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from loadtest.common import Run
from loadtest.registry import SCENARIOS
from loadtest.report import Result, save_and_render
from loadtest.summary import render_issues


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="jetreduce load tests (issue 7). Each scenario starts its own fresh "
        "nats-server and services process, measures raw ceilings in the same run, prints one "
        "JSON object on stdout; the tables (issues 17 and 18's rows, and every scenario's) go "
        "into docs/performance.md.",
    )
    p.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"one or more of: {', '.join(SCENARIOS)}, or 'all' (default: all)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="sizes shrunk 10-50x: the whole set in a few minutes (CI smoke)",
    )
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="record py-spy raw stacks of the services process and its agents "
        "into DIR/<scenario>.txt (needs the bench extra)",
    )
    p.add_argument(
        "--no-report",
        action="store_true",
        help="do not touch docs/performance.md or loadtest/results/ (the issue tables of "
        "this run's scenarios go to stderr instead)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = args.scenarios or ["all"]
    if "all" in names:
        names = list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        _parser().error(f"unknown scenario(s): {', '.join(unknown)}")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    run = Run(quick=args.quick, profile_dir=args.profile)
    results: list[Result] = []
    for name in names:
        print(f"# {name}{' (quick)' if args.quick else ''} ...", file=sys.stderr, flush=True)
        start = time.monotonic()
        try:
            result = SCENARIOS[name](run)
        except Exception as exc:
            traceback.print_exc()
            result = Result(
                name=name,
                figure=None,
                unit="",
                ceiling=None,
                ceiling_what="",
                ratio=None,
                target="",
                passed=None,
                wall_s=round(time.monotonic() - start, 1),
                params={},
                quick=args.quick,
                error=f"{type(exc).__name__}: {exc}",
            )
        print(result.to_json(), flush=True)
        results.append(result)
    if not args.no_report:
        save_and_render(results)
    else:  # this invocation's rows of the issue tables, for the reader of the terminal
        print(render_issues({r.name: asdict(r) for r in results}), file=sys.stderr)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
