"""Tests for maddylite/config/parser.py: behaviour.md A.1–A.5 (cases A-1 .. A-67).

Every case ID of those sections appears in a parametrize ``id=`` or a test docstring.
Trees are compared as nested ``(name, [args], children)`` tuples, where ``children`` is
None for a directive without a block and a list for one with a block (A-20).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from maddylite.config.errors import ConfigError
from maddylite.config.nodes import ConfigNode
from maddylite.config.parser import (
    MAX_IMPORT_DEPTH,
    MAX_NESTING,
    parse_file,
    parse_raw,
    parse_string,
)

FILE = "test.conf"


def n(name: str, *args: str, block: list | None = None) -> tuple:
    """n builds the expected shape of one directive."""
    return (name, list(args), block)


def shape(nodes) -> list[tuple]:
    """shape turns parsed nodes into the nested tuples that ``n`` builds."""
    return [
        (x.name, list(x.args), None if x.children is None else shape(x.children)) for x in nodes
    ]


def parse(text: str, env: dict[str, str] | None = None, base_dir: str | None = None):
    return parse_string(text, filename=FILE, env={} if env is None else env, base_dir=base_dir)


def error_of(text: str, env: dict[str, str] | None = None, base_dir: str | None = None):
    with pytest.raises(ConfigError) as info:
        parse(text, env=env, base_dir=base_dir)
    err = info.value
    assert err.positioned, str(err)
    return err


@pytest.fixture
def files(tmp_path):
    """files writes {relative path: text} under tmp_path and returns tmp_path."""

    def write(tree: dict[str, str]) -> Path:
        for rel, text in tree.items():
            path = tmp_path / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        return tmp_path

    return write


# --------------------------------------------------------------------------------------
# A.1 Lexing and A.2 Structure: text → tree

TREES = [
    pytest.param("a", [n("a")], id="A-1 bare directive"),
    pytest.param("a a1 a2", [n("a", "a1", "a2")], id="A-2 arguments"),
    pytest.param("a\tb\x0bc\x0cd", [n("a", "b", "c", "d")], id="A-3 tab vt ff"),
    pytest.param("a\u00a0b", [n("a", "b")], id="A-3 no-break space"),
    pytest.param("a\u3000b\u2003c\u0085d", [n("a", "b", "c", "d")], id="A-3 other unicode space"),
    pytest.param(
        "skip those\r\nCR characters",
        [n("skip", "those"), n("CR", "characters")],
        id="A-4 CR outside quotes",
    ),
    pytest.param("a b\rc", [n("a", "bc")], id="A-4 lone CR is dropped"),
    pytest.param('c "x\r\ny"', [n("c", "x\ny")], id="A-5 CR inside quotes"),
    pytest.param("# comment\nfoobar # another comment", [n("foobar")], id="A-7 comments"),
    pytest.param("a b#c d", [n("a", "b")], id="A-8 comment mid-token"),
    pytest.param("a pass#word\nb", [n("a", "pass"), n("b")], id="A-8 pass#word"),
    pytest.param("a#b c\nd", [n("a"), n("d")], id="A-8 comment in a name"),
    pytest.param('a "b#c" d', [n("a", "b#c", "d")], id="A-9 hash in quotes"),
    pytest.param('a "quoted value" b', [n("a", "quoted value", "b")], id="A-10 quotes group"),
    pytest.param('a "x\ny" b', [n("a", "x\ny", "b")], id="A-10 quoted newline"),
    pytest.param(
        'A "quoted \\"value\\" inside" B',
        [n("A", 'quoted "value" inside', "B")],
        id="A-11 escaped quote",
    ),
    pytest.param('a "don\'t\\escape"', [n("a", "don't\\escape")], id="A-12 kept backslash"),
    pytest.param(
        'a "don\'t\\\\escape"', [n("a", "don't\\\\escape")], id="A-12 both backslashes kept"
    ),
    pytest.param('a "C:\\php\\php-cgi.exe"', [n("a", "C:\\php\\php-cgi.exe")], id="A-12 path"),
    pytest.param('a "\\\\" b', [n("a", "\\\\", "b")], id="A-12 double backslash closes"),
    pytest.param('a "\\"" b', [n("a", '"', "b")], id="A-12 escaped quote does not close"),
    pytest.param('empty "" string', [n("empty", "", "string")], id="A-13 empty quoted"),
    pytest.param('x a"b c"', [n("x", 'a"b', 'c"')], id="A-16 quote mid-token"),
    pytest.param('a "b"c', [n("a", "b", "c")], id="A-16 word after closing quote"),
    pytest.param("a {}", [n("a", block=[])], id="A-17 braces glued"),
    pytest.param("a { }", [n("a", block=[])], id="A-17 braces spaced"),
    pytest.param("a {\n}", [n("a", block=[])], id="A-17 braces on two lines"),
    pytest.param('a "{}"', [n("a", "{}")], id="A-17 quoted braces"),
    pytest.param("a b{}", [n("a", "b{}")], id="A-17 glued braces in an argument"),
    pytest.param('a "{"', [n("a", "{")], id="A-18 quoted open brace"),
    pytest.param('a "}"', [n("a", "}")], id="A-18 quoted close brace"),
    pytest.param('a "}" {\nb "{"\n}', [n("a", "}", block=[n("b", "{")])], id="A-18 in a block"),
    pytest.param("a { }", [n("a", block=[])], id="A-19 empty block"),
    pytest.param("a {\n\n}", [n("a", block=[])], id="A-19 empty block over lines"),
    pytest.param("a\nb {}", [n("a"), n("b", block=[])], id="A-20 no block vs empty block"),
    pytest.param("a a1 a2 { }", [n("a", "a1", "a2", block=[])], id="A-21 args and block"),
    pytest.param("a {\n  b b1\n  c c1\n}", [n("a", block=[n("b", "b1"), n("c", "c1")])], id="A-22"),
    pytest.param(
        "a {\n  a_child1 c1arg1\n  a_child2 c2arg1 c2arg2 }\nb",
        [n("a", block=[n("a_child1", "c1arg1"), n("a_child2", "c2arg1", "c2arg2")]), n("b")],
        id="A-23 brace ends the child line",
    ),
    pytest.param(
        "a {\n  b\n  c }",
        [n("a", block=[n("b"), n("c")])],
        id="A-23 brace after a bare child",
    ),
    pytest.param(
        "a a1 a2 { a_child1 c1arg1 c1arg2 }",
        [n("a", "a1", "a2", block=[n("a_child1", "c1arg1", "c1arg2")])],
        id="A-24 one-line block",
    ),
    pytest.param(
        "a {\n  b { c }\n  d {\n    e {}\n  }\n}",
        [n("a", block=[n("b", block=[n("c")]), n("d", block=[n("e", block=[])])])],
        id="A-24 nested blocks",
    ),
    pytest.param("a {\n} # note\nb", [n("a", block=[]), n("b")], id="A-30 comment after brace"),
    pytest.param(
        "a a1 a2 \\\na3 a4", [n("a", "a1", "a2", "a3", "a4")], id="A-32 stand-alone backslash"
    ),
    pytest.param(
        "a a1 \\\n\n# comment\n\n  a2\nb",
        [n("a", "a1", "a2"), n("b")],
        id="A-32 continuation skips blank and comment lines",
    ),
    pytest.param("a a1 \\", [n("a", "a1")], id="A-32 trailing backslash at EOF"),
    pytest.param("a a1 \\\n", [n("a", "a1")], id="A-32 trailing backslash before EOF"),
    pytest.param(
        "a a1 \\\n{\n  b\n}", [n("a", "a1", block=[n("b")])], id="A-32 brace on continued line"
    ),
    pytest.param("a \\\n b \\\n c", [n("a", "b", "c")], id="A-32 several continuations"),
    pytest.param(
        "a {\n  b b1 \\\n  b2 }\nc",
        [n("a", block=[n("b", "b1", "b2")]), n("c")],
        id="A-32 continuation in a block",
    ),
    pytest.param("a b\\\nc", [n("a", "b", "c")], id="A-33 argument ending in backslash"),
    pytest.param("a b\\\\\nc", [n("a", "b\\", "c")], id="A-33 only one backslash dropped"),
    pytest.param('a "b\\\\"\nc', [n("a", "b\\\\"), n("c")], id="A-33 quoted never continues"),
    pytest.param("a b\\ c", [n("a", "b\\", "c")], id="A-33 backslash mid-line stays"),
    pytest.param("a-b.c_d", [n("a-b.c_d")], id="A-34 valid punctuation"),
    pytest.param("ünï x", [n("ünï", "x")], id="A-34 unicode letters"),
    pytest.param("a1٣ x", [n("a1٣", "x")], id="A-34 unicode digits after the first"),
    pytest.param('"abc" x', [n("abc", "x")], id="A-34 quoted name"),
    pytest.param("", [], id="A-35 empty file"),
    pytest.param("# one\n   # two\n", [], id="A-35 comments only"),
    pytest.param("\n\n  \n\t\n", [], id="A-35 blank lines only"),
    pytest.param("\ufeffa b", [n("a", "b")], id="A-1 byte order mark skipped"),
]


@pytest.mark.parametrize("text, expected", TREES)
def test_tree(text, expected):
    assert shape(parse(text)) == expected


def test_empty_block_differs_from_no_block():
    """A-20: an empty block is an empty tuple; no block is None."""
    bare, empty = parse("a\na {}")
    assert bare.children is None and not bare.has_block
    assert empty.children == () and empty.has_block
    assert bare != empty


# --------------------------------------------------------------------------------------
# Positions: every node knows file, line and column of its first token

POSITIONS = [
    pytest.param("a", [("a", 1, 1)], id="A-1 position"),
    pytest.param(
        "skip those\r\nCR characters", [("skip", 1, 1), ("CR", 2, 1)], id="A-4 lines with CR"
    ),
    pytest.param(
        "a {\n  b b1\n  c c1\n}", [("a", 1, 1), ("b", 2, 3), ("c", 3, 3)], id="A-22 child lines"
    ),
    pytest.param(
        "a {\n  a_child1 c1arg1\n  a_child2 c2arg1 c2arg2 }\nb",
        [("a", 1, 1), ("a_child1", 2, 3), ("a_child2", 3, 3), ("b", 4, 1)],
        id="A-23 positions",
    ),
    pytest.param(
        "a a1 a2 { a_child1 c1arg1 c1arg2 }",
        [("a", 1, 1), ("a_child1", 1, 11)],
        id="A-24 all on line 1",
    ),
    pytest.param(
        'a "x\ny"\nb\n  c', [("a", 1, 1), ("b", 3, 1), ("c", 4, 3)], id="A-10 multi-line quote"
    ),
    pytest.param("a \\\n b\nc", [("a", 1, 1), ("c", 3, 1)], id="A-32 continued line numbers"),
]


def _flatten(nodes):
    for x in nodes:
        yield x
        yield from _flatten(x.block)


@pytest.mark.parametrize("text, expected", POSITIONS)
def test_positions(text, expected):
    nodes = list(_flatten(parse(text)))
    assert [(x.name, x.line, x.column) for x in nodes] == expected
    assert all(x.file == FILE for x in nodes)


def test_argument_positions():
    """A-2: each argument keeps its own line and column (A-32: across continuations too)."""
    (node,) = parse('a b  "c d" \\\n   e')
    assert node.args == ("b", "c d", "e")
    assert node.arg_positions == ((1, 3), (1, 6), (2, 4))


# --------------------------------------------------------------------------------------
# Syntax and name errors: message phrase and position

ERRORS = [
    pytest.param('a "unterminated\nb c', "1:3", "unterminated quoted string", id="A-15"),
    pytest.param('a\nb "x\\"', "2:3", "unterminated quoted string", id="A-12 escaped close"),
    pytest.param("a{", "1:1", "character not allowed in directive name: {", id="A-17 a{"),
    pytest.param("a{}", "1:1", "character not allowed in directive name: {", id="A-17 a{}"),
    pytest.param("a {", "1:3", "unexpected EOF when looking for }", id="A-26 one line"),
    pytest.param(
        "x\na {\n  b\n  c {\n  }\n", "2:3", "unexpected EOF when looking for }", id="A-26 lines"
    ),
    pytest.param(
        "a {\n  b {\n", "2:5", "unexpected EOF when looking for }", id="A-26 innermost brace"
    ),
    pytest.param("a }", "1:3", "unexpected }", id="A-27"),
    pytest.param("a b c }", "1:7", "unexpected }", id="A-27 after arguments"),
    pytest.param("a\n}", "2:1", "unexpected }", id="A-27 own line"),
    pytest.param("a {\n}\n}", "3:1", "unexpected }", id="A-27 after a closed block"),
    pytest.param(
        "a\n{\n}", "2:1", "Unexpected token '{', expecting 'block header'", id="A-28 own line"
    ),
    pytest.param("{", "1:1", "Unexpected token '{', expecting 'block header'", id="A-28 first"),
    pytest.param(
        "a {\n  b\n  {\n  }\n}",
        "3:3",
        "Unexpected token '{', expecting 'block header'",
        id="A-28 in a block",
    ),
    pytest.param("{}", "1:1", "Unexpected token '{', expecting 'block header'", id="A-28 {}"),
    pytest.param("a {\n} }", "2:1", "newline is required after closing brace", id="A-29 } }"),
    pytest.param("a { {", "1:5", "Unexpected token '{', expecting 'block header'", id="A-29 a { {"),
    pytest.param("}}", "1:1", "character not allowed in directive name: }", id="A-29 }}"),
    pytest.param("a {\n} b b1", "2:1", "newline is required after closing brace", id="A-30"),
    pytest.param(
        "a {\n  b { c } d\n}", "2:9", "newline is required after closing brace", id="A-30 nested"
    ),
    pytest.param("a { } {", "1:5", "newline is required after closing brace", id="A-30 {"),
    pytest.param(
        "a { b { c } }", "1:11", "newline is required after closing brace", id="A-30 one line"
    ),
    pytest.param("a-a4@%8", "1:1", "character not allowed in directive name: @", id="A-34 @"),
    pytest.param("x\n  1w", "2:3", "directive name cannot start with a digit", id="A-34 digit"),
    pytest.param('"a b" x', "1:1", "character not allowed in directive name", id="A-34 space"),
    pytest.param("-a", "1:1", "directive name must start with a letter", id="A-34 punct first"),
    pytest.param('"" x', "1:1", "empty directive name", id="A-34 empty quoted name"),
    pytest.param(
        "a {\n  b c\n  x@y\n}", "3:3", "character not allowed in directive name: @", id="A-34 child"
    ),
    pytest.param("\\\nb", "1:1", "character not allowed in directive name: \\", id="A-32 name"),
]


@pytest.mark.parametrize("text, where, phrase", ERRORS)
def test_error(text, where, phrase):
    err = error_of(text)
    assert phrase in err.message
    assert f"{err.line}:{err.column}" == where
    assert err.file == FILE
    assert str(err) == f"{FILE}:{where}: {err.message}"
    assert err.message[0].islower()


def test_nesting_limit():
    """A.2: 255 nested blocks parse; the 256th "{" is an error at that brace."""
    ok = "a {\n" * MAX_NESTING + "}\n" * MAX_NESTING
    (node,) = parse(ok)
    depth = 0
    while node.children:
        (node,) = node.children
        depth += 1
    assert depth == MAX_NESTING - 1
    err = error_of("a {\n" * (MAX_NESTING + 1) + "}\n" * (MAX_NESTING + 1))
    assert "nesting" in err.message
    assert (err.line, err.column) == (MAX_NESTING + 1, 3)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("a {\n" * 10_000, id="lines"),
        pytest.param("a { " * 10_000, id="one line"),
        pytest.param("a {\n" * 10_000 + "}\n" * 10_000, id="closed"),
    ],
)
def test_very_deep_nesting_is_an_error_not_a_crash(text):
    """A.2: 10,000 levels give the nesting error (no RecursionError)."""
    err = error_of(text)
    assert "nesting limit reached" in err.message


def test_parse_raw_keeps_declarations():
    """parse_raw gives the literal tree: snippets, macros, imports and placeholders stay."""
    raw = parse_raw("(s) { a }\n$(m) = x\nimport s\nb {env:X} $(m)", filename="r.conf")
    assert shape(raw) == [
        n("(s)", block=[n("a")]),
        n("$(m)", "=", "x"),
        n("import", "s"),
        n("b", "{env:X}", "$(m)"),
    ]
    assert raw[0].file == "r.conf" and raw[3].line == 4


def test_parse_raw_reports_syntax_errors():
    """A-26 through parse_raw."""
    with pytest.raises(ConfigError, match="unexpected EOF when looking for }"):
        parse_raw("a {", filename="r.conf")


# --------------------------------------------------------------------------------------
# A.3 Environment placeholders

ENV = [
    pytest.param(
        "a {env:TESTING_VARIABLE}",
        {"TESTING_VARIABLE": "ABCDEF"},
        [n("a", "ABCDEF")],
        id="A-36",
    ),
    pytest.param("a {env:TESTING_VARIABLE}", {}, [n("a", "")], id="A-37 unset"),
    pytest.param("a {env:V}", {"V": ""}, [n("a", "")], id="A-37 set to empty"),
    pytest.param("a x{env:V}y", {}, [n("a", "xy")], id="A-37 unset inside a word"),
    pytest.param(
        "a {env:TESTING_VARIABLE",
        {"TESTING_VARIABLE": "ABCDEF"},
        [n("a", "{env:TESTING_VARIABLE")],
        id="A-38 unterminated",
    ),
    pytest.param('a "{env:FOO} x"', {"FOO": "bar"}, [n("a", "bar x")], id="A-39 quoted"),
    pytest.param("a pre{env:FOO}post", {"FOO": "bar"}, [n("a", "prebarpost")], id="A-39 word"),
    pytest.param(
        "a {env:FOO}{env:FOO}-{env:BAR}",
        {"FOO": "x", "BAR": "y"},
        [n("a", "xx-y")],
        id="A-39 several in one word",
    ),
    pytest.param("a {env:foo}", {"FOO": "bar"}, [n("a", "")], id="A-41 case-sensitive"),
    pytest.param(
        "a {env:V}", {"V": "{env:W} $(m)", "W": "no"}, [n("a", "{env:W} $(m)")], id="A-39 literal"
    ),
    pytest.param("a {env:V}", {"V": "one two"}, [n("a", "one two")], id="A-39 one argument"),
    pytest.param("{env:FOO} x", {"FOO": "hostname"}, [n("hostname", "x")], id="A-44 name"),
    pytest.param(
        "a {\n  {env:FOO} x\n}", {"FOO": "b"}, [n("a", block=[n("b", "x")])], id="A-44 child name"
    ),
    pytest.param(
        "$(m) = {env:FOO}\na $(m)", {"FOO": "bar"}, [n("a", "bar")], id="A-39 through a macro"
    ),
    pytest.param(
        "(s) {\n  a {env:FOO}\n}\nimport s",
        {"FOO": "bar"},
        [n("a", "bar")],
        id="A-39 in a snippet",
    ),
]


@pytest.mark.parametrize("text, env, expected", ENV)
def test_environment(text, env, expected):
    assert shape(parse(text, env=env)) == expected


def test_environment_defaults_to_os_environ(monkeypatch):
    """A-36: without an env mapping the process environment is used."""
    monkeypatch.setenv("MADDYLITE_TEST_VARIABLE", "from-os")
    nodes = parse_string("a {env:MADDYLITE_TEST_VARIABLE}")
    assert shape(nodes) == [n("a", "from-os")]


@pytest.mark.parametrize(
    "env, phrase",
    [
        pytest.param({}, "empty directive name", id="A-44 unset name"),
        pytest.param({"FOO": "1x"}, "directive name cannot start with a digit", id="A-44 digit"),
        pytest.param({"FOO": "a b"}, "character not allowed in directive name", id="A-44 space"),
    ],
)
def test_environment_name_is_validated_after_expansion(env, phrase):
    """A-44: the name is validated after expansion, at the name's position."""
    err = error_of("x\n  {env:FOO} x", env=env)
    assert phrase in err.message
    assert (err.line, err.column) == (2, 3)


