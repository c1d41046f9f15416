"""Modules, references and globals (behaviour.md A-77..A-104) through the real builder."""

import subprocess
import sys
import textwrap

import pytest

from maddylite.config.directives import Directive, ModuleRef
from maddylite.config.errors import ConfigError
from maddylite.interfaces import DeliveryTarget
from maddylite.registry import MODULES, ModuleBase, register

SMTP = "smtp tcp://127.0.0.1:0 {\n  deliver_to dummy\n}\n"


if "test.forward" not in MODULES:

    @register("test.forward")
    class Forward(ModuleBase):
        """Forward is a test-only target that references another target (for cycles)."""

        roles = (DeliveryTarget,)
        directives = (Directive(name="target", type=ModuleRef(role=DeliveryTarget, namespace="target"), required=True, help="next hop"),)

        def start_delivery(self, meta, mail_from):
            """start_delivery forwards."""
            return self.settings.target.start_delivery(meta, mail_from)


def err_of(build, text, **kw):
    with pytest.raises(ConfigError) as e:
        build(text, **kw)
    return e.value


def test_duplicate_directive_A_77(build_config):
    """A-77: the second occurrence is the error, globals included; limits rules may repeat."""
    e = err_of(build_config, "target.remote r {\n hostname a\n hostname b\n}\n")
    assert "duplicate directive: hostname" in str(e) and e.line == 5  # 2 lines of state/runtime dirs first
    e = err_of(build_config, "hostname a\nhostname b\n")
    assert "duplicate directive: hostname" in str(e) and e.line == 4
    rt = build_config("limits l {\n all rate 20 1s\n all concurrency 10\n}\n")
    assert len(rt.instance("l").rules) == 2


def test_unknown_directive_A_78(build_config):
    """A-78: unknown directive inside a module block."""
    e = err_of(build_config, "target.remote {\n hostname x\n conn_reuse 5\n}\n")
    assert str(e).endswith("unexpected directive: conn_reuse")
    assert (e.line, e.column) == (5, 2)


def test_named_instance_and_reference_A_79(build_config):
    """A-79: `target.remote outbound` is referenced as &outbound."""
    rt = build_config("hostname h\ntarget.remote outbound { }\nsmtp tcp://127.0.0.1:0 {\n deliver_to &outbound\n}\n", require_endpoint=True)
    smtp = [m for m in rt.modules if m.mod_name == "smtp"][0]
    assert smtp.target is rt.instance("outbound")


def test_instance_name_defaults_to_module_name_A_80(build_config):
    """A-80: a block without a name is named after its module; a second one is a duplicate."""
    rt = build_config("hostname h\ntarget.remote { }\nsmtp tcp://127.0.0.1:0 {\n deliver_to &target.remote\n}\n", require_endpoint=True)
    assert rt.instance("target.remote").mod_name == "target.remote"
    e = err_of(build_config, "hostname h\ntarget.remote { }\ntarget.remote { }\n")
    assert "config block named target.remote already exists" in str(e) and e.line == 5


def test_aliases_A_81(build_config):
    """A-81: extra names are aliases of one instance; a repeated alias is a duplicate."""
    rt = build_config(
        "hostname h\ntarget.remote a b { }\n"
        "smtp tcp://127.0.0.1:0 {\n deliver_to &a\n}\nsmtp tcp://127.0.0.1:1 {\n deliver_to &b\n}\n",
        require_endpoint=True,
    )
    eps = [m for m in rt.modules if m.mod_name == "smtp"]
    assert eps[0].target is eps[1].target
    e = err_of(build_config, "hostname h\ntarget.remote a { }\ntarget.remote b a { }\n")
    assert "config block named a already exists" in str(e)


def test_unknown_top_level_word_A_83(build_config):
    """A-83: unknown top-level word."""
    e = err_of(build_config, "frobnicate x\n")
    assert str(e).endswith("unknown module or global directive: frobnicate") and (e.line, e.column) == (3, 1)


def test_shared_instances_A_85(build_config):
    """A-85: two remotes with &strict and &x share one policy group and one limits object."""
    rt = build_config(
        "hostname h\nmx_auth strict { dnssec }\nlimits x { all concurrency 5 }\n"
        "target.remote r1 {\n mx_auth &strict\n limits &x\n}\ntarget.remote r2 {\n mx_auth &strict\n limits &x\n}\n"
        "smtp tcp://127.0.0.1:0 {\n deliver_to &r1\n}\nsmtp tcp://127.0.0.1:1 {\n deliver_to &r2\n}\n",
        require_endpoint=True,
    )
    r1, r2 = rt.instance("r1"), rt.instance("r2")
    assert r1.mx_auth is r2.mx_auth is rt.instance("strict")
    assert r1.limits is r2.limits is rt.instance("x")
    assert sum(1 for m in rt.modules if m.mod_name == "mx_auth") == 1


