"""The configuration language: text → tree of :class:`ConfigNode`, with every expansion.

Reading a configuration takes four steps:

1. A small hand-written lexer (:func:`_tokens`) turns the text into tokens. It owns the
   rules that LALR terminals cannot state: any Unicode white space separates tokens, ``\\r``
   is dropped everywhere, ``#`` starts a comment even in the middle of a word, quotes open
   only at the start of a token, and a trailing ``\\`` continues the directive.
2. Lark's LALR(1) parser, driven by ``grammar/maddy.lark``, builds the raw structure:
   directives, arguments and blocks. Lark's errors are translated into positioned
   :class:`ConfigError` values (:func:`_syntax_error`); none escapes.
3. :class:`_Expander` walks the raw tree once, in reading order, with an explicit stack
   (imports nested 256 deep inside blocks nested 255 deep never touch Python's recursion
   limit). It applies snippets, imports and macros exactly as ``config-language.md``
   orders them, and finally the ``{env:NAME}`` placeholders, after which directive names
   are validated.
4. The result is frozen into :class:`ConfigNode` tuples.

Macros are visible to everything read after their definition, files imported later
included (behaviour A-67). A snippet's body is macro-expanded where the snippet is declared
(A-66); an ``import`` of a snippet declared further down the same file (A-48) is filled in
when that file has been read, once the declaration has been reached.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from lark import Lark, Token, Transformer
from lark.common import LexerConf
from lark.exceptions import LarkError, UnexpectedInput, UnexpectedToken
from lark.lexer import Lexer

from maddylite.config.errors import ConfigError
from maddylite.config.nodes import ConfigNode

__all__ = ["MAX_IMPORT_DEPTH", "MAX_NESTING", "parse_file", "parse_raw", "parse_string"]

#: Deepest allowed block nesting; one more level is an error (config-language.md).
MAX_NESTING = 255
#: Deepest allowed chain of imports (snippets or files); one more is an error (A-59).
MAX_IMPORT_DEPTH = 256

Position = tuple[int, int]


# --------------------------------------------------------------------------------------
# Public API


def parse_string(
    text: str,
    filename: str = "<string>",
    env: Mapping[str, str] | None = None,
    base_dir: str | None = None,
) -> list[ConfigNode]:
    """parse_string reads configuration text and returns its fully expanded top level.

    Snippets, imports, macros and ``{env:NAME}`` placeholders are all expanded, and every
    directive name is validated. ``filename`` is the name used in node positions and error
    messages. Relative imports resolve against ``base_dir``, or against the folder of
    ``filename`` when ``base_dir`` is None (the current directory for names such as
    ``<string>``). ``env`` defaults to ``os.environ``. Any problem raises a
    :class:`ConfigError` carrying file, line and column.
    """
    if base_dir is None:
        base_dir = "" if _is_pseudo_name(filename) else os.path.dirname(filename)
    root_key = filename if _is_pseudo_name(filename) else os.path.realpath(filename)
    return _expand_root(text, filename, base_dir, root_key, env)


def parse_file(path: str, env: Mapping[str, str] | None = None) -> list[ConfigNode]:
    """parse_file reads the configuration file at ``path`` like :func:`parse_string`.

    Node positions and error messages name the file as ``path`` was given; relative
    imports resolve against its folder.
    """
    text = _read_text(path, path, None)
    return _expand_root(text, path, os.path.dirname(path), os.path.realpath(path), env)


def parse_raw(text: str, filename: str = "<string>") -> list[ConfigNode]:
    """parse_raw parses text into its literal tree, without any expansion.

    Snippet and macro declarations and ``import`` directives stay as ordinary nodes,
    placeholders stay as written and names are not validated. Lexical and structural
    errors (A.1, A.2) are raised as positioned :class:`ConfigError` values.
    """
    return [_raw_to_node(raw, filename) for raw in _parse_raw(text, filename)]


def _expand_root(
    text: str, filename: str, base_dir: str, root_key: str, env: Mapping[str, str] | None
) -> list[ConfigNode]:
    expander = _Expander(os.environ if env is None else env, base_dir)
    items = expander.run(_parse_raw(text, filename), filename, base_dir, root_key)
    return list(_freeze(items))


def _is_pseudo_name(filename: str) -> bool:
    return filename.startswith("<") and filename.endswith(">")


# --------------------------------------------------------------------------------------
# Lexer

# The White_Space characters of Unicode (Go's unicode.IsSpace, which maddy uses), minus the
# line feed, which ends a directive, and the carriage return, which is dropped beforehand.
_SPACE = "\t\x0b\x0c \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"

_LEXEME = re.compile(
    r"(?P<nl>\n)"
    rf"|(?P<space>[{_SPACE}]+)"
    r"|(?P<comment>#[^\n]*)"
    # Inside quotes a backslash takes the next character with it (A-12), so `\\"` ends the
    # string and `\"` does not.
    r'|(?P<quoted>"(?P<body>[^"\\]*(?:\\.[^"\\]*)*)(?P<close>")?)'
    rf'|(?P<word>[^{_SPACE}\n#"][^{_SPACE}\n#]*)',
    re.DOTALL,
)


@dataclass
class _Source:
    """_Source is one parse's input and the lexer state its error messages need."""

    text: str
    filename: str
    #: The LBRACE tokens of the blocks still open, innermost last.
    opens: list[Token] = field(default_factory=list)
    #: The last token handed to the parser, and the one before it.
    last: Token | None = None
    prev: Token | None = None


