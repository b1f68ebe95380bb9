"""The one error type that user input raises: its message is a single line a user can act on.

A message may name parameters (a function's arguments, a config's settings) as ``{name}``
placeholders, so that each caller shows them by the name it knows them by (`InputError`): a
library caller reads the Python spelling, the command line its flags.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Mapping

#: ``{name}`` or ``{name=VALUE}``: a parameter named in a message (`InputError`).
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)(?:=([^{}]*))?\}")


class InputError(ValueError):
    """Bad user input (a file, a case, a store, a value given).

    `str(err)` is one line: case, file, problem. An error about one value given names the
    parameter that took it (`param`); a message may also name other parameters (`params`), e.g.
    the one that would get past it. Each is a placeholder, so that a caller that knows a
    parameter by another name (the command line by its flag) renders the line with it
    (`naming`): a library caller reads the Python spelling, the command line its flags.

    A placeholder is written like a keyword argument in braces: ``{name}`` names the parameter,
    ``{name=VALUE}`` the parameter given a value (``"pass {overwrite=True} to replace it"``,
    ``"pass {wait=SECONDS} to wait longer"``). Only the parameters declared are placeholders:
    any other brace in the text (a path, JSON) stays as it is, and no `str.format` runs on it.
    In an f-string, write a placeholder with doubled braces (``f"... {{overwrite=True}} ..."``).
    A placeholder is rendered:

    - without a display name for the parameter (a library caller, ``str(err)``), as written,
      in Python's spelling: ``overwrite=True``, ``wait=SECONDS``, ``trials``;
    - with one (the command line passes its flags by parameter: ``{"overwrite": "--overwrite",
      ...}``), the display name, and then the value unless it is True (a switch):
      ``--overwrite``, ``--wait SECONDS``, ``--trials``.

    Attributes:
        case: the case concerned, or None.
        path: the file or store concerned, or None.
        param: the parameter (argument or setting) whose value is wrong, or None.
        params: every parameter the message names (`param` first).
        shown: display names a caller above gave before passing the error on (`shown_as`);
            the names given to `naming` come first.
        problem: the message without the case and the file, in the library's spelling.
    """

    def __init__(
        self,
        message: str,
        *,
        case: str | None = None,
        path: str | None = None,
        param: str | None = None,
        params: Iterable[str] = (),
    ):
        """
        Args:
            message: the problem. With `param`, it names the parameter as ``{param}`` (or by
                its own placeholder) wherever the line says it, or speaks of the value only and
                the name goes first (``InputError("must be >= 0, got -1", param="wait")``:
                "wait must be >= 0, got -1").
            case: the case concerned.
            path: the file or store concerned.
            param: the parameter whose value is wrong.
            params: other parameters the message names as placeholders (``InputError("pass
                {overwrite=True} to replace it", params=["overwrite"])``).
        """
        self.case = case
        self.path = path
        self.param = param
        if param:
            if "{param}" in message:
                message = message.replace("{param}", "{" + param + "}")
            elif param not in _names_in(message):
                message = "{" + param + "} " + message
        self._template = message
        self.params = tuple(dict.fromkeys(p for p in (param, *params) if p))
        self.shown: dict[str, str] = {}
        super().__init__(self.naming())
        self.problem = self._render({})

    def naming(self, names: Mapping[str, str | None] | str | None = None) -> str:
        """The one line with its parameters shown by `names`.

        Args:
            names: display names by parameter (the command line passes all its flags: ``{dest:
                flag}``); a single name, for `param`; None for the library's own spelling. A
                parameter without a display name is shown in it.
        """
        if isinstance(names, str):
            names = {self.param or "": names}
        parts = [
            p
            for p in (f"case {self.case}" if self.case else None, self.path and str(self.path))
            if p
        ]
        return ": ".join([*parts, self._render({**self.shown, **(names or {})})])

    def _render(self, names: Mapping[str, str | None]) -> str:
        def one(match: re.Match) -> str:
            param, value = match.group(1), match.group(2)
            if param not in self.params:
                return match.group(0)
            shown = names.get(param)
            if not shown:
                return match.group(0)[1:-1]
            return shown if value is None or value == "True" else f"{shown} {value}"

        return _PLACEHOLDER.sub(one, self._template)

    def moved(self, *, case: str | None = None, path: str | None = None) -> InputError:
        """The same error about another case or file (its parameters still placeholders)."""
        err = InputError(self._template, case=case, path=path, params=self.params)
        err.param = self.param
        return err


@contextlib.contextmanager
def shown_as(names: Mapping[str, str]) -> Iterator[None]:
    """Gives an `InputError` raised inside the display names `names` for the parameters it
    names, then lets it go on (`InputError.shown`; its own come first): for a command whose flags
    the library knows by other names, or a hint about another command's flag.

    Args:
        names: display names by parameter, e.g. ``{"pred_dir": "--pred"}``.
    """
    try:
        yield
    except InputError as err:
        err.shown = {**names, **err.shown}
        raise


def _names_in(message: str) -> set[str]:
    return {m.group(1) for m in _PLACEHOLDER.finditer(message)}


class LoaderError(RuntimeError):
    """Background loading failed: a loader process died or stalled, or a patch could not be read.

    Raised by `data_store.patch_loader` instead of hanging; catch it around an epoch. `str(err)`
    is one line: ``case ID: epoch E, patch I: problem`` (the case is absent when none was being
    read).

    Attributes:
        case: the case being read, or None.
        epoch: the epoch of that patch, or None.
        patch: the patch's index within the epoch on this rank, or None.
        pid: the loader process concerned, or None (loading in the calling thread).
        problem: the message without the case.
    """

    def __init__(
        self,
        message: str,
        *,
        case: str | None = None,
        epoch: int | None = None,
        patch: int | None = None,
        pid: int | None = None,
    ):
        where = f"epoch {epoch}, patch {patch}" if epoch is not None and patch is not None else None
        parts = [p for p in (f"case {case}" if case else None, where) if p]
        self.case, self.epoch, self.patch, self.pid = case, epoch, patch, pid
        self.problem = " ".join(message.split())  # one line, whatever the cause's text held
        super().__init__(": ".join([*parts, self.problem]))