def test_environment_not_expanded_in_import_paths(files):
    """A-44, Decisions: placeholders are expanded last, so not in import paths."""
    base = files({"real.conf": "a\n"})
    err = error_of("import {env:F}", env={"F": "real"}, base_dir=str(base))
    assert "unknown import: {env:F}" in err.message


# --------------------------------------------------------------------------------------
# A.4 Snippets

SNIPPETS = [
    pytest.param("(foo) { a }\nimport foo", [n("a")], id="A-46 declare and import"),
    pytest.param("(foo) { a }", [], id="A-46 declaration makes no directive"),
    pytest.param(
        "(foo) {\n  a 1\n  b { c }\n}\nx {\n  import foo\n  y\n}",
        [n("x", block=[n("a", "1"), n("b", block=[n("c")]), n("y")])],
        id="A-47 import inside a block",
    ),
    pytest.param("import foo\n(foo) { a }", [n("a")], id="A-48 used before declared"),
    pytest.param(
        "x {\n  import foo\n}\n(foo) { a }", [n("x", block=[n("a")])], id="A-48 before, in block"
    ),
    pytest.param(
        "(foo) {\n  import bar\n  f\n}\n(bar) { b }\nimport foo",
        [n("b"), n("f")],
        id="A-48 snippet imports snippet",
    ),
    pytest.param(
        "import foo\n(foo) { import bar }\n(bar) { b }", [n("b")], id="A-48 forward chain"
    ),
    pytest.param("import foo\nimport foo\n(foo) { a }", [n("a"), n("a")], id="A-48 twice"),
    pytest.param("(foo) { a }\n(foo) { b }\nimport foo", [n("b")], id="A-53 later wins"),
    pytest.param(
        "(foo) { a }\nimport foo\n(foo) { b }", [n("b")], id="A-53 later wins in the whole file"
    ),
    pytest.param("(foo)\nimport foo\nx", [n("x")], id="A-46 snippet without a block"),
]


