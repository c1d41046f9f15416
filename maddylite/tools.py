"""Operator commands that work on a configuration: ``deliver`` and ``queue list|flush|drop``.

They configure the runtime like ``check-config`` does (no endpoint needed), start only
what they use, and print one line per item.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from maddylite.config.errors import ConfigError
from maddylite.interfaces import DeliveryTarget, Endpoint, MsgMetadata
from maddylite.runtime import ConfigSource, Runtime

#: Exit statuses of ``deliver`` (sysexits.h): all delivered, temporary failure, otherwise.
EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE = 0, 75, 69


def load_runtime(source: ConfigSource) -> Runtime:
    """load_runtime configures a runtime without requiring an endpoint."""
    rt = Runtime(source)
    rt.configure(require_endpoint=False)
    return rt


def split_message(raw: bytes) -> tuple[bytes, bytes]:
    """split_message normalises line ends to CRLF and splits header and body like the endpoint."""
    from maddylite.modules.endpoint.smtp import split_message as split_crlf

    text = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    return split_crlf(text)


def pick_target(rt: Runtime, name: str | None) -> Any:
    """pick_target returns the named delivery target, or the only target.remote."""
    assert rt.builder is not None
    if name:
        inst = rt.instance(name)
        if inst is None:
            raise ConfigError(f"no such instance: {name}")
        if DeliveryTarget not in inst.roles:
            raise ConfigError(f"{name} is a {inst.mod_name} block, not a delivery target")
        return inst
    remotes = [m for m in rt.modules if m.mod_name == "target.remote"]
    if len(remotes) != 1:
        raise ConfigError("the configuration has several (or no) target.remote blocks: choose one with --target")
    return remotes[0]


def deliver(source: ConfigSource, target_name: str | None, mail_from: str, rcpts: Sequence[str], raw: bytes,
            out: TextIO | None = None) -> int:
    """deliver sends one message through a target now and prints a line per recipient."""
    out = out or sys.stdout
    from maddylite.modules.endpoint.smtp import normalize_address, tls_required_no

    rt = load_runtime(source)
    target = pick_target(rt, target_name)
    if target.mod_name == "target.queue":
        raise ConfigError("deliver sends now: choose a target that delivers (target.remote), not a queue")
    started = []
    try:
        for m in rt.modules:  # the target and everything it uses; no endpoints, no queues
            if Endpoint in m.roles or m.mod_name == "target.queue":
                continue
            m.start()
            started.append(m)
        header, body = split_message(raw)
        meta = MsgMetadata(
            id=f"deliver-{int(time.time())}",
            smtputf8=not (mail_from.isascii() and all(r.isascii() for r in rcpts)),
            body_8bit=not (header.isascii() and body.isascii()),
            tls_required_no=tls_required_no(header),
            size=len(header) + 2 + len(body),
        )
        norm = [normalize_address(r) for r in rcpts]
        results: dict[str, BaseException | None] = {}
        try:
            d = target.start_delivery(meta, mail_from)
        except Exception as e:  # noqa: BLE001 - reported per recipient
            results = {r: e for r in norm}
            d = None
        if d is not None:
            accepted = []
            for r in norm:
                try:
                    d.add_rcpt(r)
                    accepted.append(r)
                except Exception as e:  # noqa: BLE001 - reported per recipient
                    results[r] = e
            if accepted:
                results.update(d.body_per_rcpt(header, body))
                d.commit()
            else:
                d.abort()
        return _report(d, norm, rcpts, results, out)
    finally:
        for m in reversed(started):
            m.stop(5.0)


def _report(d: Any, norm: Sequence[str], rcpts: Sequence[str], results: dict[str, BaseException | None], out: TextIO) -> int:
    temp = perm = 0
    for shown, r in zip(rcpts, norm, strict=True):
        err = results.get(r)
        info = d.describe(r) if d is not None and hasattr(d, "describe") else {"mx": "-", "tls_level": "-", "mx_level": "-"}
        if err is None:
            code, enh, status, text = 250, "2.0.0", "delivered", ""
        else:
            code = getattr(err, "code", 451)
            e = getattr(err, "enhanced", (4, 0, 0))
            enh = ".".join(str(x) for x in e)
            temporary = getattr(err, "temporary", True)
            status = "temporary-failure" if temporary else "permanent-failure"
            text = getattr(err, "message", str(err))
            temp += bool(temporary)
            perm += not temporary
        out.write(f"{shown}\t{status}\t{code}\t{enh}\tmx={info['mx']}\ttls_level={info['tls_level']}\tmx_level={info['mx_level']}"
                  + (f"\t{text}" if text else "") + "\n")
    if perm:
        return EX_UNAVAILABLE
    if temp:
        return EX_TEMPFAIL
    return EX_OK


def queues(rt: Runtime) -> list[Any]:
    """queues returns the configured target.queue instances."""
    return [m for m in rt.modules if m.mod_name == "target.queue"]


def queue_list(source: ConfigSource, out: TextIO | None = None) -> int:
    """queue_list prints each waiting message and recipient: attempts, next try, last error."""
    out = out or sys.stdout
    from maddylite.modules.target.queue import retry_delay

    rt = load_runtime(source)
    for q in queues(rt):
        ids = q.list_ids()
        out.write(f"# {q.label} {q.location}: {len(ids)} message(s)\n")
        for msg_id in ids:
            try:
                qm = q.read_meta(msg_id)
            except (OSError, ValueError) as e:
                out.write(f"{msg_id}\tunreadable: {e}\n")
                continue
            if qm.last_attempt is None:
                next_try = "now"
            else:
                n = min((qm.tries.get(r, 0) for r in qm.pending), default=1) or 1
                when = qm.last_attempt + retry_delay(n, q.settings.initial_retry_time, q.settings.retry_time_scale)
                next_try = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
            out.write(f"{msg_id}\tfrom=<{qm.sender}>\tattempts={qm.attempts}\tnext_try={next_try}\n")
            for r in qm.pending:
                err = qm.errors.get(r)
                last = "-"
                if err:
                    enh = ".".join(str(x) for x in err.get("enhanced", []))
                    fields = err.get("fields", {})
                    extra = [f"mx: {err['remote_server']}"] if err.get("remote_server") else []
                    extra += [f"{k}: {fields[k]}" for k in ("reason", "mx_level", "required_mx_level", "tls_level",
                                                            "required_tls_level", "tls_err") if fields.get(k)]
                    last = f"{err.get('code')} {enh} {err.get('message')}" + (f" ({'; '.join(extra)})" if extra else "")
                out.write(f"  {r}\ttries={qm.tries.get(r, 0)}\tlast_error={last}\n")
    return 0


def queue_flush(source: ConfigSource, msg_id: str | None, out: TextIO | None = None) -> int:
    """queue_flush asks the running server to try messages now (all, or one)."""
    out = out or sys.stdout
    rt = load_runtime(source)
    found = 0
    for q in queues(rt):
        if msg_id is None or msg_id in q.list_ids():
            found += q.flush(msg_id)
    out.write(f"flush requested for {found} message(s)\n")
    return 0 if found or msg_id is None else 1


def queue_drop(source: ConfigSource, msg_id: str, out: TextIO | None = None) -> int:
    """queue_drop deletes a message from the queue without delivering it."""
    out = out or sys.stdout
    rt = load_runtime(source)
    for q in queues(rt):
        if q.drop(msg_id):
            out.write(f"dropped {msg_id}\n")
            return 0
    out.write(f"no such message: {msg_id}\n")
    return 1


def mtasts_instances(rt: Runtime) -> list[Any]:
    """mtasts_instances returns the configured MTA-STS policy modules."""
    return [m for m in rt.modules if m.mod_name == "mx_auth.mtasts"]


def mtasts_command(source: ConfigSource, action: str, domain: str | None, out: TextIO | None = None) -> int:
    """mtasts_command lists, purges or re-fetches the cached MTA-STS policies of a configuration.

    It works on ``fs`` caches (the files a running server uses too); a ``ram`` cache
    lives only inside the server process and is reported as such.
    """
    out = out or sys.stdout
    rt = load_runtime(source)
    status = 0
    instances = mtasts_instances(rt)
    if not instances:
        out.write("no mtasts policy in this configuration\n")
        return 1
    for m in instances:
        where = getattr(m, "fs_dir", None) if m.cache_kind == "fs" else None
        out.write(f"# {m.label} cache={m.cache_kind}" + (f" {where}" if where else "") + "\n")
        if m.cache_kind != "fs":
            out.write("  (a ram cache exists only inside the running server)\n")
            continue
        if action == "list":
            now = time.time()
            for e in sorted(m.cached(), key=lambda e: e.domain):
                state = "valid" if e.expires_at > now else "expired"
                out.write(f"{e.domain}\tid={e.id}\tmode={e.mode}\tmx={','.join(e.mx) or '-'}\t"
                          f"fetched={time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e.fetched_at))}\t"
                          f"expires={time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e.expires_at))}\t{state}\n")
        elif action == "purge":
            out.write(f"purged {m.purge(domain)} polic{'y' if domain else 'ies'}\n")
        else:
            try:
                m.refresh(domain)
                out.write(f"refreshed {domain or 'all cached domains'}\n")
            except Exception as e:  # noqa: BLE001 - reported, exit status 1
                out.write(f"refresh failed: {e}\n")
                status = 1
    return status
