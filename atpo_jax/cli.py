"""Command-line helpers shared by ``atpo_jax.launch`` and ``atpo_jax.evaluate``."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys

from absl import app


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a ``--config.<key>`` override that names no setting reported as
    one line on stderr (exit status 2, like every other configuration error) instead of a
    traceback. Pass it as ``app.run(main, flags_parser=parse_flags)``."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:  # ml_collections: the key does not exist
        print(f"configuration error: {unknown_override_message(e, argv)}", file=sys.stderr)
        sys.exit(2)


def unknown_override_message(error: BaseException, argv: list[str]) -> str:
    """The one-line message for a ``--config.<key>`` override that names no setting.

    ml_collections raises ``KeyError("'stepz'\\nDid you mean \"steps\" instead of \"stepz\"?")``
    (or an ``AttributeError`` with the same text): the bad segment and, when close to a real
    one, its suggestion. The message names the whole override and the corrected one.
    """
    text = str(error.args[0]) if error.args else str(error)
    # The first identifier in the text, whatever quoting and escaping surround it.
    first = re.search(r"[A-Za-z_][A-Za-z0-9_]*", text)
    segment = first.group(0) if first else text
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    names = [arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("--config.")]
    culprit = next((n for n in names if segment in n[len("--config.") :].split(".")), None)
    where = culprit or "a --config override"
    message = f"{where} names no setting ({segment!r} does not exist there)"
    if suggestion and culprit:
        parts = culprit[len("--config.") :].split(".")
        fixed = ".".join(suggestion.group(1) if p == segment else p for p in parts)
        return f"{message}: did you mean --config.{fixed}?"
    if suggestion:
        return f"{message}: did you mean {suggestion.group(1)!r}?"
    return f"{message}; the settings and their defaults are in the config file (e.g. configs/search_qa.py)"


def fail(kind: str, error: BaseException, code: int = 2, *, immediate: bool = True) -> None:
    """Prints ``<kind>: <error>`` as one line on stderr and exits with ``code``.

    A failed orbax/tensorstore read leaves callbacks for its asyncio loop that fire while the
    interpreter shuts the loop down ("RuntimeError: Event loop is closed", one traceback each):
    noise after an error already reported. Late in finalisation they bypass ``sys.unraisablehook``
    (the ``sys`` module is already torn down), so filtering them is not enough: with
    ``immediate`` (the default, for errors found before any work is in flight: settings,
    checkpoints to read, the distributed setup) the streams and log handlers are flushed and the
    process ends with ``os._exit``, skipping the finalisation those callbacks fire in. With
    ``immediate=False`` (an error after work started, whose shutdown may still finish an async
    save) the interpreter exits normally and only the unraisable-hook filter applies.
    """
    print(f"{kind}: {error}", file=sys.stderr)
    if immediate:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed or broken stream
                stream.flush()
        logging.shutdown()
        os._exit(code)
    default_hook = sys.unraisablehook

    def quiet(unraisable) -> None:
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        default_hook(unraisable)

    sys.unraisablehook = quiet
    sys.exit(code)