@pytest.mark.parametrize("text, expected", SNIPPETS)
def test_snippets(text, expected):
    assert shape(parse(text)) == expected


def test_snippet_directives_keep_declaration_positions():
    """A-47: spliced directives keep the file and lines of the snippet declaration."""
    text = "(foo) {\n  a\n  b {\n    c\n  }\n}\nx {\n  import foo\n}"
    (x,) = parse(text)
    a, b = x.block
    assert (a.line, a.column, b.line, b.block[0].line) == (2, 3, 3, 4)
    assert a.file == b.file == FILE


SNIPPET_ERRORS = [
    pytest.param("import foo", "1:1", "unknown import: foo", id="A-49"),
    pytest.param("x {\n  import foo\n}", "2:3", "unknown import: foo", id="A-49 in a block"),
    pytest.param(
        "(foo) {\n  import foo\n}\nimport foo", "2:3", "import cycle: foo -> foo", id="A-50 self"
    ),
    pytest.param(
        "(foo) { import bar }\n(bar) { import foo }\nimport foo",
        "2:9",
        "import cycle: foo -> bar -> foo",
        id="A-50 through another snippet",
    ),
    pytest.param(
        "import foo\n(foo) { import foo }",
        "2:9",
        "import cycle: foo -> foo",
        id="A-50 used before declared",
    ),
    pytest.param("(foo) a b c { }", "1:1", "snippet declarations can't have arguments", id="A-51"),
    pytest.param(
        "a {\n  (foo) { b }\n}",
        "2:3",
        "snippet declarations are only allowed at top-level",
        id="A-52",
    ),
    pytest.param(
        "(foo) {\n  (bar) { b }\n}",
        "2:3",
        "snippet declarations are only allowed at top-level",
        id="A-52 in a snippet",
    ),
    pytest.param("import", "1:1", "import directive requires exactly 1 argument", id="A-54 none"),
    pytest.param(
        "x\nimport a b", "2:1", "import directive requires exactly 1 argument", id="A-54 two"
    ),
    pytest.param(
        "$(two) = a b\nimport $(two)",
        "2:1",
        "import directive requires exactly 1 argument",
        id="A-54 after macro expansion",
    ),
]


