"""ConfigNode: one directive of the configuration tree, with its source position."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ConfigNode:
    """ConfigNode is one directive: ``name args... [{ children }]``.

    ``children`` is ``None`` when the directive has no block and a (possibly empty) tuple
    when it has one (A-20: an empty block differs from no block). ``file`` is the path
    as it was read, ``line`` and ``column`` are 1-based and point at the directive's
    first token.
    """

    name: str
    args: tuple[str, ...] = ()
    children: tuple[ConfigNode, ...] | None = None
    file: str = "<string>"
    line: int = 0
    column: int = 0
    #: Per-argument positions (line, column), parallel to ``args`` where known.
    arg_positions: tuple[tuple[int, int], ...] = field(default=(), compare=False, repr=False)

    @property
    def has_block(self) -> bool:
        """Whether the directive was written with a ``{ }`` block (empty or not)."""
        return self.children is not None

    @property
    def block(self) -> tuple[ConfigNode, ...]:
        """The children, or an empty tuple when there is no block."""
        return self.children or ()

    def pos(self) -> str:
        """The ``file:line:col`` prefix for messages about this node."""
        return f"{self.file}:{self.line}:{self.column}"

    def render(self, indent: int = 0) -> str:
        """A stable, human-readable dump used by golden tests: ``name [a, b]`` per line."""
        args = ", ".join(self.args)
        head = "  " * indent + f"{self.name} [{args}]"
        if self.children is not None:
            head += " {"
            lines = [head] + [c.render(indent + 1) for c in self.children]
            lines.append("  " * indent + "}")
            return "\n".join(lines)
        return head
