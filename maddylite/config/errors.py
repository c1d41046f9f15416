"""ConfigError: every configuration problem, carrying the position it was found at."""

from __future__ import annotations


class ConfigError(Exception):
    """ConfigError is a configuration problem a user must fix.

    Inner code raises ``ConfigError("message")`` without a position; the boundary that
    holds the offending node attaches it with :meth:`at` (the outermost position wins:
    a position, once set, is never replaced). ``str(err)`` is then
    ``path:line:col: message``.
    """

    def __init__(
        self,
        message: str,
        file: str | None = None,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line
        self.column = column

    @property
    def positioned(self) -> bool:
        """Whether a position has been attached."""
        return self.file is not None and self.line is not None

    def at(self, file: str, line: int, column: int) -> ConfigError:
        """Attach a position if none is set yet, and return self (for ``raise e.at(...)``)."""
        if not self.positioned:
            self.file, self.line, self.column = file, line, column
        return self

    def at_node(self, node: object) -> ConfigError:
        """Attach the position of a config node (anything with file, line, column)."""
        return self.at(
            getattr(node, "file", "?"), getattr(node, "line", 0), getattr(node, "column", 0)
        )

    def __str__(self) -> str:
        if self.positioned:
            return f"{self.file}:{self.line}:{self.column or 0}: {self.message}"
        return self.message


class ConfigErrors(ConfigError):
    """ConfigErrors groups several positioned errors found in one pass (check-config)."""

    def __init__(self, errors: list[ConfigError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors
        if errors and errors[0].positioned:
            self.file, self.line, self.column = errors[0].file, errors[0].line, errors[0].column

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)