@pytest.mark.parametrize("text, where, phrase", SNIPPET_ERRORS)
def test_snippet_errors(text, where, phrase):
    err = error_of(text)
    assert phrase in err.message
    assert f"{err.line}:{err.column}" == where


def test_snippet_never_imported_is_not_expanded():
    """A-50: a self-importing snippet that nobody imports is no error."""
    assert parse("(foo) { import foo }\nx") and True


# --------------------------------------------------------------------------------------
# A.4 File imports


def test_import_file_relative_to_the_importing_file(files):
    """A-55: relative to the importing file's folder; nested imports to their own file."""
    base = files(
        {
            "main.conf": "top\nimport sub/one\n",
            "sub/one.conf": "one\nimport two\n",
            "sub/two.conf": "two\nimport ../three\n",
            "three.conf": "three",
        }
    )
    nodes = parse_file(str(base / "main.conf"))
    assert shape(nodes) == [n("top"), n("one"), n("two"), n("three")]
    assert [x.file for x in nodes] == [
        str(base / "main.conf"),
        str(base / "sub" / "one.conf"),
        str(base / "sub" / "two.conf"),
        str(base / "three.conf"),
    ]
    assert [x.line for x in nodes] == [1, 1, 1, 1]


def test_import_file_splices_in_place(files):
    """A-55: the file's directives replace the import, inside blocks too."""
    base = files({"inc.conf": "a 1\nb {\n  c\n}\n"})
    nodes = parse("x {\n  import inc\n  y\n}\nz", base_dir=str(base))
    assert shape(nodes) == [
        n("x", block=[n("a", "1"), n("b", block=[n("c")]), n("y")]),
        n("z"),
    ]


