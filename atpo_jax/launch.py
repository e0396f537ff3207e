"""Entry point: ``python -m atpo_jax.launch --config=configs/search_qa.py[:variant] [--workdir=DIR]``.

Config overrides use ml_collections syntax, e.g. ``--config.rollout.beam_size=4``. ``--resume``
continues from the newest complete checkpoint in ``<workdir>/checkpoints``.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/search_qa.py", "Path to an ml_collections config file[:variant]."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<variant>).")
_RESUME = flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in the workdir.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    # Library INFO chatter (orbax, XLA backends) at WARNING; our own progress messages at INFO.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("atpo_jax").setLevel(logging.INFO)
    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("runs", config.variant)
    from atpo_jax.train.components import ConfigError
    from atpo_jax.train.trainer import Trainer

    try:
        trainer = Trainer(config, workdir)
        results = trainer.run(resume=_RESUME.value)
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    if results:
        from atpo_jax.train.evaluation import markdown_table

        print(f"\nHeld-out evaluation after {trainer.step} steps (workdir {workdir}):")
        print(markdown_table(results))


if __name__ == "__main__":
    app.run(main)
