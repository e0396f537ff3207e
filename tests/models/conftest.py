"""Shared fixtures: tiny transformers checkpoints on disk and our models loaded from them."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

import pytest
import torch

from atpo_jax import models
from tests.models.hf_reference import CASES, build_torch_model, save_torch_model


@dataclasses.dataclass(frozen=True)
class Reference:
    """A saved transformers checkpoint and the torch model it came from."""

    name: str
    path: pathlib.Path
    torch_model: torch.nn.Module


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Reference]:
    """``reference(case_name)``: builds (once per session) and saves a random transformers model."""
    built: dict[str, Reference] = {}

    def get(name: str) -> Reference:
        if name not in built:
            torch_model = build_torch_model(CASES[name])
            path = tmp_path_factory.mktemp(f"hf_{name}")
            save_torch_model(torch_model, path)
            built[name] = Reference(name, path, torch_model)
        return built[name]

    return get


@pytest.fixture(scope="session")
def ours(reference: Callable[[str], Reference]) -> Callable[[str], models.CausalLM]:
    """``ours(case_name)``: our float32 model loaded from the reference checkpoint (cached).

    Tests must not mutate the returned model; load a fresh one for that.
    """
    loaded: dict[str, models.CausalLM] = {}

    def get(name: str) -> models.CausalLM:
        if name not in loaded:
            loaded[name] = models.from_pretrained(reference(name).path)
        return loaded[name]

    return get
