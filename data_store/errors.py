"""The one error type that user input raises: its message is a single line a user can act on."""


class InputError(ValueError):
    """Bad user input (a file, a case, a store, a flag).

    `str(err)` is one line: case, file, problem.
    """

    def __init__(self, message: str, *, case: str | None = None, path: str | None = None):
        parts = [p for p in (f"case {case}" if case else None, str(path) if path else None) if p]
        self.case = case
        self.path = path
        self.problem = message
        super().__init__(": ".join([*parts, message]) if parts else message)


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
