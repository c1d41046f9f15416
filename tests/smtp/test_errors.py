"""Tests for maddylite.smtp.errors and maddylite.smtp.codes."""

from __future__ import annotations

import pickle

import pytest

from maddylite.smtp import codes
from maddylite.smtp import errors as E
from maddylite.smtp.errors import (
    ErrorTemplate,
    NetworkError,
    SMTPError,
    STARTTLSRejected,
    TLSHandshakeError,
)


def test_str_format() -> None:
    """str() is "<code> <enhanced> <message>"."""
    err = SMTPError(451, (4, 4, 0), "No usable MXs, last err: Network I/O error")
    assert str(err) == "451 4.4.0 No usable MXs, last err: Network I/O error"


@pytest.mark.parametrize(("code", "enhanced", "expected"), [
    (550, None, (5, 0, 0)),
    (450, None, (4, 0, 0)),
    (451, (5, 4, 4), (4, 4, 4)),
    (554, (4, 7, 1), (5, 7, 1)),
], ids=["B-98-perm", "B-98-temp", "class-from-code-4", "class-from-code-5"])
def test_enhanced_code_follows_the_basic_class_b98(code: int, enhanced: tuple[int, int, int] | None,
                                                   expected: tuple[int, int, int]) -> None:
    """B-98 and RFC 3463 §2: X.0.0 when absent; the class digit is the basic code's."""
    assert SMTPError(code, enhanced, "x").enhanced == expected


def test_temporary_follows_the_code_unless_given() -> None:
    """The class follows the first digit of the basic code; explicit values win."""
    assert SMTPError(421).temporary and not SMTPError(554).temporary
    assert SMTPError(550, temporary=True).temporary
    assert SMTPError(451).permanent is False


def test_from_reply_names_the_mx_b19() -> None:
    """B-19: server errors read "<MX with trailing dot> said: <text>"."""
    err = SMTPError.from_reply(550, (5, 1, 2), "Hey", remote_server="mx.example.test.")
    assert str(err) == "550 5.1.2 mx.example.test. said: Hey"
    assert err.remote_server == "mx.example.test." and err.fields["smtp_text"] == "Hey"
    assert SMTPError.from_reply(550, None, "no such user").message == "no such user"


def test_network_error_b16() -> None:
    """B-16, B-99: NetworkError is 450 4.4.2 "Network I/O error" temp with a reason."""
    err = NetworkError("connect 127.0.0.1 port 25: Connection refused", remote_server="mx.")
    assert str(err) == "450 4.4.2 Network I/O error"
    assert err.temporary and err.reason.endswith("Connection refused")
    assert E.NETWORK_IO.matches(err)


def test_tls_errors_have_kinds() -> None:
    """B-47..B-50: TLS failures carry a kind the fallback ladder can switch on."""
    assert TLSHandshakeError("verify", "self-signed").kind == "verify"
    assert TLSHandshakeError("handshake", "no protocols").fields["tls_err"] == "no protocols"
    rejected = STARTTLSRejected.from_reply(454, (4, 7, 0), "TLS not available",
                                           remote_server="mx.")
    assert isinstance(rejected, STARTTLSRejected) and rejected.kind == "rejected"
    assert rejected.temporary


def test_templates_make_fresh_errors() -> None:
    """A template gives a new exception each time, with the given fields."""
    a = E.MX_LOOKUP_PERM.error(reason="dns: rcode NXDOMAIN when looking up example.test.")
    b = E.MX_LOOKUP_PERM.error()
    assert a is not b and str(a) == "554 5.4.4 MX lookup error"
    assert a.fields == {"reason": "dns: rcode NXDOMAIN when looking up example.test."}
    assert b.fields == {}
    assert E.MX_LOOKUP_PERM.matches(a) and not E.MX_LOOKUP_TEMP.matches(a)


