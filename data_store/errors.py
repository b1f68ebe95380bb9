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
