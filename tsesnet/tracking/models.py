"""`tsesnet models list | show | promote`: browse the registry and move aliases by hand.

A promotion is recorded where a user browsing the registry looks: on the version that gets the
alias (tags `promoted_<alias>_by`, `_at`, `_reason`, and a line in its description) and on the
version that loses it, so who moved `@champion`, when and why is never lost.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import json
import socket

from data_store.errors import InputError
from tsesnet.common import names
from tsesnet.tracking import protocol
from tsesnet.tracking.registry import GATE_TAG, client, quote_name


def _aliases_by_version(rm) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for alias, version in (rm.aliases or {}).items():
        out.setdefault(str(version), []).append(alias)
    return out


def list_models() -> list[dict]:
    """Registered models: name, latest version, aliases -> version."""
    mlc = client()
    rows = []
    for rm in mlc.search_registered_models():
        versions = mlc.search_model_versions(f"name = {quote_name(rm.name)}")
        rows.append(
            {
                "name": rm.name,
                "versions": len(versions),
                "latest": max((int(v.version) for v in versions), default=None),
                "aliases": {a: str(v) for a, v in (rm.aliases or {}).items()},
            }
        )
    return sorted(rows, key=lambda r: r["name"])


def show_model(name: str) -> dict:
    """All versions of one registered model: aliases, validation protocol (its digest, or
    "unknown" for versions registered before protocols were recorded), val DSC, HD95 and
    sensitivity, fold, run, and how registration went (`registration`: done, or pending,
    failed or abandoned for one that never finished; "" before this was recorded)."""
    from mlflow.exceptions import MlflowException

    mlc = client()
    try:
        rm = mlc.get_registered_model(name)
    except MlflowException as err:
        raise InputError(f"no registered model named {name!r}") from err
    by_version = _aliases_by_version(rm)
    versions = []
    for v in sorted(
        mlc.search_model_versions(f"name = {quote_name(name)}"), key=lambda v: int(v.version)
    ):
        t = v.tags or {}

        def number(key, t=t):
            return float(t[key]) if t.get(key) else None

        versions.append(
            {
                "version": str(v.version),
                "aliases": sorted(by_version.get(str(v.version), [])),
                "protocol": protocol.of_tags(t),
                "val_cases": int(t["protocol.n_val_cases"])
                if t.get("protocol.n_val_cases")
                else None,
                "val_dice": number("val_dice"),
                "val_hd95": number("val_hd95"),
                "val_sensitivity": number("val_sensitivity"),
                "registered_as": t.get("registered_as"),
                "registration_reason": t.get("registration_reason"),
                "registration": t.get(GATE_TAG, ""),
                "fold": t.get("fold"),
                "store_fingerprint": t.get("store_fingerprint"),
                "preset": t.get("preset"),
                "fusion": t.get("fusion"),
                "run_id": v.run_id,
                "run_name": t.get("run_name"),
                "source": v.source,
            }
        )
    return {
        "name": name,
        "aliases": {a: str(v) for a, v in (rm.aliases or {}).items()},
        "versions": versions,
    }


def check_alias(alias: str, what: str = "alias") -> str:
    """`alias` if MLflow takes it as an alias, else a one-line `InputError` naming the parameter
    `what` (`InputError.param`): a name (`names.check`) without '.', and not one MLflow reserves
    ("latest" and "v<N>", in any case, as MLflow compares them)."""
    names.check(alias, what)
    if "." in alias:
        raise InputError(
            f"{alias!r}: an alias may hold letters, digits, '_' and '-' only", param=what
        )
    if alias.lower() == "latest" or (alias[:1] in "vV" and alias[1:].isdigit()):
        raise InputError(
            f"{alias!r} is reserved by MLflow ('latest' and v<N>, in any case); "
            "choose another name",
            param=what,
        )
    return alias


def promote(name: str, version: str, alias: str, reason: str = "") -> str | None:
    """Point `alias` of model `name` at `version`, recording who, when and why.

    The version that gets the alias and the one that loses it each get tags
    (`promoted_<alias>_by/_at/_reason`, `demoted_<alias>_...`) and a line in their description.

    Returns:
        The version that held the alias before (None if none did, or the same version).

    Raises:
        InputError: no such model or version, or an alias that is not a name.
    """
    from mlflow.exceptions import MlflowException

    check_alias(alias)
    mlc = client()
    try:
        target = mlc.get_model_version(name, str(version))
    except MlflowException as err:
        raise InputError(f"model {name!r} has no version {version}") from err
    try:
        before = str(mlc.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        before = None
    who = f"{getpass.getuser()}@{socket.gethostname()}"
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    why = reason or "no reason given"
    mlc.set_registered_model_alias(name, alias, str(version))
    _record(mlc, target, f"promoted_{alias}", who, when, why,
            f"{when}: @{alias} moved here from {'v' + before if before else 'nowhere'} "
            f"by {who}: {why}")  # fmt: skip
    if before and before != str(version):
        _record(mlc, mlc.get_model_version(name, before), f"demoted_{alias}", who, when, why,
                f"{when}: @{alias} moved from here to v{version} by {who}: {why}")  # fmt: skip
        mlc.set_model_version_tag(name, before, f"demoted_{alias}_to", str(version))
    return before if before != str(version) else None


def _record(mlc, mv, prefix: str, who: str, when: str, why: str, line: str) -> None:
    for key, value in (("by", who), ("at", when), ("reason", why)):
        mlc.set_model_version_tag(mv.name, mv.version, f"{prefix}_{key}", value)
    text = f"{mv.description}\n\n{line}" if mv.description else line
    mlc.update_model_version(mv.name, mv.version, description=text)


def add_list_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `tsesnet models list` (read by `cli_list`)."""
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def cli_list(args) -> int:
    """`tsesnet models list [--json]`."""
    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no registered models")
        return 0
    print(f"{'name':<24} {'versions':>8} {'latest':>6}  aliases")
    for r in rows:
        aliases = ", ".join(f"@{a}=v{v}" for a, v in sorted(r["aliases"].items()))
        print(f"{r['name']:<24} {r['versions']:>8} {r['latest'] or '-':>6}  {aliases}")
    return 0


