"""``python -m atpo_jax.data.synthetic --out DIR [--world W]``: build the synthetic world's files."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence

from atpo_jax.data.synthetic.build import (
    WORLDS,
    SyntheticWorldConfig,
    build_synthetic_world,
    read_manifest,
)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv: Sequence[str] | None = None) -> None:
    defaults = SyntheticWorldConfig()
    parser = argparse.ArgumentParser(
        prog="python -m atpo_jax.data.synthetic",
        description="Build the synthetic multi-hop world (corpus, splits, tokenizer, demonstrations).",
    )
    parser.add_argument("--out", required=True, help="output directory")
    for field in dataclasses.fields(SyntheticWorldConfig):
        if field.name == "demo_mistake_weights":
            continue
        default = getattr(defaults, field.name)
        if field.name == "world":
            worlds = "; ".join(f"{name}: {w.mechanism}" for name, w in WORLDS.items())
            parser.add_argument(
                "--world",
                choices=list(WORLDS),
                default=default,
                help=f"(default {default}) {worlds}",
            )
            continue
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            type=_bool if isinstance(default, bool) else type(default),
            default=default,
            help=f"(default {default})",
        )
    parser.add_argument("--topk", type=int, default=3, help="passages per demonstration search")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    config = SyntheticWorldConfig(
        **{
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(SyntheticWorldConfig)
            if f.name != "demo_mistake_weights"
        }
    )
    files = build_synthetic_world(args.out, config, topk=args.topk, overwrite=args.overwrite)
    print(json.dumps(read_manifest(files)["stats"], indent=2))
    print(f"files in {files.root}")


if __name__ == "__main__":
    main()