def test_inline_blocks_are_private_A_86(build_config):
    """A-86: inline blocks create separate instances."""
    rt = build_config("hostname h\ntarget.remote r1 {\n mx_auth { dnssec }\n}\ntarget.remote r2 {\n mx_auth { dnssec }\n}\n")
    assert rt.instance("r1").mx_auth is not rt.instance("r2").mx_auth
    rt = build_config("hostname h\nsmtp tcp://127.0.0.1:0 {\n deliver_to remote { }\n}\nsmtp tcp://127.0.0.1:1 {\n deliver_to remote { }\n}\n")
    eps = [m for m in rt.modules if m.mod_name == "smtp"]
    assert eps[0].target is not eps[1].target
    assert eps[0].target.pool is not eps[1].target.pool


@pytest.mark.parametrize("ref", ["&x { }", "&x extra"])
def test_reference_with_block_or_args_A_87(build_config, ref):
    """A-87: a reference takes exactly one argument and no block."""
    e = err_of(build_config, f"hostname h\nmx_auth x {{ dnssec }}\ntarget.remote r {{\n mx_auth {ref}\n}}\n")
    assert "exactly one argument is required to use existing config block" in str(e) and e.line == 6


def test_unknown_reference_A_88(build_config):
    """A-88: the referencing directive is named, with the instance."""
    e = err_of(build_config, "hostname h\ntarget.remote r {\n mx_auth &nope\n}\n")
    assert "no such instance registered: nope" in str(e) and (e.line, e.column) == (5, 2)


def test_wrong_kind_reference_A_89(build_config):
    """A-89: a limits block where an mx_auth group is expected, and the reverse kind."""
    e = err_of(build_config, "hostname h\nlimits lim { all rate 1 }\ntarget.remote r {\n mx_auth &lim\n}\n")
    assert "lim" in str(e) and "mx_auth group" in str(e) and e.line == 6
    e = err_of(build_config, "hostname h\nmx_auth strict { dnssec }\nsmtp tcp://127.0.0.1:0 {\n deliver_to &strict\n}\n")
    assert "strict" in str(e) and "delivery target" in str(e) and e.line == 6


def test_inline_arguments_A_91(build_config):
    """A-91: an inline remote takes no arguments."""
    e = err_of(build_config, "hostname h\nsmtp tcp://127.0.0.1:0 {\n deliver_to remote foo\n}\n")
    assert "remote: inline arguments are not used" in str(e) and e.line == 5


def test_inline_lookup_order_A_92(build_config):
    """A-92: `remote` is target.remote; inside mx_auth, `dnssec` is mx_auth.dnssec; unknown names are positioned."""
    rt = build_config("hostname h\nsmtp tcp://127.0.0.1:0 {\n deliver_to remote { }\n}\n")
    assert [m for m in rt.modules if m.mod_name == "smtp"][0].target.mod_name == "target.remote"
    e = err_of(build_config, "hostname h\nmx_auth p {\n foo\n}\n")
    assert "unknown module: foo (namespace: mx_auth)" in str(e) and (e.line, e.column) == (5, 2)


def test_mx_auth_forms_A_93(build_config):
    """A-93: inline, shared and bare mx_auth; policies as arguments are an error."""
    rt = build_config("hostname h\ntarget.remote r {\n mx_auth\n}\n")
    assert rt.instance("r").mx_auth.policies() == ()
    e = err_of(build_config, "hostname h\ntarget.remote r {\n mx_auth dane mtasts\n}\n")
    assert "unknown module: dane (namespace: )" in str(e)


def test_policy_children_A_94(build_config):
    """A-94: duplicate policy blocks and non-policies inside mx_auth."""
    e = err_of(build_config, "hostname h\nmx_auth p {\n dnssec\n dnssec\n}\n")
    assert "duplicate policy block: dnssec" in str(e) and e.line == 6
    e = err_of(build_config, "hostname h\nmx_auth p {\n limits { }\n}\n")
    assert "limits" in str(e) and "mx_auth policy" in str(e)
    rt = build_config("hostname h\nmx_auth p {\n debug yes\n dnssec\n}\n")
    assert rt.instance("p").debug is True
    e = err_of(build_config, "hostname h\nmx_auth p {\n debug yes\n debug no\n}\n")
    assert "duplicate directive: debug" in str(e) and e.line == 6  # A-77, as in any block
    e = err_of(build_config, "hostname h\nmx_auth p {\n debug {\n }\n}\n")
    assert "can't declare block here" in str(e) and e.line == 5


