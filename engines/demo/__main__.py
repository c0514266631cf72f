"""``python -m engines.demo --build [--out DIR]``: rebuild the shipped demo weights."""

from __future__ import annotations

import argparse
from pathlib import Path

from engines.demo.models import build_into, shipped_demo_dir


def main(argv: list[str] | None = None) -> int:
    """``python -m engines.demo --build [--out DIR]``: rebuild the shipped demo weights from the recipe in engines.demo.train."""
    parser = argparse.ArgumentParser(prog="python -m engines.demo", description=main.__doc__)
    parser.add_argument("--build", action="store_true", help="train the demo models and save them")
    parser.add_argument("--out", type=Path, default=None, help=f"where to (default: {shipped_demo_dir()})")
    args = parser.parse_args(argv)
    if not args.build:
        parser.print_help()
        return 2

    def log(line: str) -> None:
        print(line, flush=True)

    models = build_into(args.out or shipped_demo_dir(), log=log)
    log(f"wrote {models.base_dir} and {models.adapter_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