def test_import_absolute_path(files):
    """A-55: an absolute path is used as it is."""
    base = files({"abs.conf": "from_abs"})
    assert shape(parse(f'import "{base / "abs.conf"}"')) == [n("from_abs")]


@pytest.mark.parametrize(
    "tree, expected",
    [
        pytest.param({"inc": "exact", "inc.conf": "suffixed"}, "exact", id="A-55 exact wins"),
        pytest.param({"inc.conf": "suffixed"}, "suffixed", id="A-55 .conf fallback"),
        pytest.param({"inc": "exact"}, "exact", id="A-55 exact only"),
    ],
)
def test_import_name_resolution(files, tree, expected):
    base = files(tree)
    assert shape(parse("import inc", base_dir=str(base))) == [n(expected)]


def test_parse_string_imports_relative_to_filename_folder(files):
    """A-55: parse_string without base_dir resolves against the folder of filename."""
    base = files({"inc.conf": "included"})
    nodes = parse_string("import inc", filename=str(base / "main.conf"), env={})
    assert shape(nodes) == [n("included")]


def test_snippet_wins_over_file(files):
    """A-56: a snippet wins over a file of the same name."""
    base = files({"foo.conf": "from_file", "foo": "from_file"})
    assert shape(parse("(foo) { from_snippet }\nimport foo", base_dir=str(base))) == [
        n("from_snippet")
    ]
    assert shape(parse("import foo\n(foo) { from_snippet }", base_dir=str(base))) == [
        n("from_snippet")
    ]


