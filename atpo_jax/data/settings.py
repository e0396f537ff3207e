"""Where the questions come from (the ``data`` section of a run's config)."""

from __future__ import annotations

import dataclasses

from atpo_jax.data.synthetic.build import SyntheticWorldConfig
from atpo_jax.settings import StrEnum, coerce_choices


class DataSource(StrEnum):
    SYNTHETIC = "synthetic"  # the seeded multi-hop world (DESIGN.md §6), built under the workdir
    FILES = "files"  # ATPO/Search-R1 parquet or JSONL rows


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """Training and evaluation questions and the tokenizer.

    Attributes:
      source: ``synthetic`` (the default offline world) or ``files``.
      synthetic_dir: where the synthetic world's files go (default ``<workdir>/synthetic``);
        reused when up to date.
      synthetic: the synthetic world's size, noise and prompt style.
      train_files, eval_files: comma-separated parquet/JSONL files (``source=files``); their rows
        carry the prompt messages (built when the files were made, e.g. by
        ``python -m atpo_jax.data.flashrag --prompt-style paper``).
      tokenizer_path: a tokenizer directory; default ``model.path`` (files) or the synthetic
        world's word-level tokenizer.
      shuffle: visit the training questions in a seeded random order per epoch.
    """

    source: DataSource = DataSource.SYNTHETIC
    synthetic_dir: str = ""
    synthetic: SyntheticWorldConfig = SyntheticWorldConfig()
    train_files: str = ""
    eval_files: str = ""
    tokenizer_path: str = ""
    shuffle: bool = True

    def __post_init__(self) -> None:
        coerce_choices(self, "data")

    @property
    def train_paths(self) -> list[str]:
        return [p for p in self.train_files.split(",") if p]

    @property
    def eval_paths(self) -> list[str]:
        return [p for p in self.eval_files.split(",") if p]
