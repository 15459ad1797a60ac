"""`asystem train [--config FILE|RECIPE] [--resume] [key=value ...]`."""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path

from actors.runtime import run

log = logging.getLogger(__name__)


def recipe_path(name: str | None) -> Path | None:
    """A YAML path as given, or the recipe of that name in ring/recipes."""
    if name is None or Path(name).exists():
        return None if name is None else Path(name)
    recipe = resources.files("ring") / "recipes" / f"{name}.yaml"
    if not recipe.is_file():
        known = sorted(p.name.removesuffix(".yaml") for p in (resources.files("ring") / "recipes").iterdir()
                       if p.name.endswith(".yaml"))
        raise SystemExit(f"asystem train: --config {name!r} is neither a file nor a recipe ({', '.join(known)})")
    return Path(str(recipe))


def main(config_name: str | None, resume: bool, overrides: list[str]) -> int:
    from asystem.config import ConfigError, load_config
    from asystem.job import train
    from asystem.train_config import TrainConfig

    try:
        config = load_config(TrainConfig, recipe_path(config_name), [*overrides, *(["run.resume=true"] if resume else [])])
    except ConfigError as exc:
        raise SystemExit(f"asystem train: {exc}") from None
    if not config.run.live and not logging.getLogger().isEnabledFor(logging.INFO):
        # Without the live display the job's progress lines are its only output.
        logging.getLogger("asystem").setLevel(logging.INFO)
    code = run(_train(train, config))
    return code


async def _train(train, config) -> int:
    summary = await train(config)
    before, after = summary.get("accuracy_before"), summary.get("accuracy_after")
    lines = [f"run directory: {summary['out']}  (metrics.jsonl, tensorboard/, curves.png, checkpoints/)"]
    if before is not None:
        lines.append(f"held-out greedy accuracy: before {before:.3f} -> after {after:.3f}")
    elif after is not None:
        lines.append(f"held-out greedy accuracy after training: {after:.3f}")
    print("\n".join(lines))
    print(json.dumps({k: summary.get(k) for k in ("steps", "accuracy_before", "accuracy_after", "train_s")}))
    return 0