def test_policy_blocks_are_strict_A_95(build_config):
    """A-95: dnssec takes no directives; local_policy takes its two levels."""
    e = err_of(build_config, "mx_auth p {\n dnssec { foo }\n}\n")
    assert "unexpected directive: foo" in str(e)
    rt = build_config("mx_auth p {\n local_policy {\n  min_tls_level encrypted\n  min_mx_level dnssec\n }\n}\n")
    (lp,) = rt.instance("p").policies()
    assert (int(lp.min_tls), int(lp.min_mx)) == (1, 2)


def test_policy_arguments_A_96(build_config):
    """A-96: `local_policy off` is none/none; other policy arguments are ignored with a positioned warning."""
    rt = build_config("mx_auth p {\n local_policy off {\n  min_tls_level authenticated\n }\n dnssec whatever\n}\n")
    lp = [p for p in rt.instance("p").policies() if p.mod_name.endswith("local_policy")][0]
    assert (int(lp.min_tls), int(lp.min_mx)) == (0, 0)
    assert any(":7:2:" in w and "ignored" in w for w in rt.warnings)


@pytest.mark.parametrize(
    "rule,phrase",
    [
        ("all", "at least two arguments are required"),
        ("all speed 5", "unknown limit kind: speed"),
        ("host rate 5", "unknown limit scope: host"),
        ("all rate", "at least burst size is needed"),
        ("all rate 5 1s x", "too many arguments"),
        ("all concurrency", "max concurrency value is needed"),
        ("all rate x", "invalid integer: x"),
        ("all concurrency -1", "must not be negative"),
        ("all rate -2", "must not be negative"),
        ("all rate --5", "invalid integer: --5"),
        ("all concurrency +-5", "invalid integer: +-5"),
        ("all concurrency ²", "invalid integer: ²"),
        ("all concurrency ١٢", "invalid integer: ١٢"),
    ],
)
def test_limits_rules_A_97(build_config, rule, phrase):
    """A-97: limits rule errors are positioned at the rule."""
    e = err_of(build_config, f"limits l {{\n {rule}\n}}\n")
    assert phrase in str(e) and (e.line, e.column) == (4, 2)


def test_limits_rules_valid_A_97(build_config):
    """A-97: valid rules with the default and explicit periods."""
    rt = build_config("limits l {\n all rate 5\n ip rate 2 1m\n source concurrency 3\n destination concurrency 0\n}\n")
    rules = {(r.scope, r.kind): r for r in rt.instance("l").rules}
    assert rules[("all", "rate")].period == 1.0 and rules[("ip", "rate")].period == 60.0
    assert ("destination", "concurrency") not in rules  # 0 = no limit (B-121)


def test_globals_anywhere_A_98(build_config):
    """A-98: global directives anywhere at top level, in any order."""
    rt = build_config("target.remote r { }\nhostname late.example\ndebug yes\nautogenerated_msg_domain example.org\n")
    assert rt.instance("r").hostname == "late.example"
    assert rt.globals.debug is True and rt.globals.autogenerated_msg_domain == "example.org"


def test_remote_requires_hostname_A_99(build_config):
    """A-99: no hostname anywhere → positioned error at the block (or the inline directive)."""
    e = err_of(build_config, "target.remote r { }\n")
    assert "missing required directive: hostname" in str(e) and (e.line, e.column) == (3, 1)
    e = err_of(build_config, "smtp tcp://127.0.0.1:0 {\n hostname h\n deliver_to remote { }\n}\n")
    assert "missing required directive: hostname" in str(e) and (e.line, e.column) == (5, 2)
    e = err_of(build_config, 'hostname ""\ntarget.remote r { }\n')
    assert "missing required directive: hostname" in str(e)


def test_inheritance_A_100(build_config, tmp_path):
    """A-100: remote inherits hostname, debug, tls_client and may override them."""
    rt = build_config(
        "hostname g.example\ndebug yes\ntls_client {\n protocols tls1.3\n}\n"
        "target.remote a { }\ntarget.remote b {\n hostname b.example\n debug no\n tls_client { }\n}\n"
    )
    a, b = rt.instance("a"), rt.instance("b")
    assert a.hostname == "g.example" and a.log.debug_enabled is True and a.tls_client.min_version == "tls1.3"
    assert b.hostname == "b.example" and b.log.debug_enabled is False and b.tls_client.min_version == "tls1.2"


def test_tls_client_A_101(build_config, tmp_path):
    """A-101: root_ca without certificates is an error; protocols default to 1.2-1.3."""
    empty = tmp_path / "empty.pem"
    empty.write_text("nothing here\n")
    e = err_of(build_config, f"tls_client {{\n root_ca {empty}\n}}\n")
    assert f"no certificates was loaded from {empty}" in str(e) and e.line == 4
    rt = build_config("hostname h\ntarget.remote r { }\n")
    tc = rt.instance("r").tls_client
    assert (tc.min_version, tc.max_version) == ("tls1.2", "tls1.3")