def _tok(kind: str, value: str, pos: int, line: int, col: int, end: int) -> Token:
    return Token(kind, value, pos, line, col, line, col + end - pos, end)


def _tokens(src: _Source) -> Iterator[Token]:
    """_tokens yields the grammar's tokens for ``src.text`` (see grammar/maddy.lark)."""
    text = src.text
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\r" in text:
        # CR means nothing anywhere, inside quotes too.
        text = text.replace("\r", "")
    line, line_start = 1, 0
    at_name = True  # the next word is a directive name, not an argument
    pending_nl = False  # a token was produced since the last _NL
    continuing = False  # a trailing backslash joined this line to the next one
    held: Token | None = None  # an argument ending in "\" that may continue the line
    opens = src.opens

    for m in _LEXEME.finditer(text):
        kind = m.lastgroup
        if kind == "space" or kind == "comment":
            continue
        if kind == "nl":
            if held is not None:
                # the directive goes on; a lone "\" disappears.
                if len(held.value) > 1:
                    yield _without_backslash(held)
                held = None
                continuing = True
            elif pending_nl and not continuing:
                yield _tok("_NL", "\n", m.start(), line, m.start() - line_start + 1, m.end())
                pending_nl = False
                at_name = True
            line += 1
            line_start = m.end()
            continue

        if held is not None:
            yield held
            held = None
        continuing = False
        pending_nl = True
        start = m.start()
        col = start - line_start + 1
        if kind == "quoted":
            if m.group("close") is None:
                raise ConfigError("unterminated quoted string", src.filename, line, col)
            body = m.group("body")
            value = body.replace('\\"', '"') if '\\"' in body else body
            yield _tok("QWORD", value, start, line, col, m.end())
            newlines = body.count("\n")
            if newlines:
                line += newlines
                line_start = start + 1 + body.rfind("\n") + 1
            at_name = False
            continue

        word = m.group("word")
        if word == "{" or word == "{}":
            if len(opens) >= MAX_NESTING:
                raise ConfigError(
                    f"nesting limit reached: blocks nested deeper than {MAX_NESTING} levels",
                    src.filename,
                    line,
                    col,
                )
            lbrace = _tok("LBRACE", "{", start, line, col, start + 1)
            opens.append(lbrace)
            yield lbrace
            at_name = True
            if word == "{}":
                # `a {}` is an empty block.
                opens.pop()
                yield _tok("_RBRACE", "}", start + 1, line, col + 1, start + 2)
                at_name = False
        elif word == "}":
            if opens:
                opens.pop()
            yield _tok("_RBRACE", "}", start, line, col, start + 1)
            at_name = False
        elif not at_name and word.endswith("\\"):
            held = _tok("WORD", word, start, line, col, m.end())
        else:
            yield _tok("WORD", word, start, line, col, m.end())
            at_name = False

    if held is not None and len(held.value) > 1:
        # a trailing backslash at the end of the file is dropped.
        yield _without_backslash(held)
    if pending_nl:
        end = len(text)
        yield _tok("_NL", "", end, line, end - line_start + 1, end)


