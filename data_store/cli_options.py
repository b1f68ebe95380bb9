"""Options several data_store commands share: the store lock's `--wait` and `--break-lock`
(`tsesnet ingest`, `tsesnet store verify`), defined once with the lock's own default."""

from __future__ import annotations

import argparse

from data_store.lock import DEFAULT_WAIT_S

BREAK_LOCK_HELP = (
    "remove STORE's lock when no writer runs but the lock file is unreadable, a link or "
    "another host's"
)


def add_lock_options(parser: argparse.ArgumentParser, *, wait_help: str, prefix: str = "") -> None:
    """Adds `--wait SECONDS` (default `DEFAULT_WAIT_S`) and `--break-lock` to `parser`.

    Args:
        parser: a command's parser.
        wait_help: the help line of `--wait`.
        prefix: put before the help line of `--break-lock` (e.g. when it applies to some
            actions of the command only).
    """
    parser.add_argument(
        "--wait", type=float, default=DEFAULT_WAIT_S, metavar="SECONDS", help=wait_help
    )
    parser.add_argument("--break-lock", action="store_true", help=prefix + BREAK_LOCK_HELP)
