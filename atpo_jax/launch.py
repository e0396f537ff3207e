"""Entry point: ``python -m atpo_jax.launch --config=configs/search_qa.py[:variant]``.

Config overrides use ml_collections syntax, e.g. ``--config.rollout.beam_size=4``.
"""

from __future__ import annotations

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/search_qa.py", "Path to an ml_collections config file[:variant]."
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from atpo_jax import kernel_demo

    kernel_demo.run(_CONFIG.value)


if __name__ == "__main__":
    app.run(main)
