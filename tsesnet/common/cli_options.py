"""Options several `tsesnet` commands share: the repeatable `--set KEY=VALUE` of the commands
that take training-config keys (`train`, `sweep`, `science`)."""

from __future__ import annotations

import argparse


def add_set_option(parser: argparse.ArgumentParser, help: str) -> None:
    """Adds the repeatable ``--set KEY=VALUE`` (into ``args.overrides``, a list) to `parser`."""
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides", help=help
    )
