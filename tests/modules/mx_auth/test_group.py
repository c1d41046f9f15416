"""The mx_auth group, local_policy, dnssec and sts_preload (behaviour.md C.1, C-66, C-94)."""

import pytest

from maddylite.config.errors import ConfigError
from maddylite.policy import MXCandidate, MXLevel, TLSLevel
from maddylite.smtp.errors import POLICY_MX_LEVEL, POLICY_TLS_LEVEL, SMTPError


def group(build_config, body):
    return build_config(f"mx_auth p {{\n{body}\n}}\n").instance("p")


def test_fixed_order_C_1(build_config):
    """C-1: mtasts, sts_preload, dane, dnssec, local_policy whatever the block's order."""
    g = group(build_config, " local_policy\n dnssec\n dane\n sts_preload\n mtasts")
    assert [p.mod_name for p in g.policies()] == [
        "mx_auth.mtasts", "mx_auth.sts_preload", "mx_auth.dane", "mx_auth.dnssec", "mx_auth.local_policy"]


def _check(g, cand, stage):
    (lp,) = [p for p in g.policies() if p.mod_name == "mx_auth.local_policy"]
    d = lp.start_delivery(None)
    return d.check_mx(cand) if stage == "mx" else d.check_conn(cand)


def test_mtasts_match_does_not_satisfy_dnssec_minimum_C_5(build_config):
    """C-5: min_mx_level dnssec is not met by MX level mtasts; the error carries the levels (C-13)."""
    g = group(build_config, " local_policy {\n  min_mx_level dnssec\n }")
    with pytest.raises(SMTPError) as e:
        _check(g, MXCandidate("example.test", "mx.example.test.", 10, mx_level=MXLevel.MTASTS), "mx")
    assert POLICY_MX_LEVEL.matches(e.value)
    assert e.value.fields["mx_level"] == "mtasts" and e.value.fields["required_mx_level"] == "dnssec"
    assert _check(g, MXCandidate("example.test", "mx.example.test.", 10, mx_level=MXLevel.DNSSEC), "mx") == MXLevel.DNSSEC


def test_local_policy_defaults_are_none_C_6(build_config):
    """C-6: `local_policy { }` accepts no MX level and plaintext."""
    g = group(build_config, " local_policy { }")
    cand = MXCandidate("example.test", "mx.example.test.", 10)
    assert _check(g, cand, "mx") == MXLevel.NONE and _check(g, cand, "conn") == TLSLevel.NONE


def test_local_policy_off_C_7(build_config):
    """C-7: `local_policy off` is both levels none, even with directives in its block."""
    g = group(build_config, " local_policy off {\n  min_tls_level authenticated\n  min_mx_level dnssec\n }")
    cand = MXCandidate("example.test", "mx.example.test.", 10)
    assert _check(g, cand, "mx") == MXLevel.NONE and _check(g, cand, "conn") == TLSLevel.NONE


def test_tls_minimum_error_fields_C_10_C_13(build_config):
    """C-10/C-13: a TLS level below the minimum names both levels."""
    g = group(build_config, " local_policy {\n  min_tls_level authenticated\n }")
    with pytest.raises(SMTPError) as e:
        _check(g, MXCandidate("example.test", "mx.example.test.", 10, tls_level=TLSLevel.ENCRYPTED), "conn")
    assert POLICY_TLS_LEVEL.matches(e.value)
    assert (e.value.fields["tls_level"], e.value.fields["required_tls_level"]) == ("encrypted", "authenticated")


def test_dnssec_takes_no_directives_and_reads_the_ad_bit_C_66_C_57(build_config):
    """C-66: `dnssec { foo }` is an error; C-57: an authenticated MX answer gives MX level dnssec."""
    with pytest.raises(ConfigError, match="unexpected directive: foo"):
        group(build_config, " dnssec {\n  foo\n }")
    (p,) = group(build_config, " dnssec").policies()
    d = p.start_delivery(None)
    assert d.check_mx(MXCandidate("e.test", "mx.e.test.", 1, mx_authenticated=True)) == MXLevel.DNSSEC
    assert d.check_mx(MXCandidate("e.test", "mx.e.test.", 1, mx_authenticated=False)) == MXLevel.NONE


def test_sts_preload_is_accepted_and_does_nothing_C_94(build_config, capsys):
    """C-94: sts_preload takes source and enforce_testing, logs that it is deprecated, changes nothing."""
    (p,) = group(build_config, " sts_preload {\n  source https://example.org/list.json\n  enforce_testing no\n }").policies()
    p.start()
    assert "deprecated" in capsys.readouterr().err
    cand = MXCandidate("e.test", "mx.e.test.", 1, mx_level=MXLevel.NONE, tls_level=TLSLevel.NONE)
    d = p.start_delivery(None)
    assert d.check_mx(cand) == MXLevel.NONE and d.check_conn(cand) == TLSLevel.NONE
