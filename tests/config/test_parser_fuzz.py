"""Property tests for maddylite/config/parser.py.

Whatever the input, the parser returns a list of ConfigNode or raises a ConfigError that
carries a file and a line: never a Lark exception, a RecursionError or anything else. A
tree written out in the language reads back as the same tree.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maddylite.config.errors import ConfigError
from maddylite.config.nodes import ConfigNode
from maddylite.config.parser import parse_raw, parse_string

FILE = "fuzz.conf"
ENV = {"FOO": "bar", "NAME": "hostname", "SPACE": "a b"}

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Fragments that exercise every lexical and structural rule of A.1 .. A.5.
FRAGMENTS = [
    "a",
    "b1",
    "target.remote",
    "ünï",
    "1w",
    "x@y",
    " ",
    "  ",
    "\t",
    "\x0b",
    "\xa0",
    "\n",
    "\n",
    "\r\n",
    "\r",
    "{",
    "}",
    "{}",
    " { ",
    " }",
    '"',
    '"q s"',
    '\\"',
    "\\",
    " \\\n",
    "\\\\",
    "#",
    "# c\n",
    "import",
    "import s",
    "import missing",
    "(s)",
    "(s) {",
    "$(m)",
    "$(m) =",
    "$(m) = v w",
    "x$(m)y",
    "=",
    "{env:FOO}",
    "{env:NAME}",
    "{env:",
    "{env:SPACE}",
    "\ufeff",
]

SAMPLE = """\
$(host) = mx.example.org
(common) {
  debug yes
}
hostname $(host)
target.remote outbound {
  import common
  mx_auth { dane mtasts }
  limits {
    all rate 10 1s
  }
  greeting "hello \\"world\\"" # comment
  continued a \\
    b c
}
"""


@pytest.fixture(scope="module")
def empty_dir(tmp_path_factory):
    """empty_dir is where relative imports of fuzzed input look (and find nothing)."""
    return str(tmp_path_factory.mktemp("fuzz-imports"))


def check(text: str, base_dir: str) -> None:
    """check parses text and asserts the outcome is a node list or a positioned error."""
    try:
        nodes = parse_string(text, filename=FILE, env=ENV, base_dir=base_dir)
    except ConfigError as err:
        assert err.file == FILE, str(err)
        assert err.line is not None and err.line >= 1, str(err)
        assert err.column is not None and err.column >= 1, str(err)
        assert err.message and not err.message[0].isupper(), str(err)
        return
    assert isinstance(nodes, list)
    stack = list(nodes)
    while stack:
        node = stack.pop()
        assert isinstance(node, ConfigNode)
        assert node.file == FILE and node.line >= 1 and node.column >= 1
        assert all(isinstance(a, str) for a in node.args)
        assert len(node.arg_positions) == len(node.args)
        if node.children is not None:
            assert isinstance(node.children, tuple)
            stack.extend(node.children)


@FUZZ
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join))
def test_fragment_soup(empty_dir, text):
    check(text, empty_dir)


@FUZZ
@given(st.text(max_size=200))
def test_random_text(empty_dir, text):
    check(text, empty_dir)


@st.composite
def mutated(draw) -> str:
    """mutated applies a few random edits (delete, insert, duplicate) to SAMPLE."""
    text = SAMPLE
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 12)))
        edit = draw(st.sampled_from(["delete", "insert", "duplicate"]))
        if edit == "delete":
            text = text[:i] + text[j:]
        elif edit == "insert":
            text = text[:i] + draw(st.sampled_from(FRAGMENTS)) + text[i:]
        else:
            text = text[:j] + text[i:j] + text[j:]
    return text


@FUZZ
@given(mutated())
def test_mutated_config(empty_dir, text):
    check(text, empty_dir)


@FUZZ
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join))
def test_parse_raw_fragment_soup(text):
    try:
        nodes = parse_raw(text, filename=FILE)
    except ConfigError as err:
        assert err.file == FILE and err.line is not None and err.line >= 1
        return
    assert all(isinstance(node, ConfigNode) for node in nodes)


# --------------------------------------------------------------------------------------
# Round trip: tree → text → the same tree

NAMES = st.from_regex(r"[a-zA-Zé][a-zA-Z0-9_.\-é]{0,8}", fullmatch=True).filter(
    lambda s: s != "import"
)
# Anything a quoted string can hold literally: no backslash (it escapes), no CR (dropped),
# no "$(" or "{env:" (expanded).
ARG_CHARS = st.sampled_from(list('ab z09#{}"\n\t\xa0-_.:/@é'))
ARGS = st.text(ARG_CHARS, max_size=8).filter(lambda s: "$(" not in s)


def trees(depth: int = 3):
    leaf = st.tuples(NAMES, st.lists(ARGS, max_size=3), st.none())
    if depth == 0:
        return leaf
    inner = st.tuples(NAMES, st.lists(ARGS, max_size=3), st.lists(trees(depth - 1), max_size=3))
    return st.one_of(leaf, inner)


def write(nodes, indent: int = 0) -> str:
    """write renders shapes as configuration text, quoting every argument."""
    out = []
    for name, args, children in nodes:
        quoted = "".join(' "' + a.replace('"', '\\"') + '"' for a in args)
        line = " " * indent + name + quoted
        if children is None:
            out.append(line + "\n")
        else:
            out.append(line + " {\n" + write(children, indent + 2) + " " * indent + "}\n")
    return "".join(out)


def shape(nodes):
    return [
        (x.name, list(x.args), None if x.children is None else shape(x.children)) for x in nodes
    ]


def normal(nodes):
    return [(n, list(a), None if c is None else normal(c)) for n, a, c in nodes]


@FUZZ
@given(st.lists(trees(), max_size=5))
def test_round_trip(empty_dir, nodes):
    text = write(nodes)
    assert shape(parse_string(text, filename=FILE, env={}, base_dir=empty_dir)) == normal(nodes)
