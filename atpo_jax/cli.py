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


def _is_closed_loop_noise(unraisable) -> bool:
    value = unraisable.exc_value
    return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


def quiet_closed_event_loop() -> None:
    """Drops "RuntimeError: Event loop is closed" unraisable exceptions; passes on all others.

    When orbax fails to restore a checkpoint (damaged files: an error we report in one line), the
    event loop of its restore is closed while tensorstore reads it started are still completing;
    their completion callbacks then call ``loop.call_soon_threadsafe`` on the closed loop from
    tensorstore's threads, and Python prints each resulting exception through
    ``sys.unraisablehook`` as a bare traceback, at any moment after the failure. It is noise (the
    read already failed and was reported), so the command-line entry points install this filter
    before they touch a checkpoint. Installing it twice is a no-op.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_drops_closed_loop_noise", False):
        return

    def quiet(unraisable) -> None:
        if not _is_closed_loop_noise(unraisable):
            previous(unraisable)

    quiet._drops_closed_loop_noise = True
    sys.unraisablehook = quiet


def fail(kind: str, error: BaseException, code: int = 2, *, immediate: bool = True) -> None:
    """Prints ``<kind>: <error>`` as one line on stderr and exits with ``code``.

    With ``immediate`` (the default, for errors found before any work is in flight: settings,
    checkpoints to read, the distributed setup) the streams and log handlers are flushed and the
    process ends with ``os._exit``: nothing runs after the reported error (no interpreter
    finalisation, in which leftover callbacks of a failed orbax read could still fire). With
    ``immediate=False`` (an error after work started, whose shutdown may still finish an async
    save) the interpreter exits normally, with :func:`quiet_closed_event_loop` installed.
    """
    print(f"{kind}: {error}", file=sys.stderr)
    if immediate:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed or broken stream
                stream.flush()
        logging.shutdown()
        os._exit(code)
    quiet_closed_event_loop()
    sys.exit(code)
