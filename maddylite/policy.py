"""Security levels and the hooks an mx_auth policy plugs into target.remote.

Levels (security-levels.md): MX level none < mtasts < dnssec, TLS level none <
encrypted < authenticated. For every MX candidate target.remote builds an
:class:`MXCandidate` and calls, on each per-delivery policy object in the group's
declared order:

1. ``prepare_domain(domain, resolver)`` once per recipient domain, before the MX lookup
   (MTA-STS starts its TXT lookup here, in parallel with the MX lookup, C-14);
2. ``check_mx(cand)`` before connecting: returns the MX level it grants (never lower
   than ``cand.mx_level``) or raises an SMTPError to skip this MX without a TCP
   connection (B-58);
3. ``prepare_conn(cand)`` right before connecting (DANE starts its TLSA lookup, C-67);
4. ``check_conn(cand)`` after the STARTTLS ladder: returns the TLS level it grants
   (DANE may raise it to authenticated) or raises an SMTPError; the connection is then
   closed with QUIT and the next MX is tried.

Every policy error is per MX; target.remote turns "no usable MX" into the recipients'
error (behaviour.md section B result rules).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any


class MXLevel(IntEnum):
    """MXLevel: how sure we are that an MX really serves the recipient domain."""

    NONE = 0
    MTASTS = 1
    DNSSEC = 2

    def __str__(self) -> str:
        return self.name.lower()


class TLSLevel(IntEnum):
    """TLSLevel: how well the session is protected."""

    NONE = 0
    ENCRYPTED = 1
    AUTHENTICATED = 2

    def __str__(self) -> str:
        return self.name.lower()


MX_LEVEL_NAMES = {str(v): v for v in MXLevel}
TLS_LEVEL_NAMES = {str(v): v for v in TLSLevel}


@dataclass
class MXCandidate:
    """MXCandidate is one MX of a recipient domain while it is being judged.

    ``host`` is the MX host name in A-labels with its trailing dot; ``domain`` the
    normalised recipient domain. ``mx_authenticated`` is the AD bit of the MX answer
    (trusted only from a loopback resolver). ``conn`` is set after connecting and
    ``tls_err`` holds the TLS error that made the ladder step down, if any.
    """

    domain: str
    host: str
    pref: int
    mx_authenticated: bool = False
    implicit: bool = False
    mx_level: MXLevel = MXLevel.NONE
    tls_level: TLSLevel = TLSLevel.NONE
    conn: Any = None
    tls_err: str | None = None
    #: The maddylite.dns.Resolver the delivery uses; policies make their lookups with it.
    resolver: Any = None
    fields: dict[str, Any] = field(default_factory=dict)


class DeliveryPolicy:
    """DeliveryPolicy is the per-delivery object of one policy; the defaults do nothing."""

    def prepare_domain(self, domain: str, resolver: Any) -> None:
        """prepare_domain starts per-domain work (lookups) for a recipient domain."""

    def check_mx(self, cand: MXCandidate) -> MXLevel:
        """check_mx returns the MX level granted, or raises SMTPError to skip this MX."""
        return cand.mx_level

    def prepare_conn(self, cand: MXCandidate) -> None:
        """prepare_conn starts per-MX work before connecting."""

    def check_conn(self, cand: MXCandidate) -> TLSLevel:
        """check_conn returns the TLS level granted, or raises SMTPError to reject it."""
        return cand.tls_level

    def close(self) -> None:
        """close releases whatever the delivery held."""


class PolicyModule:
    """PolicyModule is the mixin of mx_auth policy modules (registered ``mx_auth.<name>``).

    Arguments after a policy name are ignored with a warning, as maddy does (A-96);
    ``local_policy`` overrides :meth:`inline_words` to accept ``off``.
    """

    #: Policy modules accept (and mostly ignore) inline words.
    inline_args = 64

    def inline_words(self, words: tuple[str, ...], warn: Any) -> None:
        """inline_words handles words written after the policy name."""
        if words:
            warn(f"arguments after the policy name are ignored: {' '.join(words)}")

    def start_delivery(self, msg_meta: Any) -> DeliveryPolicy:
        """start_delivery returns the per-delivery policy object."""
        raise NotImplementedError
