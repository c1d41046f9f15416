"""SMTP reply codes and enhanced status codes as named constants [RFC 5321 §4.2, RFC 3463].

Basic codes are plain ints; an enhanced status code is a ``(class, subject, detail)`` tuple.
The class digit of an enhanced code always equals the first digit of the basic code it
travels with [RFC 3463 §2]; :func:`align_enhanced` enforces that.
"""

from __future__ import annotations

import re

EnhancedCode = tuple[int, int, int]

# Positive replies.
SERVICE_READY = 220  #: greeting; also "ready to start TLS" after STARTTLS
CLOSING = 221  #: reply to QUIT
OK = 250  #: requested action completed
USER_NOT_LOCAL = 251  #: RCPT accepted, will forward
CANNOT_VERIFY = 252  #: RCPT accepted, cannot verify the user
START_MAIL_INPUT = 354  #: reply to DATA: send the message content

# Transient negative replies.
SERVICE_NOT_AVAILABLE = 421  #: the server is closing the transmission channel
MAILBOX_UNAVAILABLE_TEMP = 450
LOCAL_ERROR = 451
INSUFFICIENT_STORAGE = 452
TLS_NOT_AVAILABLE = 454

# Permanent negative replies.
SYNTAX_ERROR = 500
ARGUMENT_SYNTAX_ERROR = 501
NOT_IMPLEMENTED = 502
BAD_SEQUENCE = 503
PARAMETER_NOT_IMPLEMENTED = 504
MAILBOX_UNAVAILABLE = 550
STORAGE_EXCEEDED = 552
MAILBOX_NAME_NOT_ALLOWED = 553
TRANSACTION_FAILED = 554
DOMAIN_DOES_NOT_ACCEPT_MAIL = 556  #: null MX [RFC 7505 §3]

_ENHANCED_RE = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")


def code_class(code: int) -> int:
    """code_class returns the first digit of a basic reply code (2, 3, 4 or 5)."""
    return code // 100


def is_valid_code(code: int) -> bool:
    """is_valid_code tells whether *code* is a well-formed reply code [RFC 5321 §4.2].

    The first digit is 2..5, the second 0..5 and the third any digit.
    """
    return 200 <= code <= 559 and (code // 10) % 10 <= 5


def align_enhanced(code: int, enhanced: EnhancedCode | None) -> EnhancedCode:
    """align_enhanced returns *enhanced* with its class digit set to *code*'s class.

    A missing enhanced code becomes ``X.0.0`` of the reply's class (B-98). The subject and
    detail digits are kept as given.
    """
    klass = code_class(code)
    if enhanced is None:
        return (klass, 0, 0)
    return (klass, enhanced[1], enhanced[2])


def parse_enhanced(text: str) -> tuple[EnhancedCode | None, str]:
    """parse_enhanced splits a leading enhanced status code off a reply text.

    It returns ``(code, rest)``; *code* is None (and *rest* the whole text) when the text
    does not start with ``N.N.N`` followed by a space or the end of the text.
    """
    m = _ENHANCED_RE.match(text)
    if m is None:
        return None, text
    code = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
    return code, text[m.end() :]


def format_enhanced(enhanced: EnhancedCode) -> str:
    """format_enhanced renders an enhanced status code as ``class.subject.detail``."""
    return f"{enhanced[0]}.{enhanced[1]}.{enhanced[2]}"