def _without_backslash(word: Token) -> Token:
    return _tok(
        "WORD",
        word.value[:-1],
        word.start_pos or 0,
        word.line or 0,
        word.column or 0,
        (word.end_pos or 1) - 1,
    )


class _PreLexer(Lexer):
    """_PreLexer hands :func:`_tokens` to Lark as a custom lexer."""

    def __init__(self, lexer_conf: LexerConf) -> None:
        pass

    def lex(self, data: object) -> Iterator[Token]:  # type: ignore[override]
        """lex yields the tokens of a :class:`_Source` (or of a plain example string)."""
        src = data if isinstance(data, _Source) else _Source(str(data), "<example>")
        for tok in _tokens(src):
            src.prev, src.last = src.last, tok
            yield tok


# --------------------------------------------------------------------------------------
# Parser: tokens → raw tree


@dataclass(frozen=True, slots=True)
class _Raw:
    """_Raw is a directive as written: no expansion, no file (the caller knows it)."""

    name: str
    line: int
    column: int
    args: tuple[str, ...]
    arg_positions: tuple[Position, ...]
    children: tuple[_Raw, ...] | None
    #: Position of the block's "{", where a nesting error is reported.
    brace: Position | None = None


class _Build(Transformer):  # type: ignore[type-arg]
    """_Build turns each grammar rule into raw nodes while Lark parses (no tree is built)."""

    def start(self, children: list[_Raw]) -> list[_Raw]:
        return children

    def head(self, children: list[Token]) -> tuple[Token, list[Token]]:
        return children[0], children[1:]

    def directive(self, children: list[Any]) -> _Raw:
        (name, args), block = children
        return _raw(name, args, block)

    def last(self, children: list[Any]) -> _Raw:
        ((name, args),) = children
        return _raw(name, args, None)

    def block(self, children: list[object]) -> tuple[Token, tuple[_Raw, ...]]:
        lbrace = children[0]
        assert isinstance(lbrace, Token)
        return lbrace, tuple(c for c in children[1:] if isinstance(c, _Raw))


def _raw(name: Token, args: list[Token], block: tuple[Token, tuple[_Raw, ...]] | None) -> _Raw:
    brace, children = (None, None) if block is None else block
    return _Raw(
        name=str(name),
        line=name.line or 0,
        column=name.column or 0,
        args=tuple(str(a) for a in args),
        arg_positions=tuple((a.line or 0, a.column or 0) for a in args),
        children=children,
        brace=None if brace is None else (brace.line or 0, brace.column or 0),
    )


@functools.cache
def _lark() -> Lark:
    """_lark builds the LALR parser once; it is shared and safe to reuse concurrently."""
    return Lark.open_from_package(
        "maddylite.grammar",
        "maddy.lark",
        parser="lalr",
        lexer=_PreLexer,
        transformer=_Build(),
        propagate_positions=True,
        maybe_placeholders=True,
    )


def _parse_raw(text: str, filename: str) -> list[_Raw]:
    src = _Source(text, filename)
    try:
        result = _lark().parse(src)  # type: ignore[arg-type]
    except UnexpectedInput as e:
        raise _syntax_error(e, src) from None
    except LarkError as e:  # anything else Lark may raise must not reach users either
        raise ConfigError(f"cannot parse configuration: {e}", filename, 1, 1) from None
    assert isinstance(result, list)
    return result


