"""``python -m jetreduce``. Agents start through here many times per run, so the ``worker``
path avoids importing the CLI stack (typer, rich) to keep process start cheap. Only the bare
``worker`` (it takes no argument) goes that way: ``worker --help`` is the CLI's."""

from __future__ import annotations

import sys


def _main() -> None:
    if sys.argv[1:] == ["worker"]:
        from jetreduce.cli.agent_main import main as agent_main

        raise SystemExit(agent_main())
    from jetreduce.cli.app import main

    main()


if __name__ == "__main__":
    _main()