def test_snippets_from_imported_file(files):
    """A-57: snippets declared in an imported file are usable after the import (A-47)."""
    base = files({"snips.conf": "(common) {\n  hostname mx.example.org\n}\nplain\n"})
    nodes = parse("import snips\nx {\n  import common\n}", base_dir=str(base))
    assert shape(nodes) == [n("plain"), n("x", block=[n("hostname", "mx.example.org")])]
    hostname = nodes[1].block[0]
    assert (hostname.file, hostname.line) == (str(base / "snips.conf"), 2)


def test_snippet_from_imported_file_not_visible_before_import(files):
    """A-57: before the import the snippet is unknown."""
    base = files({"snips.conf": "(common) { a }"})
    err = error_of("import common\nimport snips", base_dir=str(base))
    assert "unknown import: common" in err.message


def test_no_glob_expansion(files):
    """A-58: `import conf.d/*.conf` is not a glob."""
    base = files({"conf.d/a.conf": "a"})
    err = error_of("import conf.d/*.conf", base_dir=str(base))
    assert err.message == "unknown import: conf.d/*.conf"
    assert (err.line, err.column) == (1, 1)


def test_literal_star_file_name(files):
    """A-58: a file whose name really is `*.conf` is imported."""
    base = files({"conf.d/*.conf": "star"})
    assert shape(parse("import conf.d/*.conf", base_dir=str(base))) == [n("star")]


def test_file_import_cycle(files):
    """A-59: a.conf → b.conf → a.conf is an error at the import closing the cycle."""
    base = files({"a.conf": "x\nimport b.conf\n", "b.conf": "y\n  import a\n"})
    with pytest.raises(ConfigError) as info:
        parse_file(str(base / "a.conf"))
    err = info.value
    assert "import cycle: a.conf -> b.conf -> a.conf" in err.message
    assert (err.file, err.line, err.column) == (str(base / "b.conf"), 2, 3)


def test_file_self_import(files):
    """A-59: a file that imports itself."""
    base = files({"self.conf": "a\nimport self\n"})
    with pytest.raises(ConfigError) as info:
        parse_file(str(base / "self.conf"))
    assert "import cycle: self.conf -> self.conf" in info.value.message
    assert info.value.line == 2


def test_file_imported_twice_is_no_cycle(files):
    """A-59: importing the same file twice, one after the other, is fine."""
    base = files({"common.conf": "c"})
    nodes = parse("import common\nimport common\nx {\n  import common\n}", base_dir=str(base))
    assert shape(nodes) == [n("c"), n("c"), n("x", block=[n("c")])]


def test_file_import_depth_limit(files):
    """A-59: file imports nested more than 256 deep hit the limit, naming the chain."""
    count = MAX_IMPORT_DEPTH + 5
    tree = {f"f{i}.conf": f"d{i}\nimport f{i + 1}\n" for i in range(count)}
    tree[f"f{count}.conf"] = "end"
    base = files(tree)
    with pytest.raises(ConfigError) as info:
        parse_file(str(base / "f0.conf"))
    err = info.value
    assert "hit import expansion limit" in err.message
    assert "f0.conf -> f1.conf -> f2.conf" in err.message
    assert err.file == str(base / f"f{MAX_IMPORT_DEPTH}.conf") and err.line == 2


def test_file_import_depth_at_the_limit(files):
    """A-59: exactly 256 nested imports are allowed."""
    count = MAX_IMPORT_DEPTH
    tree = {f"f{i}.conf": f"import f{i + 1}\n" for i in range(count)}
    tree[f"f{count}.conf"] = "end"
    base = files(tree)
    assert shape(parse_file(str(base / "f0.conf"))) == [n("end")]


def test_snippet_import_depth_limit():
    """A-59: snippet imports nested more than 256 deep hit the limit, naming the chain."""
    decls = "\n".join(f"(s{i}) {{ import s{i + 1} }}" for i in range(MAX_IMPORT_DEPTH + 1))
    text = decls + f"\n(s{MAX_IMPORT_DEPTH + 1}) {{ end }}\n"
    assert shape(parse(text + "import s2")) == [n("end")]  # s2 .. s257: 256 imports
    err = error_of(text + "import s1")  # s1 .. s257: 257 imports
    assert "hit import expansion limit" in err.message
    assert "s1 -> s2 -> s3" in err.message