def test_tls_client_takes_maddys_cipher_and_curve_names_A_101(build_config):
    """A-101: a maddy user's `ciphers` and `curves` lines work unchanged (maddy's names are
    mapped to OpenSSL's; OpenSSL's own names work too); a name neither knows is a
    positioned configuration error, not a failed handshake later."""
    rt = build_config("hostname h\ntarget.remote r {\n tls_client {\n"
                      "  ciphers ECDHE-RSA-WITH-AES128-GCM-SHA256 ECDHE-ECDSA-WITH-CHACHA20-POLY1305 AES256-SHA\n"
                      "  curves p256 X25519\n }\n}\n")
    tc = rt.instance("r").tls_client
    assert tc.ciphers == ("ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305", "AES256-SHA")
    assert tc.curves == ("prime256v1", "X25519")
    names = {c["name"] for c in tc.context(verify=True).get_ciphers()}
    assert {"ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305", "AES256-SHA"} <= names
    assert "ECDHE-RSA-AES256-GCM-SHA384" not in names
    for line, phrase in (("ciphers NO-SUCH-CIPHER", "unknown cipher: NO-SUCH-CIPHER"),
                         ("curves nosuchcurve", "unknown curve: nosuchcurve"),
                         ("ciphers RSA-WITH-RC4128-SHA", "cipher not available in this OpenSSL: RSA-WITH-RC4128-SHA"),
                         ("curves", "expected at least 1 argument")):
        e = err_of(build_config, f"hostname h\ntarget.remote r {{\n tls_client {{\n  {line}\n }}\n}}\n")
        assert phrase in str(e) and (e.line, e.column) == (6, 3), (line, str(e))


def test_inline_remote_marks_references_used_A_102(build_config):
    """A-102: a policy referenced only from an inline remote is not unused."""
    rt = build_config("hostname h\nmx_auth p { dnssec }\nsmtp tcp://127.0.0.1:0 {\n deliver_to remote {\n  mx_auth &p\n }\n}\n", require_endpoint=True)
    assert rt.instance("p") is not None


def test_an_empty_configuration_names_its_file_A_103(tmp_path):
    """A-103 with the position every configuration error carries: a file with nothing but a
    comment names the file, line 1, column 1."""
    conf = tmp_path / "empty.conf"
    conf.write_text("# nothing\n")
    p = subprocess.run([sys.executable, "-m", "maddylite", "run", "--config", str(conf)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 1
    assert f"{conf}:1:1: at least one endpoint should be configured" in p.stderr


def test_endpoint_rules_A_103(build_config):
    """A-103: run needs an endpoint; without one nothing is unused; with one, unused blocks are errors."""
    e = err_of(build_config, "hostname h\ntarget.remote r { }\n", require_endpoint=True)
    assert "at least one endpoint should be configured" in str(e)
    rt = build_config("hostname h\ntarget.remote r { }\nmx_auth p { dnssec }\n")
    assert "at least one endpoint should be configured" in rt.warnings
    e = err_of(build_config, "hostname h\nmx_auth p {\n bogus\n}\n")  # still checked without endpoints
    assert "unknown module: bogus" in str(e)
    e = err_of(build_config, "hostname h\ntarget.remote r { }\n" + SMTP)
    assert "unused configuration block" in str(e) and (e.line, e.column) == (4, 1)


def test_empty_config_fails_to_start_A_35(build_config):
    """A-35: an empty or comment-only file parses to nothing; starting needs an endpoint."""
    e = err_of(build_config, "# just a comment\n\n", require_endpoint=True)
    assert "at least one endpoint should be configured" in str(e)


def test_reference_cycle(build_config):
    """Reference cycles are errors naming the whole chain with positions."""
    e = err_of(build_config, "test.forward a {\n target &b\n}\ntest.forward b {\n target &a\n}\n")
    assert "reference cycle: a" in str(e) and "-> b" in str(e) and "-> a" in str(e)


def _check_config(path, *extra):
    return subprocess.run([sys.executable, "-m", "maddylite", "check-config", str(path), *extra], capture_output=True, text=True, timeout=60)


def test_check_config_exit_status_A_104(tmp_path):
    """A-103/A-104: check-config exits 1 with a positioned error, 0 with a warning when only the endpoint is missing."""
    bad = tmp_path / "bad.conf"
    bad.write_text(textwrap.dedent("""\
        hostname h
        target.remote r {
            conn_reuse_limit ten
        }
        """))
    r = _check_config(bad)
    assert r.returncode == 1, r.stderr
    assert f"{bad}:3:5: conn_reuse_limit: invalid integer: ten" in r.stderr
    assert "Traceback" not in r.stderr
    ok = tmp_path / "ok.conf"
    ok.write_text(f"state_dir {tmp_path}\nhostname h\ntarget.remote r {{ }}\n")
    r = _check_config(ok)
    assert r.returncode == 0, r.stderr
    assert "at least one endpoint should be configured" in r.stderr
