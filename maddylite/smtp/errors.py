"""SMTPError, the error value every delivery failure is reported as, and the named errors.

An :class:`SMTPError` carries a basic reply code, an enhanced status code whose class digit
always equals the basic code's [RFC 3463 §2], a human-readable message, whether it is
temporary (the queue retries) or permanent (the queue bounces), the MX that said it, if
any, and diagnostic fields for the log (``reason``, ``tls_err``, ...).

The errors that behaviour.md names are declared below as :class:`ErrorTemplate` constants.
A template is immutable and shared; ``TEMPLATE.error(...)`` makes a fresh exception each
time, so no exception instance (with its traceback) is ever shared between greenlets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from maddylite.smtp.codes import EnhancedCode, align_enhanced, code_class, format_enhanced

__all__ = [
    "SMTPError",
    "NetworkError",
    "TLSHandshakeError",
    "STARTTLSRejected",
    "ErrorTemplate",
    "no_usable_mxs",
    "partial_delivery",
]


class SMTPError(Exception):
    """SMTPError is an SMTP-level failure with its codes, class and diagnostic fields.

    ``enhanced`` defaults to ``X.0.0`` of the basic code's class (B-98), and its class digit
    is always forced to the basic code's. ``temporary`` follows the basic code (4xx is
    temporary) unless given explicitly. ``remote_server`` names the MX that sent the reply
    (with its trailing dot) when the error came from a server; ``fields`` holds diagnostic
    values for structured logging.
    """

    def __init__(
        self,
        code: int,
        enhanced: EnhancedCode | None = None,
        message: str = "",
        *,
        temporary: bool | None = None,
        remote_server: str | None = None,
        fields: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.enhanced: EnhancedCode = align_enhanced(code, enhanced)
        self.message = message
        self.temporary = code_class(code) == 4 if temporary is None else temporary
        self.remote_server = remote_server
        self.fields: dict[str, Any] = dict(fields or {})

    @classmethod
    def from_reply(
        cls,
        code: int,
        enhanced: EnhancedCode | None,
        text: str,
        *,
        remote_server: str | None = None,
        fields: Mapping[str, Any] | None = None,
    ) -> SMTPError:
        """SMTPError.from_reply builds the error for a negative server reply.

        The message is ``"<remote_server> said: <text>"`` (result rules of behaviour.md,
        section B) or just the text when the server is unknown; a reply without an enhanced
        code gets ``X.0.0`` (B-98).
        """
        message = f"{remote_server} said: {text}" if remote_server else text
        merged = {"smtp_code": code, "smtp_text": text}
        merged.update(fields or {})
        return cls(code, enhanced, message, remote_server=remote_server, fields=merged)

    @property
    def permanent(self) -> bool:
        """SMTPError.permanent is the opposite of :attr:`temporary`."""
        return not self.temporary

    def with_fields(self, **fields: Any) -> SMTPError:
        """SMTPError.with_fields adds diagnostic fields in place and returns self."""
        self.fields.update(fields)
        return self

    def as_dict(self) -> dict[str, Any]:
        """SMTPError.as_dict returns a JSON-friendly snapshot (for the queue's records)."""
        return {
            "code": self.code,
            "enhanced": list(self.enhanced),
            "message": self.message,
            "temporary": self.temporary,
            "remote_server": self.remote_server,
            "fields": {k: v if isinstance(v, str | int | float | bool) or v is None else str(v)
                       for k, v in self.fields.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SMTPError:
        """SMTPError.from_dict rebuilds a plain SMTPError from :meth:`as_dict` output."""
        enhanced = data.get("enhanced")
        return SMTPError(
            int(data["code"]),
            (int(enhanced[0]), int(enhanced[1]), int(enhanced[2])) if enhanced else None,
            str(data.get("message", "")),
            temporary=data.get("temporary"),
            remote_server=data.get("remote_server"),
            fields=data.get("fields") or {},
        )

    def __str__(self) -> str:
        return f"{self.code} {format_enhanced(self.enhanced)} {self.message}"

    def __repr__(self) -> str:
        kind = "temp" if self.temporary else "perm"
        return f"{type(self).__name__}({str(self)!r}, {kind})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only constructor arguments defeat Exception's default pickling.
        return (_restore, (type(self), self.__dict__.copy()))


def _restore(cls: type[SMTPError], state: dict[str, Any]) -> SMTPError:
    obj = cls.__new__(cls)
    Exception.__init__(obj, state.get("message", ""))
    obj.__dict__.update(state)
    return obj


class Cancelled(SMTPError):
    """Cancelled is the error of a wait ended by killing the waiting greenlet (B-119: the
    same codes as a timeout). Whoever answers a client with it ends afterwards, as the
    kill asked, instead of serving on."""


class NetworkError(SMTPError):
    """NetworkError is ``450 4.4.2 "Network I/O error"`` temp: the connection is unusable.

    It covers TCP failures, lost connections, every timeout and every protocol violation by
    the server (over-long or malformed reply lines, endless replies; B-99). The underlying
    cause is in ``fields["reason"]``; the connection that raised it is marked broken.
    """

    def __init__(
        self,
        reason: str,
        *,
        remote_server: str | None = None,
        fields: Mapping[str, Any] | None = None,
    ) -> None:
        merged = {"reason": reason}
        merged.update(fields or {})
        super().__init__(450, (4, 4, 2), "Network I/O error", remote_server=remote_server,
                         fields=merged)

    @property
    def reason(self) -> str:
        """NetworkError.reason is the underlying cause, e.g. ``timeout reading reply``."""
        return str(self.fields.get("reason", ""))


TLSFailureKind = Literal["verify", "handshake"]


class TLSHandshakeError(SMTPError):
    """TLSHandshakeError is a failed TLS handshake after the server accepted STARTTLS.

    ``kind`` is ``"verify"`` when the certificate failed verification (untrusted,
    wrong name, expired: B-47) and ``"handshake"`` for every other failure, including a
    timeout or a dropped connection during the handshake and an EHLO rejected inside TLS
    (B-48, B-51). The TLS error text is in ``fields["tls_err"]``. The connection is closed.
    """

    def __init__(
        self,
        kind: TLSFailureKind,
        tls_err: str,
        *,
        remote_server: str | None = None,
    ) -> None:
        message = (
            "TLS certificate verification failed" if kind == "verify" else "TLS handshake failed"
        )
        super().__init__(451, (4, 7, 5), message, remote_server=remote_server,
                         fields={"tls_err": tls_err})
        self.kind: TLSFailureKind = kind


class STARTTLSRejected(SMTPError):
    """STARTTLSRejected is a negative reply to the STARTTLS command itself (B-50).

    It carries the server's codes and class (``454 4.7.0`` is temporary) and its message is
    ``"<mx> said: <text>"``. No fallback applies: the MX fails with this error. ``kind`` is
    always ``"rejected"``, so a caller can switch on ``err.kind`` for all TLS failures.
    """

    kind = "rejected"


@dataclass(frozen=True)
class ErrorTemplate:
    """ErrorTemplate is an immutable named error: codes and exact message, no state.

    ``TEMPLATE.error(reason=...)`` returns a fresh :class:`SMTPError` carrying the given
    diagnostic fields, and ``TEMPLATE.matches(err)`` compares codes and message.
    """

    code: int
    enhanced: EnhancedCode
    message: str

    def __post_init__(self) -> None:
        if self.enhanced[0] != code_class(self.code):
            raise ValueError(f"enhanced code class mismatch in {self}")

    @property
    def temporary(self) -> bool:
        """ErrorTemplate.temporary tells whether errors made from it are temporary."""
        return code_class(self.code) == 4

    def error(self, *, remote_server: str | None = None, **fields: Any) -> SMTPError:
        """ErrorTemplate.error makes a new SMTPError with these codes and *fields*."""
        return SMTPError(self.code, self.enhanced, self.message, remote_server=remote_server,
                         fields=fields)

    def matches(self, err: BaseException) -> bool:
        """ErrorTemplate.matches tells whether *err* is an SMTPError made from this template."""
        return (
            isinstance(err, SMTPError)
            and err.code == self.code
            and err.enhanced == self.enhanced
            and err.message == self.message
        )

    def __str__(self) -> str:
        return f"{self.code} {format_enhanced(self.enhanced)} {self.message}"


# --- Per-MX errors (section B result rules) -----------------------------------------------

#: TCP failure, lost connection, any timeout, protocol violation (B-16, B-99..B-104).
NETWORK_IO = ErrorTemplate(450, (4, 4, 2), "Network I/O error")
#: A lookup of the MX host's addresses (or DANE's TLSA/address lookups) failed (C-77).
DNS_ERROR_TEMP = ErrorTemplate(450, (4, 4, 4), "DNS error")
#: The MX host name has no address: NXDOMAIN or an empty answer (B-15).
DNS_ERROR_PERM = ErrorTemplate(550, (5, 4, 4), "DNS error")

# --- Recipient-domain errors (B.1) --------------------------------------------------------

#: MX query answered NXDOMAIN (B-9); put the rcode text in the ``reason`` field.
MX_LOOKUP_PERM = ErrorTemplate(554, (5, 4, 4), "MX lookup error")
#: MX query answered SERVFAIL/REFUSED/..., or no resolver answered (B-10, B-11).
MX_LOOKUP_TEMP = ErrorTemplate(451, (4, 4, 4), "MX lookup error")
#: Any MX record with the exchange ``.`` (B-7) [RFC 7505 §3].
NULL_MX = ErrorTemplate(556, (5, 1, 10), "Domain does not accept email (null MX)")
#: Recipient ``postmaster`` without a domain (B-21).
POSTMASTER_NOT_SUPPORTED = ErrorTemplate(550, (5, 1, 1), "<postmaster> address is not supported")
#: Recipient with an address literal domain (B-22).
IP_LITERAL_NOT_SUPPORTED = ErrorTemplate(550, (5, 1, 1), "IP address literals are not supported")
#: Quarantine flag set before the recipients were added (B-23).
QUARANTINED_AT_RCPT = ErrorTemplate(550, (5, 7, 0), "Refusing to deliver a quarantined message")
#: Quarantine flag set after the recipients were added, seen at the body step (B-23).
QUARANTINED_AT_BODY = ErrorTemplate(550, (5, 7, 0), "Refusing to deliver quarantined message")
#: Sender without ``@`` (B-24).
MALFORMED_SENDER = ErrorTemplate(501, (5, 1, 8), "Malformed sender address")
#: Recipient without ``@`` (B-25).
MALFORMED_RECIPIENT = ErrorTemplate(501, (5, 1, 3), "Malformed recipient address")

# --- Policy and REQUIRETLS errors (B.5, C-12) ---------------------------------------------

REQUIRETLS_NOT_SUPPORTED = ErrorTemplate(
    550, (5, 7, 30), "Recipient server does not support REQUIRETLS")  #: B-72
REQUIRETLS_MX_UNAUTHENTICATED = ErrorTemplate(
    550, (5, 7, 30), "Failed to establish the MX record authenticity (REQUIRETLS)")  #: B-74
REQUIRETLS_TLS_UNAUTHENTICATED = ErrorTemplate(
    550, (5, 7, 30), "TLS is not available or unauthenticated but required (REQUIRETLS)")  #: B-75
POLICY_MX_LEVEL = ErrorTemplate(
    451, (4, 7, 0), "Failed to establish the MX record authenticity")  #: C-9
POLICY_TLS_LEVEL = ErrorTemplate(
    451, (4, 7, 1), "TLS is not available or unauthenticated but required")  #: C-10
MTASTS_TLS_REQUIRED = ErrorTemplate(
    451, (4, 7, 1), "TLS is required but unavailable or failed (MTA-STS)")  #: C-44
MTASTS_CERT_UNTRUSTED = ErrorTemplate(
    451, (4, 7, 1),
    "Recipient server TLS certificate is not trusted but authentication is required by MTA-STS",
)  #: C-45
MTASTS_MX_MISMATCH = ErrorTemplate(
    451, (4, 7, 0), "Failed to establish the MX record authenticity (MTA-STS)")  #: C-43
DANE_TLS_REQUIRED = ErrorTemplate(
    451, (4, 7, 1), "TLS is required but unsupported or failed (enforced by DANE)")  #: C-79
DANE_NO_MATCH = ErrorTemplate(451, (4, 7, 0), "No matching TLSA records")  #: C-81

# --- Content and protocol errors (B.7) ----------------------------------------------------

SMTPUTF8_SENDER = ErrorTemplate(
    550, (5, 6, 7), "SMTPUTF8 is unsupported, cannot convert sender address")  #: B-88
SMTPUTF8_RECIPIENT = ErrorTemplate(
    553, (5, 6, 7), "SMTPUTF8 is unsupported, cannot convert recipient address")  #: B-89
SMTPUTF8_HEADER = ErrorTemplate(
    554, (5, 6, 7), "SMTPUTF8 is unsupported, cannot send a UTF-8 header")  #: B-91
EIGHTBITMIME_UNSUPPORTED = ErrorTemplate(
    554, (5, 6, 3), "8BITMIME is unsupported, cannot send 8-bit content")  #: B-92
MESSAGE_TOO_BIG = ErrorTemplate(
    552, (5, 3, 4), "Message is too big for the recipient server")  #: B-93

# --- Limits (B.10) ------------------------------------------------------------------------

#: Any limit wait that timed out or was cancelled (B-112..B-119).
HIGH_LOAD = ErrorTemplate(451, (4, 4, 5), "High load, try again later")

_PARTIAL = "Partial delivery failure, additional attempts may result in duplicates"


def no_usable_mxs(last_err: SMTPError | str, *, temporary: bool) -> SMTPError:
    """no_usable_mxs builds the per-recipient error when no MX of a domain was usable.

    ``451 4.4.0`` when *temporary* (any MX failed temporarily), else ``550 5.4.0``; the
    message is ``"No usable MXs, last err: <message of the last MX's error>"``. The last
    error's fields and remote server are kept for the log. The REQUIRETLS case (550 5.7.30)
    is not built here: it reports the REQUIRETLS rejection itself.
    """
    if isinstance(last_err, SMTPError):
        text, fields, remote = last_err.message, dict(last_err.fields), last_err.remote_server
    else:
        text, fields, remote = last_err, {}, None
    if temporary:
        code, enhanced = 451, (4, 4, 0)
    else:
        code, enhanced = 550, (5, 4, 0)
    return SMTPError(code, enhanced, f"No usable MXs, last err: {text}",
                     remote_server=remote, fields=fields)


def partial_delivery(*, temporary: bool) -> SMTPError:
    """partial_delivery builds the atomic-body error when only some recipients failed.

    ``451 4.0.0`` when at least one per-recipient error is temporary, else ``550 5.0.0``
    (B-36, B-37).
    """
    if temporary:
        return SMTPError(451, (4, 0, 0), _PARTIAL)
    return SMTPError(550, (5, 0, 0), _PARTIAL)
