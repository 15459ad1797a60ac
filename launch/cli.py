"""The `asystem` command."""

from __future__ import annotations

import argparse
import sys

from actors.runtime import configure_logging, run

from . import cluster as cluster_cmd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asystem", description=__doc__)
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default)")
    sub = parser.add_subparsers(dest="command")
    train = sub.add_parser("train", help="run an RL training job (the main job; default)")
    train.add_argument("--config", default=None,
                       help="a YAML file, or the name of a recipe in ring/recipes (e.g. tiny, gpu)")
    train.add_argument("--resume", action="store_true", help="go on from the newest checkpoint in run.out")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. trainer.lr=1e-5 run.steps=20")
    sub.add_parser("demo", help="tour of the actor runtime with real processes")
    cluster_cmd.add_arguments(sub.add_parser(
        "cluster", help="run a training job over several nodes (launch/cluster.py)",
        description="Run a training job over several nodes (docs/cluster.md): the same command on every node."))
    agent = sub.add_parser("agent", help="run a node agent (see actors/agent.py)")
    agent.add_argument("agent_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    if args.command == "agent":
        from actors import agent as agent_main
        sys.argv = ["asystem agent", *args.agent_args]
        agent_main.main()
        return 0
    if args.command == "cluster":
        return run(cluster_cmd.launch(args))
    if args.command == "demo":
        from .demo import demo
        return run(demo())
    from .train import main as train_main
    if args.command is None:
        args.config, args.resume, args.overrides = None, False, []
    return train_main(args.config, args.resume, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