def add_show_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `tsesnet models show` (read by `cli_show`)."""
    parser.add_argument("name", metavar="NAME", help="registered model name (tsesnet)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def cli_show(args) -> int:
    """`tsesnet models show NAME [--json]`."""
    info = show_model(args.name)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(
        f"{info['name']}: "
        + (", ".join(f"@{a}=v{v}" for a, v in info["aliases"].items()) or "no aliases")
    )
    print(
        f"{'version':>7}  {'aliases':<22} {'protocol':<8} {'cases':>5} {'val DSC':>7} "
        f"{'HD95 mm':>7} {'sens':>6}  {'fold':>4}  {'model':<16} run"
    )
    for v in info["versions"]:
        model = f"{v['preset']}/{v['fusion']}"
        state = v["registration"]
        note = f"  (registration {state})" if state not in ("", "done") else ""
        print(
            f"{v['version']:>7}  {','.join(v['aliases']) or '-':<22} {v['protocol'][:8]:<8} "
            f"{v['val_cases'] if v['val_cases'] is not None else '-':>5} "
            f"{_cell(v['val_dice'], 4):>7} {_cell(v['val_hd95'], 2):>7} "
            f"{_cell(v['val_sensitivity'], 4):>6}  {v['fold'] or '-':>4}  {model:<16} "
            f"{v['run_name'] or v['run_id']}{note}"
        )
    print(
        "protocol: the validation protocol's digest (store, fold, validation cases, window, "
        "overlap, post-processing); @champion moves only between versions of one protocol"
    )
    return 0


def _cell(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def add_promote_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `tsesnet models promote` (read by `cli_promote`)."""
    parser.add_argument("name", metavar="NAME", help="registered model name")
    parser.add_argument("version", metavar="VERSION", help="the version to get the alias")
    parser.add_argument("--alias", required=True, metavar="A", help="the alias, e.g. champion")
    parser.add_argument("--reason", default="", metavar="TEXT", help="why (kept on the version)")


def cli_promote(args) -> int:
    """`tsesnet models promote NAME VERSION --alias A [--reason TEXT]`."""
    before = promote(args.name, args.version, args.alias, args.reason or "")
    moved = f" (was version {before})" if before else ""
    print(f"{args.name}@{args.alias} -> version {args.version}{moved}")
    return 0
