"""The one error type that user input raises: its message is a single line a user can act on."""


class InputError(ValueError):
    """Bad user input (a file, a case, a store, a value given).

    `str(err)` is one line: case, file, problem. An error about one value given names the
    parameter that took it (`param`), as the library's caller knows it; a caller that knows it by
    another name (the command line by its flag) renders the line with that name (`naming`).

    Attributes:
        case: the case concerned, or None.
        path: the file or store concerned, or None.
        param: the parameter (argument or setting) whose value is wrong, or None.
        problem: the message without the case and the file.
    """

    def __init__(
        self,
        message: str,
        *,
        case: str | None = None,
        path: str | None = None,
        param: str | None = None,
    ):
        """
        Args:
            message: the problem. With `param`, it names the parameter as ``{param}`` wherever
                the line says it, or speaks of the value only and the name goes first
                (``InputError("must be >= 0, got -1", param="wait")``: "wait must be >= 0,
                got -1").
            case: the case concerned.
            path: the file or store concerned.
            param: the parameter whose value is wrong.
        """
        self.case = case
        self.path = path
        self.param = param
        self._template = message if "{param}" in message or not param else "{param} " + message
        super().__init__(self.naming(param))
        self.problem = self._text(param)

    def _text(self, name: str | None) -> str:
        return self._template.replace("{param}", name) if self.param and name else self._template

    def naming(self, name: str | None) -> str:
        """The one line with the parameter called `name` (e.g. the flag that set it); the line
        as it is when `name` is None."""
        name = name or self.param
        parts = [
            p
            for p in (f"case {self.case}" if self.case else None, self.path and str(self.path))
            if p
        ]
        return ": ".join([*parts, self._text(name)])


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