def _raw_to_node(raw: _Raw, filename: str) -> ConfigNode:
    children = None
    if raw.children is not None:
        children = tuple(_raw_to_node(c, filename) for c in raw.children)
    return ConfigNode(
        raw.name, raw.args, children, filename, raw.line, raw.column, raw.arg_positions
    )


# --------------------------------------------------------------------------------------
# Syntax errors: Lark's exceptions → positioned ConfigError

_BLOCK_HEADER = "block header"
_STRAY_CLOSE = "stray close"
_AFTER_CLOSE = "after close"

# Malformed inputs for Lark's match_examples: an error whose parser state (and expected
# tokens) matches one of these gets that label's message. Lark compares states together
# with the stack depth, so these cover the shallow cases; deeper ones fall back to
# _classify, which judges by the offending token and the one before it.
_EXAMPLES: dict[str, list[str]] = {
    _BLOCK_HEADER: [
        "{",
        "a\n{",
        "a {\n{",
        "a { {",
        "a {\nb\n{",
        "a {\nb {\n}\n{",
        "a {\n}\n{",
    ],
    _STRAY_CLOSE: ["}", "a }", "a b }", "a\n}", "a {\n}\n}", "a { b }\n}", "a b\nc }"],
    _AFTER_CLOSE: [
        "a {\n} b",
        "a {\n} }",
        "a {\n} {",
        "a { } b",
        "a {\nb {\n} c\n}",
        "a {\nb {\n} }",
        "a {\nb {\n} {",
        "a {\nb { c } d\n}",
    ],
}


def _parse_example(text: str) -> Any:
    return _lark().parse(_Source(text, "<example>"))  # type: ignore[arg-type]


def _syntax_error(err: UnexpectedInput, src: _Source) -> ConfigError:
    """_syntax_error explains a Lark parse error with the phrases of behaviour.md A.2."""
    token = getattr(err, "token", None)
    if not isinstance(token, Token) or token.type == "$END":
        if src.opens:
            # reported at the "{" that was never closed.
            brace = src.opens[-1]
            return ConfigError(
                "unexpected EOF when looking for }", src.filename, brace.line, brace.column
            )
        return ConfigError("unexpected end of file", src.filename, err.line, err.column)

    label: str | None = None
    if isinstance(err, UnexpectedToken) and err.state is not None:
        try:
            label = err.match_examples(_parse_example, _EXAMPLES, token_type_match_fallback=True)
        except ConfigError:  # pragma: no cover - the examples are lexically valid
            label = None
    if label is None:
        label = _classify(token, src)

    if label == _AFTER_CLOSE and src.prev is not None and src.prev.type == "_RBRACE":
        # the closing brace is the offending token.
        return ConfigError(
            "newline is required after closing brace",
            src.filename,
            src.prev.line,
            src.prev.column,
        )
    line, col = token.line, token.column
    if label == _BLOCK_HEADER:
        # the phrase is maddy's, kept word for word.
        return ConfigError(
            "block must open on its directive's line: "
            "Unexpected token '{', expecting 'block header'",
            src.filename,
            line,
            col,
        )
    if label == _STRAY_CLOSE:
        return ConfigError("unexpected }", src.filename, line, col)
    return ConfigError(f"unexpected {_describe(token)}", src.filename, line, col)


def _classify(token: Token, src: _Source) -> str | None:
    """_classify is the fallback for errors no example matched, judged by the tokens."""
    if src.prev is not None and src.prev.type == "_RBRACE" and token is src.last:
        return _AFTER_CLOSE
    if token.type == "LBRACE":
        return _BLOCK_HEADER
    if token.type == "_RBRACE":
        return _STRAY_CLOSE
    return None


