"""Tokenizer loading from a local Hugging Face directory (``transformers.AutoTokenizer``)."""

from __future__ import annotations

import os
from typing import Any


def load_tokenizer(path: str | os.PathLike, *, require_chat_template: bool = False) -> Any:
    """Loads the tokenizer (and its chat template) saved in a local model directory.

    Never touches the network and never runs repository code (``trust_remote_code=False``).

    Args:
      path: directory holding ``tokenizer.json`` / ``tokenizer_config.json`` (a model checkpoint
        directory usually does).
      require_chat_template: raise if the tokenizer has no chat template (prompts are built with
        ``tokenizer.apply_chat_template``).

    Returns:
      A ``transformers`` tokenizer.

    Raises:
      FileNotFoundError: ``path`` is not a directory.
      ValueError: no loadable tokenizer in the directory, or no chat template when one is required.
    """
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: tokenizer directory not found")
    # Imported here: transformers is heavy and only this function needs it.
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            directory, local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{directory}: no tokenizer could be loaded (expected tokenizer.json or "
            f"tokenizer_config.json): {err}"
        ) from err
    if require_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{directory}: the tokenizer has no chat template (tokenizer_config.json "
            "'chat_template' or chat_template.jinja); add one or pass require_chat_template=False"
        )
    return tokenizer
