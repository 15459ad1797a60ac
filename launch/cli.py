"""The `asystem` command."""

from __future__ import annotations

import argparse
import sys

from actors.runtime import configure_logging, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asystem", description=__doc__)
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default)")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("demo", help="tour of the actor runtime with real processes (default)")
    agent = sub.add_parser("agent", help="run a node agent (see actors/agent.py)")
    agent.add_argument("agent_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    if args.command == "agent":
        from actors import agent as agent_main
        sys.argv = ["asystem agent", *args.agent_args]
        agent_main.main()
        return 0
    from .demo import demo
    return run(demo())


if __name__ == "__main__":
    sys.exit(main())
