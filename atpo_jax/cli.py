"""Command-line helpers shared by ``atpo_jax.launch`` and ``atpo_jax.evaluate``."""

from __future__ import annotations

import sys

from absl import app


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a ``--config.<key>`` override that names no setting reported as
    one line on stderr (exit status 2, like every other configuration error) instead of a
    traceback. Pass it as ``app.run(main, flags_parser=parse_flags)``."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:  # ml_collections: the key does not exist
        key = str(e).strip("'\"")
        names = [arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("--config.")]
        culprit = next((n for n in names if key in n[len("--config.") :].split(".")), None)
        print(
            f"configuration error: {culprit or 'a --config override'} names no setting "
            f"({key!r} does not exist there); the settings and their defaults are in the config "
            "file (e.g. configs/search_qa.py)",
            file=sys.stderr,
        )
        sys.exit(2)