@pytest.mark.parametrize(("template", "text"), [
    (E.NETWORK_IO, "450 4.4.2 Network I/O error"),
    (E.DNS_ERROR_TEMP, "450 4.4.4 DNS error"),
    (E.DNS_ERROR_PERM, "550 5.4.4 DNS error"),
    (E.MX_LOOKUP_PERM, "554 5.4.4 MX lookup error"),
    (E.MX_LOOKUP_TEMP, "451 4.4.4 MX lookup error"),
    (E.NULL_MX, "556 5.1.10 Domain does not accept email (null MX)"),
    (E.POSTMASTER_NOT_SUPPORTED, "550 5.1.1 <postmaster> address is not supported"),
    (E.IP_LITERAL_NOT_SUPPORTED, "550 5.1.1 IP address literals are not supported"),
    (E.QUARANTINED_AT_RCPT, "550 5.7.0 Refusing to deliver a quarantined message"),
    (E.QUARANTINED_AT_BODY, "550 5.7.0 Refusing to deliver quarantined message"),
    (E.MALFORMED_SENDER, "501 5.1.8 Malformed sender address"),
    (E.MALFORMED_RECIPIENT, "501 5.1.3 Malformed recipient address"),
    (E.REQUIRETLS_NOT_SUPPORTED, "550 5.7.30 Recipient server does not support REQUIRETLS"),
    (E.REQUIRETLS_MX_UNAUTHENTICATED,
     "550 5.7.30 Failed to establish the MX record authenticity (REQUIRETLS)"),
    (E.REQUIRETLS_TLS_UNAUTHENTICATED,
     "550 5.7.30 TLS is not available or unauthenticated but required (REQUIRETLS)"),
    (E.POLICY_MX_LEVEL, "451 4.7.0 Failed to establish the MX record authenticity"),
    (E.POLICY_TLS_LEVEL, "451 4.7.1 TLS is not available or unauthenticated but required"),
    (E.MTASTS_TLS_REQUIRED, "451 4.7.1 TLS is required but unavailable or failed (MTA-STS)"),
    (E.MTASTS_CERT_UNTRUSTED, "451 4.7.1 Recipient server TLS certificate is not trusted but "
                              "authentication is required by MTA-STS"),
    (E.MTASTS_MX_MISMATCH,
     "451 4.7.0 Failed to establish the MX record authenticity (MTA-STS)"),
    (E.DANE_TLS_REQUIRED,
     "451 4.7.1 TLS is required but unsupported or failed (enforced by DANE)"),
    (E.DANE_NO_MATCH, "451 4.7.0 No matching TLSA records"),
    (E.SMTPUTF8_SENDER, "550 5.6.7 SMTPUTF8 is unsupported, cannot convert sender address"),
    (E.SMTPUTF8_RECIPIENT,
     "553 5.6.7 SMTPUTF8 is unsupported, cannot convert recipient address"),
    (E.SMTPUTF8_HEADER, "554 5.6.7 SMTPUTF8 is unsupported, cannot send a UTF-8 header"),
    (E.EIGHTBITMIME_UNSUPPORTED, "554 5.6.3 8BITMIME is unsupported, cannot send 8-bit content"),
    (E.MESSAGE_TOO_BIG, "552 5.3.4 Message is too big for the recipient server"),
    (E.HIGH_LOAD, "451 4.4.5 High load, try again later"),
], ids=["B-16", "C-77", "B-15", "B-9", "B-10", "B-7", "B-21", "B-22", "B-23-rcpt",
        "B-23-body", "B-24", "B-25", "B-72", "B-74", "B-75", "C-9", "C-10", "C-44", "C-45",
        "C-43", "C-79", "C-81", "B-88", "B-89", "B-91", "B-92", "B-93", "B-112"])
def test_named_errors_match_the_spec(template: ErrorTemplate, text: str) -> None:
    """Every named error has the exact codes and text behaviour.md gives it."""
    err = template.error()
    assert str(err) == text == str(template)
    assert err.temporary is template.temporary is text.startswith("4")


def test_template_refuses_a_class_mismatch() -> None:
    """Enhanced codes always have the class digit of the basic code [RFC 3463 §2]."""
    with pytest.raises(ValueError):
        ErrorTemplate(451, (5, 4, 4), "MX lookup error")


def test_no_usable_mxs_result_rules() -> None:
    """Section B result rules, B-6, B-16: temporary → 451 4.4.0, else 550 5.4.0."""
    last = E.NETWORK_IO.error(remote_server="mx2.example.test.", reason="refused")
    temp = E.no_usable_mxs(last, temporary=True)
    assert str(temp) == "451 4.4.0 No usable MXs, last err: Network I/O error"
    assert temp.temporary and temp.fields["reason"] == "refused"
    perm = E.no_usable_mxs(E.DNS_ERROR_PERM.error(), temporary=False)
    assert str(perm) == "550 5.4.0 No usable MXs, last err: DNS error" and perm.permanent
    assert str(E.no_usable_mxs("x", temporary=False)) == "550 5.4.0 No usable MXs, last err: x"


def test_partial_delivery_b36_b37() -> None:
    """B-36: 451 4.0.0 when any per-recipient error is temporary; B-37: else 550 5.0.0."""
    msg = "Partial delivery failure, additional attempts may result in duplicates"
    assert str(E.partial_delivery(temporary=True)) == f"451 4.0.0 {msg}"
    assert str(E.partial_delivery(temporary=False)) == f"550 5.0.0 {msg}"


@pytest.mark.parametrize("err", [
    SMTPError(550, (5, 1, 2), "x said: Hey", remote_server="x.", fields={"a": 1}),
    NetworkError("timeout", remote_server="mx."),
    TLSHandshakeError("verify", "bad cert"),
], ids=["plain", "network", "tls"])
def test_errors_pickle_and_serialise(err: SMTPError) -> None:
    """Errors survive pickling (subclass and fields kept) and as_dict/from_dict."""
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and str(back) == str(err)
    assert back.fields == err.fields and back.temporary == err.temporary
    again = SMTPError.from_dict(err.as_dict())
    assert str(again) == str(err) and again.remote_server == err.remote_server


def test_codes_helpers() -> None:
    """Reply code validation and enhanced code parsing [RFC 5321 §4.2, RFC 3463]."""
    assert codes.is_valid_code(250) and codes.is_valid_code(421)
    assert not codes.is_valid_code(199) and not codes.is_valid_code(260)
    assert not codes.is_valid_code(600)
    assert codes.parse_enhanced("5.1.1 user unknown") == ((5, 1, 1), "user unknown")
    assert codes.parse_enhanced("5.7.30") == ((5, 7, 30), "")
    assert codes.parse_enhanced("no code") == (None, "no code")
    assert codes.parse_enhanced("5.1.1x") == (None, "5.1.1x")
    assert codes.parse_enhanced("3.1.1 not a class") == (None, "3.1.1 not a class")
    assert codes.format_enhanced((4, 4, 2)) == "4.4.2"