def _describe(token: Token) -> str:
    if token.type == "_NL":
        return "end of line"
    if token.type in ("LBRACE", "_RBRACE"):
        return str(token.value)
    return f"argument {token.value!r}"


# --------------------------------------------------------------------------------------
# Expansion: snippets, imports, macros, then environment placeholders

#: An import chain: (identity, display name) of the root file and of each import.
_Chain = tuple[tuple[object, str], ...]

_MACRO_REF = re.compile(r"\$\(([^$()]*)\)")
_ENV_REF = re.compile(r"\{env:([^{}]*)\}")
_NAME_PUNCT = frozenset(".-_")


@dataclass(slots=True)
class _Open:
    """_Open is a directive with a block whose children are still being expanded."""

    node: ConfigNode  # everything but the children
    children: list[_Item] = field(default_factory=list)


@dataclass(slots=True)
class _Later:
    """_Later stands for an ``import`` of a snippet declared further down its file."""

    name: str
    chain: _Chain
    depth: int
    items: list[_Item] = field(default_factory=list)


_Item = ConfigNode | _Open | _Later


@dataclass(slots=True)
class _Snippet:
    """_Snippet is a declared snippet: its body, macro-expanded where it was declared."""

    name: str
    file: str
    folder: str
    body: tuple[_Raw, ...]
    scope: _FileScope

    def frame(self, out: list[_Item], *, depth: int, chain: _Chain) -> _Frame:
        """frame splices the body into ``out``; its macros were expanded already."""
        return _Frame(
            nodes=self.body,
            out=out,
            file=self.file,
            folder=self.folder,
            scope=self.scope,
            top=False,
            macros=False,
            depth=depth,
            chain=chain,
        )


@dataclass(slots=True)
class _FileScope:
    """_FileScope is one reading of one file: its snippets not yet reached, and fill-ins."""

    #: Name → index of the last top-level declaration of that snippet not yet read.
    ahead: dict[str, int]
    declared: dict[str, _Snippet] = field(default_factory=dict)
    later: list[_Later] = field(default_factory=list)
    reading: bool = True


@dataclass(slots=True, kw_only=True)
class _Frame:
    """_Frame is a list of raw nodes being expanded into ``out``."""

    nodes: Sequence[_Raw]
    out: list[_Item]
    file: str
    folder: str
    scope: _FileScope
    top: bool  # the top level of a file: declarations allowed
    macros: bool  # expand macros (snippet bodies were expanded when declared)
    depth: int  # block nesting of ``out`` in the final tree
    chain: _Chain  # (identity, display name) of each import
    pos: int = 0


