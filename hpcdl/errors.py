"""The one exception type users see: a clear, one-line message, never a traceback."""


class HpcdlError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` and exits with status 2."""


class ConfigError(HpcdlError):
    """Bad input in a file or argument: names the file, the field and what is allowed."""

    def __init__(self, where: str, field: str, problem: str):
        self.where, self.field, self.problem = where, field, problem
        loc = f"{where}: " if where else ""
        fld = f"{field}: " if field else ""
        super().__init__(f"{loc}{fld}{problem}")

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        # Exceptions pickle as cls(*args); ours takes three arguments, not the message.
        return (type(self), (self.where, self.field, self.problem))