def test_imports_inside_blocks_respect_the_nesting_limit(files):
    """A.2/A-59: nesting is counted across imported files too, without a RecursionError."""
    count = 300
    tree = {f"d{i}.conf": f"b{i} {{\n  import d{i + 1}\n}}\n" for i in range(count)}
    tree[f"d{count}.conf"] = "end"
    base = files(tree)
    with pytest.raises(ConfigError) as info:
        parse_file(str(base / "d0.conf"))
    assert "nesting limit reached" in info.value.message
    assert info.value.file == str(base / f"d{MAX_NESTING}.conf")


@pytest.mark.parametrize("tree", [{"adir/x.conf": "x"}, {"adir/x.conf": "x", "adir.conf": "suffixed"}],
                         ids=["A-60", "A-55-A-60 exact name wins over .conf"])
def test_import_directory_is_an_error(files, tree):
    """A-60: importing a directory is an error at the import; A-55: the exact name wins, so
    a folder is that error even with `<name>.conf` beside it."""
    base = files(tree)
    err = error_of("a\nimport adir", base_dir=str(base))
    assert "adir is a directory" in err.message
    assert (err.line, err.column) == (2, 1)


def test_import_error_inside_imported_file_has_its_position(files):
    """A-55, A-15: errors in an imported file name that file."""
    base = files({"bad.conf": 'ok\nx "unterminated\n'})
    err = error_of("import bad", base_dir=str(base))
    assert (err.file, err.line, err.column) == (str(base / "bad.conf"), 2, 3)


def test_import_of_invalid_utf8_file(files, tmp_path):
    """A.1: a file that is not UTF-8 is a positioned error, not a UnicodeDecodeError."""
    base = files({})
    (base / "latin.conf").write_bytes(b"ok\nname caf\xe9\n")
    err = error_of("import latin", base_dir=str(base))
    assert (err.file, err.line, err.column) == (str(base / "latin.conf"), 2, 9)


def test_parse_file_missing():
    """parse_file: an unreadable file is a positioned ConfigError."""
    with pytest.raises(ConfigError) as info:
        parse_file("/nonexistent/maddylite.conf")
    assert info.value.positioned
    assert "cannot read" in info.value.message


def test_parse_file_bom_and_crlf(tmp_path):
    """A-4, A-5: a file saved with BOM and CRLF line ends reads like its LF version."""
    path = tmp_path / "crlf.conf"
    path.write_bytes(b'\xef\xbb\xbfa "x\r\ny"\r\nb {\r\n  c\r\n}\r\n')
    assert shape(parse_file(str(path))) == [n("a", "x\ny"), n("b", block=[n("c")])]


# --------------------------------------------------------------------------------------
# A.5 Macros

MACROS = [
    pytest.param("$(foo) = bar\ndir $(foo)", [n("dir", "bar")], id="A-62 single"),
    pytest.param("$(foo) = bar baz\ndir $(foo)", [n("dir", "bar", "baz")], id="A-62 multiple"),
    pytest.param(
        "$(foo) = bar\ndir aaa/$(foo)/bbb", [n("dir", "aaa/bar/bbb")], id="A-62 inside a word"
    ),
    pytest.param('$(foo) = bar\ndir "$(foo) x"', [n("dir", "bar x")], id="A-62 inside quotes"),
    pytest.param(
        "$(foo) = bar\nx {\n  dir $(foo)\n}",
        [n("x", block=[n("dir", "bar")])],
        id="A-62 inside a block",
    ),
    pytest.param("dir $(foo)", [n("dir")], id="A-64 undefined whole argument"),
    pytest.param("dir a $(foo) b", [n("dir", "a", "b")], id="A-64 undefined between"),
    pytest.param("dir z$(u)", [n("dir", "z")], id="A-64 undefined inside a word"),
    pytest.param("$(a) = 1\n$(b) = $(a) 2\nx $(b)", [n("x", "1", "2")], id="A-66 earlier macro"),
    pytest.param("$(a) = 1\n$(a) = 2\nx $(a)", [n("x", "2")], id="A-66 redefinition"),
    pytest.param("x $(a)\n$(a) = 1\ny $(a)", [n("x"), n("y", "1")], id="A-67 only after"),
    pytest.param(
        "$(m) = x\n(s) { a $(m) }\nimport s", [n("a", "x")], id="A-66 macro before snippet"
    ),
    pytest.param("(s) { a $(m) }\n$(m) = x\nimport s", [n("a")], id="A-66 macro after snippet"),
    pytest.param(
        "$(m) = x\n(s) { a $(m) }\n$(m) = y\nimport s",
        [n("a", "x")],
        id="A-66 value at declaration",
    ),
    pytest.param(
        "import s\n$(m) = x\n(s) { a $(m) }",
        [n("a", "x")],
        id="A-66 macro before declaration, import before both",
    ),
    pytest.param("$(m) = x\nimport s\n(s) { a $(m) }", [n("a", "x")], id="A-66 use first"),
    pytest.param("$(f) = s\n(s) { a }\nimport $(f)", [n("a")], id="A-67 macro in a snippet import"),
]


@pytest.mark.parametrize("text, expected", MACROS)
def test_macros(text, expected):
    assert shape(parse(text)) == expected