class _Expander:
    """_Expander applies snippets, imports, macros and placeholders in reading order."""

    def __init__(self, env: Mapping[str, str], root_folder: str) -> None:
        self.env = env
        self.root_folder = root_folder or os.curdir
        self.macros: dict[str, tuple[str, ...]] = {}
        self.snippets: dict[str, _Snippet] = {}
        self.stack: list[_Frame] = []

    def run(self, nodes: list[_Raw], file: str, folder: str, key: str) -> list[_Item]:
        """run expands a root file's raw nodes and returns the spliced top level."""
        out: list[_Item] = []
        display = file if _is_pseudo_name(file) else os.path.basename(file)
        self.stack.append(
            _Frame(
                nodes=nodes,
                out=out,
                file=file,
                folder=folder,
                scope=_scope(nodes),
                top=True,
                macros=True,
                depth=0,
                chain=((key, display),),
            )
        )
        while self.stack:
            frame = self.stack[-1]
            if frame.pos == len(frame.nodes):
                self.stack.pop()
                if frame.top:
                    self._end_of_file(frame.scope)
                continue
            raw = frame.nodes[frame.pos]
            frame.pos += 1
            self._step(frame, raw)
        return out

    def _step(self, frame: _Frame, raw: _Raw) -> None:
        name = raw.name
        if name.startswith("$("):
            if not frame.top:
                raise _err("macro declarations are only allowed at top-level", frame, raw)
            self._declare_macro(frame, raw)
            return
        if _is_snippet(name):
            if not frame.top:
                raise _err("snippet declarations are only allowed at top-level", frame, raw)
            self._declare_snippet(frame, raw)
            return

        args, positions = raw.args, raw.arg_positions
        if frame.macros:
            args, positions = self._expand_macros(args, positions, frame.file)
        if name == "import":
            self._import(frame, raw, args)
            return

        real_name = self._env(name)
        problem = _name_problem(real_name)
        if problem:
            raise _err(problem, frame, raw)
        node = ConfigNode(
            real_name,
            tuple(self._env(a) for a in args),
            None,
            frame.file,
            raw.line,
            raw.column,
            positions,
        )
        if raw.children is None:
            frame.out.append(node)
            return
        if frame.depth >= MAX_NESTING:
            line, col = raw.brace or (raw.line, raw.column)
            raise ConfigError(
                f"nesting limit reached: blocks nested deeper than {MAX_NESTING} levels",
                frame.file,
                line,
                col,
            )
        block = _Open(node)
        frame.out.append(block)
        self.stack.append(
            replace(
                frame,
                nodes=raw.children,
                out=block.children,
                top=False,
                depth=frame.depth + 1,
                pos=0,
            )
        )

    # -- macros ---------------------------------------------------------------------

    def _declare_macro(self, frame: _Frame, raw: _Raw) -> None:
        if not raw.name.endswith(")"):
            raise _err("macro name must end with )", frame, raw)
        name = raw.name[2:-1]
        if not name:
            raise _err("empty macro name", frame, raw)
        if len(raw.args) < 2:
            raise _err("at least 2 arguments are required", frame, raw)
        if raw.args[0] != "=":
            raise _err("missing = in macro declaration", frame, raw)
        if raw.children is not None:
            raise _err("macro declarations can't have a block", frame, raw)
        # a macro may use the macros defined before it.
        values, _ = self._expand_macros(raw.args[1:], raw.arg_positions[1:], frame.file)
        self.macros[name] = values

    def _expand_macros(
        self, args: tuple[str, ...], positions: tuple[Position, ...], file: str
    ) -> tuple[tuple[str, ...], tuple[Position, ...]]:
        if not any("$(" in a for a in args):
            return args, positions
        out: list[str] = []
        out_pos: list[Position] = []
        for i, arg in enumerate(args):
            pos = positions[i] if i < len(positions) else (0, 0)
            if "$(" not in arg:
                out.append(arg)
                out_pos.append(pos)
                continue
            whole = _MACRO_REF.fullmatch(arg)
            if whole:
                # a whole argument becomes all the values, or nothing.
                values = self.macros.get(whole.group(1), ())
                out.extend(values)
                out_pos.extend([pos] * len(values))
                continue

            def inline(m: re.Match[str], pos: Position = pos) -> str:
                values = self.macros.get(m.group(1), ())
                if len(values) > 1:
                    raise ConfigError(
                        "can't expand macro with multiple arguments inside a string",
                        file,
                        pos[0],
                        pos[1],
                    )
                return values[0] if values else ""

            out.append(_MACRO_REF.sub(inline, arg))
            out_pos.append(pos)
        return tuple(out), tuple(out_pos)

    # -- snippets -------------------------------------------------------------------

    def _declare_snippet(self, frame: _Frame, raw: _Raw) -> None:
        name = raw.name[1:-1]
        if raw.args:
            raise _err("snippet declarations can't have arguments", frame, raw)
        if not name:
            raise _err("empty snippet name", frame, raw)
        body = self._snippet_body(raw.children or (), frame)
        scope = frame.scope
        if scope.ahead.get(name) != frame.pos - 1:
            return  # a later declaration of the same name wins
        del scope.ahead[name]
        snippet = _Snippet(name, frame.file, frame.folder, body, scope)
        scope.declared[name] = snippet
        self.snippets[name] = snippet

    def _snippet_body(self, nodes: tuple[_Raw, ...], frame: _Frame) -> tuple[_Raw, ...]:
        """_snippet_body checks a body and expands its macros as they are now (A-66).

        A body comes from a single file, so its depth (and this recursion) is bounded by
        the nesting limit.
        """
        out = []
        for raw in nodes:
            if raw.name.startswith("$("):
                raise _err("macro declarations are only allowed at top-level", frame, raw)
            if _is_snippet(raw.name):
                raise _err("snippet declarations are only allowed at top-level", frame, raw)
            if raw.name != "import":
                problem = _name_problem(self._env(raw.name))
                if problem:
                    raise _err(problem, frame, raw)
            args, positions = self._expand_macros(raw.args, raw.arg_positions, frame.file)
            children = None if raw.children is None else self._snippet_body(raw.children, frame)
            out.append(_Raw(raw.name, raw.line, raw.column, args, positions, children, raw.brace))
        return tuple(out)

    def _end_of_file(self, scope: _FileScope) -> None:
        """_end_of_file fills in the imports of snippets that were declared after them."""
        scope.reading = False
        for later in reversed(scope.later):
            snippet = scope.declared[later.name]
            chain = (*later.chain, (("snippet", later.name), later.name))
            self.stack.append(snippet.frame(later.items, depth=later.depth, chain=chain))

    # -- imports --------------------------------------------------------------------

    def _import(self, frame: _Frame, raw: _Raw, args: tuple[str, ...]) -> None:
        if len(args) != 1:
            raise _err("import directive requires exactly 1 argument", frame, raw)
        if raw.children is not None:
            raise _err("import directive can't have a block", frame, raw)
        target = args[0]
        key: object = ("snippet", target)

        scope = frame.scope
        if scope.reading and target in scope.ahead:
            # declared further down this file; filled in at the end of the file.
            self._check_chain(frame, raw, key, target)
            later = _Later(target, frame.chain, frame.depth)
            frame.out.append(later)
            scope.later.append(later)
            return

        snippet = self.snippets.get(target)
        if snippet is not None:
            # a snippet wins over a file of the same name.
            chain = self._check_chain(frame, raw, key, target)
            self.stack.append(snippet.frame(frame.out, depth=frame.depth, chain=chain))
            return

        path = self._locate(target, frame, raw)
        real = os.path.realpath(path)
        chain = self._check_chain(frame, raw, real, self._display(path))
        text = _read_text(path, frame.file, (raw.line, raw.column))
        nodes = _parse_raw(text, path)
        self.stack.append(
            _Frame(
                nodes=nodes,
                out=frame.out,
                file=path,
                folder=os.path.dirname(path),
                scope=_scope(nodes),
                top=True,
                macros=True,
                depth=frame.depth,
                chain=chain,
            )
        )

    def _locate(self, target: str, frame: _Frame, raw: _Raw) -> str:
        """_locate finds the file an import names: the exact name when it exists, else
        ``<name>.conf`` (A-55). A folder is an error (A-60), also when ``<name>.conf``
        exists beside it: the exact name wins.
        """
        path = target if os.path.isabs(target) else os.path.join(frame.folder, target)
        path = os.path.normpath(path)
        if os.path.isfile(path):
            return path
        if not os.path.exists(path) and os.path.isfile(path + ".conf"):
            return path + ".conf"
        for candidate, shown in ((path, target), (path + ".conf", target + ".conf")):
            if os.path.isdir(candidate):
                raise _err(f"{shown} is a directory", frame, raw)
            if os.path.exists(candidate):
                return candidate  # not a regular file (a device, a pipe): let reading judge
        raise _err(f"unknown import: {target}", frame, raw)

    def _display(self, path: str) -> str:
        rel = os.path.relpath(path, self.root_folder)
        return path if rel.startswith(os.pardir) else rel

    def _check_chain(self, frame: _Frame, raw: _Raw, key: object, display: str) -> _Chain:
        """_check_chain returns the import chain extended by one, or raises (A-50, A-59)."""
        chain = frame.chain
        for i, (seen, _) in enumerate(chain):
            if seen == key:
                names = [shown for _, shown in chain[i:]] + [display]
                raise _err("import cycle: " + " -> ".join(names), frame, raw)
        chain = (*chain, (key, display))
        if len(chain) - 1 > MAX_IMPORT_DEPTH:
            names = [shown for _, shown in chain]
            raise _err("hit import expansion limit: " + " -> ".join(names), frame, raw)
        return chain

    # -- environment ----------------------------------------------------------------

    def _env(self, s: str) -> str:
        if "{env:" not in s:
            return s
        # A-36..A-41: exactly the placeholder is replaced, by the value or by nothing;
        # values are inserted as they are and never expanded again.
        return _ENV_REF.sub(lambda m: self.env.get(m.group(1), ""), s)


