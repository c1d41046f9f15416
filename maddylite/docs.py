"""Reference documentation rendered from directive declarations (``maddylite directives``)."""

from __future__ import annotations

from maddylite.config.directives import Directive
from maddylite.registry import MODULES, load_builtins


def module_names() -> list[str]:
    """module_names lists the registered modules."""
    load_builtins()
    return sorted(MODULES)


def render_directive(d: Directive) -> str:
    """render_directive renders one directive in maddy's reference format."""
    lines = [
        f"**Syntax**: {d.name} _{d.type.syntax}_" + (" (repeatable)" if d.repeatable else ""),
        f"**Default**: {d.default_text()}",
        "",
        d.help.strip(),
        "",
    ]
    return "\n".join(lines)


def render_module(name: str) -> str:
    """render_module renders a module's docstring and every directive it declares."""
    load_builtins()
    cls = MODULES[name]
    doc = (cls.__doc__ or "").strip()
    roles = ", ".join(r.__name__ for r in cls.roles) or "none"
    out = [f"# {name}", "", doc, "", f"Roles: {roles}", "", "## Directives", ""]
    if not cls.directives:
        out.append("(no directives)")
    out.extend(render_directive(d) for d in cls.directives)
    return "\n".join(out)


def render_globals() -> str:
    """render_globals renders the global directives."""
    from maddylite.runtime import GLOBAL_DIRECTIVES

    out = ["# Global directives", ""]
    out.extend(render_directive(d) for d in GLOBAL_DIRECTIVES)
    return "\n".join(out)