def test_macro_argument_positions():
    """A-62: values of a multi-value macro take the position of the macro reference."""
    (node,) = parse("$(m) = a b\ndir x $(m)")
    assert node.args == ("x", "a", "b")
    assert node.arg_positions == ((2, 5), (2, 7), (2, 7))


MACRO_ERRORS = [
    pytest.param(
        "$(foo) = bar baz\ndir aaa/$(foo)",
        "2:5",
        "can't expand macro with multiple arguments inside a string",
        id="A-63",
    ),
    pytest.param(
        "$(foo) = bar baz\n(s) { dir x$(foo) }",
        "2:11",
        "can't expand macro with multiple arguments inside a string",
        id="A-63 in a snippet body",
    ),
    pytest.param("$(foo) =", "1:1", "at least 2 arguments are required", id="A-65 no value"),
    pytest.param("$(foo)", "1:1", "at least 2 arguments are required", id="A-65 bare"),
    pytest.param("$(foo) a b", "1:1", "missing = in macro declaration", id="A-65 missing ="),
    pytest.param("x\n$(foo) 1", "2:1", "at least 2 arguments are required", id="A-65 $(foo) 1"),
    pytest.param(
        "a {\n  $(foo) = 1\n}",
        "2:3",
        "macro declarations are only allowed at top-level",
        id="A-65 in a block",
    ),
    pytest.param(
        "(s) {\n  $(foo) = 1\n}",
        "2:3",
        "macro declarations are only allowed at top-level",
        id="A-65 in a snippet",
    ),
    pytest.param("$(foo = 1", "1:1", "macro name must end with )", id="A-65 bad name"),
    pytest.param("$() = 1", "1:1", "empty macro name", id="A-65 empty name"),
    pytest.param("$(m) = 1 {\n}", "1:1", "macro declarations can't have a block", id="A-65 block"),
]


@pytest.mark.parametrize("text, where, phrase", MACRO_ERRORS)
def test_macro_errors(text, where, phrase):
    err = error_of(text)
    assert phrase in err.message
    assert f"{err.line}:{err.column}" == where


def test_macros_reach_imported_files(files):
    """A-67: a macro applies to files imported after its definition."""
    base = files({"sub.conf": "a $(m)\n"})
    assert shape(parse("$(m) = x\nimport sub", base_dir=str(base))) == [n("a", "x")]
    assert shape(parse("import sub\n$(m) = x", base_dir=str(base))) == [n("a")]


def test_macros_in_import_paths(files):
    """A-67: `$(f) = sub/c` then `import $(f)` imports sub/c or sub/c.conf."""
    base = files({"sub/c.conf": "from_c"})
    assert shape(parse("$(f) = sub/c\nimport $(f)", base_dir=str(base))) == [n("from_c")]
    base = files({"sub/d": "from_d"})
    assert shape(parse("$(f) = sub/d\nimport $(f)", base_dir=str(base))) == [n("from_d")]


def test_macros_from_imported_file_apply_afterwards(files):
    """A-67: a macro defined in an imported file applies to the rest of the importer."""
    base = files({"defs.conf": "$(host) = mx.example.org\n", "late.conf": "late $(host)\n"})
    text = "before $(host)\nimport defs\nafter $(host)\nx {\n  import late\n}"
    assert shape(parse(text, base_dir=str(base))) == [
        n("before"),
        n("after", "mx.example.org"),
        n("x", block=[n("late", "mx.example.org")]),
    ]


def test_macros_in_file_imported_inside_a_block(files):
    """A-67: a file's own top level may define macros, wherever the file is imported."""
    base = files({"defs.conf": "$(v) = 1\nd $(v)\n"})
    text = "x {\n  import defs\n  y $(v)\n}\nz $(v)"
    assert shape(parse(text, base_dir=str(base))) == [
        n("x", block=[n("d", "1"), n("y", "1")]),
        n("z", "1"),
    ]


def test_snippet_body_macros_from_its_own_file(files):
    """A-66, A-67: a snippet in an imported file uses the macros known at its declaration."""
    base = files({"snips.conf": "(s) { a $(m) }\n$(m) = late\n(t) { b $(m) }\n"})
    text = "$(m) = early\nimport snips\nimport s\nimport t"
    assert shape(parse(text, base_dir=str(base))) == [n("a", "early"), n("b", "late")]


# --------------------------------------------------------------------------------------
# API details


def test_result_is_a_list_of_frozen_nodes():
    """parse_string returns a list of ConfigNode with tuple children."""
    nodes = parse("a {\n  b\n}")
    assert isinstance(nodes, list)
    assert all(isinstance(x, ConfigNode) for x in _flatten(nodes))
    assert isinstance(nodes[0].children, tuple)


def test_parse_file_uses_the_path_as_given(files, monkeypatch):
    """Node files are the path as it was read (relative stays relative)."""
    base = files({"conf/main.conf": "a\nimport inc\n", "conf/inc.conf": "b\n"})
    monkeypatch.chdir(base)
    nodes = parse_file("conf/main.conf", env={})
    assert [x.file for x in nodes] == ["conf/main.conf", os.path.join("conf", "inc.conf")]


def test_rendering():
    """ConfigNode.render shows a parsed tree in the notation of behaviour.md."""
    (node,) = parse("a a1 {\n  b b1 b2\n}")
    assert node.render() == "a [a1] {\n  b [b1, b2]\n}"