def _scope(nodes: Sequence[_Raw]) -> _FileScope:
    return _FileScope({n.name[1:-1]: i for i, n in enumerate(nodes) if _is_snippet(n.name)})


def _is_snippet(name: str) -> bool:
    return len(name) >= 2 and name[0] == "(" and name[-1] == ")"


def _err(message: str, frame: _Frame, raw: _Raw) -> ConfigError:
    return ConfigError(message, frame.file, raw.line, raw.column)


def _name_problem(name: str) -> str | None:
    """_name_problem says what is wrong with a directive name, or None (A-34, A-44)."""
    if not name:
        return "empty directive name"
    if name[0].isdecimal():
        return "directive name cannot start with a digit"
    for ch in name:
        if not (ch.isalpha() or ch.isdecimal() or ch in _NAME_PUNCT):
            shown = ch if ch.isprintable() and not ch.isspace() else f"U+{ord(ch):04X}"
            return f"character not allowed in directive name: {shown}"
    if not name[0].isalpha():
        return "directive name must start with a letter"
    return None


def _read_text(path: str, importer: str, at: Position | None) -> str:
    """_read_text reads a file as UTF-8; a failure is reported at the import (or 1:1)."""
    line, col = at or (1, 1)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        reason = (e.strerror or str(e)).lower()
        raise ConfigError(f"cannot read {path}: {reason}", importer, line, col) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[: e.start]
        bad_line = before.count(b"\n") + 1
        line_bytes = before[before.rfind(b"\n") + 1 :]
        bad_col = len(line_bytes.decode("utf-8", "replace")) + 1
        raise ConfigError("invalid utf-8 in configuration", path, bad_line, bad_col) from None


def _freeze(items: list[_Item]) -> tuple[ConfigNode, ...]:
    """_freeze turns expanded items into ConfigNode tuples, without recursion."""
    root: list[ConfigNode] = []
    # Each entry: items to walk, their position, results so far, and the block they fill.
    stack: list[tuple[list[_Item], list[int], list[ConfigNode], _Open | None, list[ConfigNode]]]
    stack = [(items, [0], root, None, root)]
    while stack:
        todo, index, results, owner, parent = stack[-1]
        if index[0] == len(todo):
            stack.pop()
            if owner is not None:
                parent.append(_with_children(owner.node, tuple(results)))
            continue
        item = todo[index[0]]
        index[0] += 1
        if isinstance(item, ConfigNode):
            results.append(item)
        elif isinstance(item, _Later):
            stack.append((item.items, [0], results, None, results))
        else:
            stack.append((item.children, [0], [], item, results))
    return tuple(root)


def _with_children(node: ConfigNode, children: tuple[ConfigNode, ...]) -> ConfigNode:
    return ConfigNode(
        node.name, node.args, children, node.file, node.line, node.column, node.arg_positions
    )
