"""target.queue: a durable on-disk queue that retries deliveries and bounces failures.

Registered name: ``target.queue``. Roles: DeliveryTarget. Behaviour: behaviour.md
section D; DSNs per RFC 3464 (multipart/report, message/delivery-status).

Accepting a message writes ``<id>.header``, ``<id>.body`` and ``<id>.meta`` (JSON,
written to ``<id>.meta.new``, fsynced and renamed; the directory is fsynced too), so a
250 given by the endpoint means the message is on disk (D-1). Attempts run in a bounded
greenlet pool (``max_parallelism``, D-2) and each re-reads the files (D-34). A recipient
that fails temporarily is retried after ``initial_retry_time × retry_time_scale^(n−1)``
(computed in floating point, D-13) until ``max_tries``; permanent failures are final
(D-12, D-14). Failed recipients are reported to the sender by a DSN through the
``bounce { deliver_to ... }`` block (D-23..D-29). On start the queue reloads its
directory (D-17..D-19); on stop it waits for the attempts in progress (D-33), so a
reload hands the queue over without losing or repeating a delivered recipient (E-5).
"""

from __future__ import annotations

import heapq
import json
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime, formatdate
from typing import Any

import gevent
import gevent.event
import gevent.pool

from maddylite.config.directives import (
    Bool,
    Custom,
    Directive,
    Duration,
    Float,
    Int,
    ModuleRef,
    Settings,
    process,
)
from maddylite.config.directives import String as StringType
from maddylite.config.errors import ConfigError
from maddylite.config.nodes import ConfigNode
from maddylite.interfaces import DeliveryTarget, MsgMetadata
from maddylite.log import Logger
from maddylite.registry import ModuleBase, register
from maddylite.smtp.client import header_address
from maddylite.smtp.errors import SMTPError

#: How often the directory is scanned for unscheduled messages and flush requests.
RESCAN_INTERVAL = 5.0
#: Most accepted messages kept in memory for their first attempt (the rest are read back).
FRESH_MAX = 256
#: Unscheduled messages younger than this are left to their writer.
RESCAN_MIN_AGE = 30.0


def retry_delay(tries: int, initial: float, scale: float) -> float:
    """retry_delay is the wait after the ``tries``-th failed attempt: initial × scale^(tries−1) (D-13)."""
    return float(initial) * float(scale) ** max(0, tries - 1)


def classify(err: BaseException) -> bool:
    """classify tells whether an error is temporary (D-12): 4xx or marked so; unknown → temporary."""
    temporary = getattr(err, "temporary", None)
    if isinstance(temporary, bool):
        return temporary
    code = getattr(err, "code", None)
    if isinstance(code, int):
        return code // 100 != 5
    return True


def error_record(err: BaseException) -> dict[str, Any]:
    """error_record is the JSON form of a recipient's last error."""
    if isinstance(err, SMTPError):
        return err.as_dict()
    return {"code": 451, "enhanced": [4, 0, 0], "message": str(err) or type(err).__name__, "temporary": classify(err),
            "remote_server": None, "fields": {}}


@dataclass
class QueueMeta:
    """QueueMeta is the ``<id>.meta`` record of one queued message."""

    id: str
    sender: str
    msg: dict[str, Any]
    pending: list[str]
    tries: dict[str, int] = field(default_factory=dict)
    errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    first_attempt: float | None = None
    last_attempt: float | None = None
    received: float = 0.0
    attempts: int = 0
    delay_notified: bool = False

    def to_json(self) -> dict[str, Any]:
        """to_json returns the record as saved."""
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QueueMeta:
        """from_json reads a saved record."""
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


#: The bounce target is the queue itself (``bounce { deliver_to &<this queue> }``).
SELF = "self"


_DSN_TARGET = ModuleRef(role=DeliveryTarget, namespace="target")


def _parse_dsn_target(node: ConfigNode, builder: Any) -> Any:
    """_parse_dsn_target reads ``deliver_to``: SELF for the queue being configured, else a
    delivery target. A queue may send its DSNs through itself; that is no reference cycle,
    since a DSN (null sender) never produces another DSN."""
    current = builder.current_instance() if builder is not None else None
    if current is not None and not node.has_block and len(node.args) == 1 \
            and builder.resolves_to(node.args[0], current):
        return SELF
    return _DSN_TARGET.parse(node, builder)


def _parse_bounce(node: ConfigNode, builder: Any) -> Any:
    if node.args:
        raise ConfigError("bounce takes no arguments, only a block")
    specs = (Directive(name="deliver_to", type=Custom(fn=_parse_dsn_target, syntax_text=_DSN_TARGET.syntax),
                       required=True, help="Where DSNs are delivered."),)
    s = process(specs, node.block, block=node, builder=builder)  # unknown, repeated or missing lines are errors
    return s.deliver_to


class _QueueDelivery:
    """_QueueDelivery stores one incoming message in the queue."""

    def __init__(self, q: Queue, meta: MsgMetadata, mail_from: str) -> None:
        self.q = q
        self.meta = meta
        self.mail_from = mail_from
        self.rcpts: list[str] = []
        self.stored = False

    def add_rcpt(self, rcpt: str) -> None:
        if rcpt not in self.rcpts:
            self.rcpts.append(rcpt)

    def body(self, header: bytes, body: bytes) -> None:
        self.q.store(self.meta, self.mail_from, self.rcpts, header, body)
        self.stored = True

    def body_per_rcpt(self, header: bytes, body: bytes) -> Mapping[str, Exception | None]:
        self.body(header, body)
        return {r: None for r in self.rcpts}

    def commit(self) -> None:
        if self.stored:
            self.q.schedule(self.meta.id, self.q.clock())

    def abort(self) -> None:
        if self.stored:
            self.q.remove(self.meta.id)
            self.stored = False


@register("target.queue")
class Queue(ModuleBase):
    """Queue is the durable retry queue (registered as ``target.queue``)."""

    roles = (DeliveryTarget,)
    inline_args = 1

    directives = (
        Directive(name="target", type=ModuleRef(role=DeliveryTarget, namespace="target"), required=True, help="Where queued messages are delivered (usually a target.remote)."),
        Directive(name="location", type=StringType(), default=None, help="Queue directory; default <state_dir>/<instance name>; relative paths are relative to state_dir."),
        Directive(name="max_parallelism", type=Int(minimum=1), default=16, help="Most delivery attempts running at once."),
        Directive(name="max_tries", type=Int(minimum=1), default=20, help="Attempts before a temporarily failing recipient is given up."),
        Directive(name="initial_retry_time", type=Duration(), default=900.0, help="Wait after the first failed attempt."),
        Directive(name="retry_time_scale", type=Float(minimum=1.0), default=1.2, help="Factor applied to the wait after each further failed attempt."),
        Directive(name="post_init_delay", type=Duration(), default=10.0, help="Earliest retry after the queue starts."),
        Directive(name="delay_notice", type=Duration(), default=4 * 3600.0, help="After this long without delivery the sender gets one 'still trying' DSN naming the reason (needs bounce; 0 disables)."),
        Directive(name="bounce", type=Custom(fn=_parse_bounce, syntax_text="{ deliver_to <target> }"), default=None, help="Where delivery status notifications go; without it failures are only logged."),
        Directive(name="autogenerated_msg_domain", type=StringType(), inherit_global=True, default=None, help="Domain of the From and Message-Id of DSNs."),
        Directive(name="hostname", type=StringType(), required=True, inherit_global=True, help="Reporting-MTA name in DSNs."),
        Directive(name="debug", type=Bool(), inherit_global=True, default=False, help="Verbose logging."),
    )

    #: Clock (epoch seconds); injectable for tests.
    clock: Callable[[], float] = staticmethod(time.time)  # type: ignore[assignment]

    def configure(self, inline: tuple[str, ...], settings: Settings) -> None:
        """configure resolves the location; the directory is created at start."""
        location = inline[0] if inline else settings.location
        if location is None:
            if not self.instance_name:
                raise ConfigError("queue: need explicit location directive or inline argument if defined inline")
            location = self.instance_name
        self._location = location
        if settings.bounce is not None and not settings.autogenerated_msg_domain:
            raise ConfigError("queue: autogenerated_msg_domain is required if bounce {} is specified")
        self.target: DeliveryTarget = settings.target
        self.bounce_target: DeliveryTarget | None = self if settings.bounce == SELF else settings.bounce
        self.log = Logger(f"queue/{self.instance_name}" if self.instance_name else "queue", settings.debug)
        self._heap: list[tuple[float, str]] = []
        self._scheduled: dict[str, float] = {}
        self._wake = gevent.event.Event()
        self._pool = gevent.pool.Pool(settings.max_parallelism)
        self._running: set[str] = set()
        #: Messages accepted and not yet attempted, kept so the first attempt skips the reads.
        self._fresh: dict[str, tuple[QueueMeta, bytes, bytes]] = {}
        #: Records an attempt could not write back (a full disk): newer than the file.
        self._unwritten: dict[str, QueueMeta] = {}
        self._scheduler: gevent.Greenlet | None = None

    def configure_block(self, inline: Sequence[str], block: ConfigNode, builder: Any) -> None:
        """configure_block configures the queue; two queues of one configuration may not
        share a directory, since each would deliver the other's messages too."""
        super().configure_block(inline, block, builder)
        here = os.path.abspath(self.location)
        for other in getattr(builder, "order", ()):
            if isinstance(other, Queue) and other is not self and os.path.abspath(other.location) == here:
                raise ConfigError(f"queue: location {here} is already used by {other.label}").at_node(block)

    @property
    def location(self) -> str:
        """location is the queue directory (absolute)."""
        if os.path.isabs(self._location) or self.runtime is None:
            return self._location
        return os.path.join(self.runtime.state_dir, self._location)

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """start creates the directory, loads saved messages and starts scheduling (D-17, D-18)."""
        os.makedirs(self.location, mode=0o700, exist_ok=True)
        self._load()
        self._start_scheduler()

    def _start_scheduler(self) -> None:
        if self._scheduler is None or self._scheduler.dead:
            self._scheduler = gevent.spawn(self._schedule_loop)
            self._scheduler.name = f"{self.label} scheduler"

    def early_stop(self) -> None:
        """early_stop stops scheduling and waits for attempts in progress (D-33, E-2)."""
        if self._scheduler is not None:
            self._scheduler.kill()
            self._scheduler = None
        self._pool.join()

    def resume(self) -> None:
        """resume schedules again after a failed reload (E-11)."""
        self._start_scheduler()

    def stop(self, timeout: float) -> None:
        """stop is early_stop with a bound: attempts still running then are killed."""
        if self._scheduler is not None:
            self._scheduler.kill()
            self._scheduler = None
        self._pool.join(timeout=timeout)
        self._pool.kill(timeout=1)

    # -- storing --------------------------------------------------------------------

    def start_delivery(self, meta: MsgMetadata, mail_from: str) -> _QueueDelivery:
        """start_delivery accepts a message for the queue; nothing is written before body()."""
        return _QueueDelivery(self, meta, mail_from)

    def _path(self, msg_id: str, ext: str) -> str:
        return os.path.join(self.location, f"{msg_id}.{ext}")

    def store(self, meta: MsgMetadata, sender: str, rcpts: Sequence[str], header: bytes, body: bytes) -> None:
        """store writes header, body and metadata durably (D-1); raises SMTPError 451 on failure."""
        if not os.path.isdir(self.location):
            os.makedirs(self.location, mode=0o700, exist_ok=True)
        msg = meta.to_json()
        msg["size"] = len(header) + 2 + len(body) if header else len(body)
        qm = QueueMeta(id=meta.id, sender=sender, msg=msg, pending=list(rcpts), tries={r: 0 for r in rcpts}, received=self.clock())
        try:
            _write_file(self._path(meta.id, "header"), header)
            _write_file(self._path(meta.id, "body"), body)
            self._write_meta(qm)
            if len(self._fresh) < FRESH_MAX:
                self._fresh[meta.id] = (QueueMeta.from_json(qm.to_json()), header, body)
        except OSError as e:
            self.log.error("cannot store message", e, msg_id=meta.id)
            self.remove(meta.id, partial=True)
            raise SMTPError(451, (4, 3, 0), "Temporary storage failure, try again later") from e

    def _write_meta(self, qm: QueueMeta) -> None:
        tmp = self._path(qm.id, "meta.new")
        _write_file(tmp, json.dumps(qm.to_json(), ensure_ascii=False).encode())
        os.replace(tmp, self._path(qm.id, "meta"))
        _fsync_dir(self.location)

    def read_meta(self, msg_id: str) -> QueueMeta:
        """read_meta loads one message's metadata."""
        with open(self._path(msg_id, "meta"), encoding="utf-8") as f:
            return QueueMeta.from_json(json.load(f))

    def remove(self, msg_id: str, partial: bool = False) -> None:
        """remove deletes a message's files (``partial``: also a half-written meta)."""
        self._fresh.pop(msg_id, None)
        self._unwritten.pop(msg_id, None)
        for ext in ("meta", "meta.new", "header", "body") if partial else ("meta", "header", "body"):
            try:
                os.unlink(self._path(msg_id, ext))
            except FileNotFoundError:
                pass
        self._scheduled.pop(msg_id, None)

    def list_ids(self) -> list[str]:
        """list_ids returns the ids of the messages waiting in the directory."""
        try:
            names = os.listdir(self.location)
        except FileNotFoundError:
            return []
        return sorted(n[: -len(".meta")] for n in names if n.endswith(".meta"))

    def _load(self) -> None:
        start = self.clock()
        count = 0
        for msg_id in self.list_ids():
            if not (os.path.exists(self._path(msg_id, "header")) and os.path.exists(self._path(msg_id, "body"))):
                self.log.info("removed dangling file", msg_id=msg_id)
                self.remove(msg_id)
                continue
            try:
                qm = self.read_meta(msg_id)
            except (OSError, ValueError, TypeError) as e:
                self.log.error("cannot read queue entry", e, msg_id=msg_id)
                continue
            when = start
            if qm.last_attempt is not None and qm.pending:
                n = min(qm.tries.get(r, 0) for r in qm.pending) or 1
                when = qm.last_attempt + retry_delay(n, self.settings.initial_retry_time, self.settings.retry_time_scale)
            self.schedule(msg_id, max(when, start + self.settings.post_init_delay))
            count += 1
        self.log.info(f"loaded {count} saved queue entries")

    # -- scheduling -----------------------------------------------------------------

    def schedule(self, msg_id: str, when: float) -> None:
        """schedule sets the next attempt of a message."""
        self._scheduled[msg_id] = when
        heapq.heappush(self._heap, (when, msg_id))
        self._wake.set()

    def next_attempts(self) -> dict[str, float]:
        """next_attempts maps message ids to their scheduled time."""
        return dict(self._scheduled)

    def rescan(self) -> None:
        """rescan picks up messages nobody schedules and flush requests (``maddylite queue flush``).

        A message committed by an old runtime while a reload was switching over, or
        written by another process, is found here; files younger than
        :data:`RESCAN_MIN_AGE` are left alone, since their writer is about to schedule them.
        """
        try:
            names = os.listdir(self.location)
        except OSError:
            return
        now = self.clock()
        flush_all = "flush" in names
        for name in names:
            if name.endswith(".flush") or (flush_all and name.endswith(".meta")):
                msg_id = name.rsplit(".", 1)[0]
                if os.path.exists(self._path(msg_id, "meta")) and msg_id not in self._running:
                    self.schedule(msg_id, now)
                if name.endswith(".flush"):
                    self._unlink(os.path.join(self.location, name))
            elif name.endswith(".meta"):
                msg_id = name[: -len(".meta")]
                if msg_id in self._scheduled or msg_id in self._running:
                    continue
                try:
                    age = time.time() - os.stat(os.path.join(self.location, name)).st_mtime
                except OSError:
                    continue
                if age >= RESCAN_MIN_AGE:
                    self.schedule(msg_id, now)
        if flush_all:
            self._unlink(os.path.join(self.location, "flush"))

    @staticmethod
    def _unlink(path: str) -> None:
        try:
            os.unlink(path)
        except OSError:
            pass

    def _schedule_loop(self) -> None:
        next_scan = self.clock() + RESCAN_INTERVAL
        while True:
            self._wake.clear()
            now = self.clock()
            if now >= next_scan:
                self.rescan()
                next_scan = now + RESCAN_INTERVAL
            while self._heap and self._heap[0][0] <= now:
                # Wait for a slot before taking the message off the heap (D-2): killed
                # here by early_stop, the scheduler leaves it scheduled for resume (E-11).
                self._pool.wait_available()
                when, msg_id = heapq.heappop(self._heap)
                if self._scheduled.get(msg_id) != when or msg_id in self._running:
                    continue  # superseded by a later schedule() call
                del self._scheduled[msg_id]
                self._running.add(msg_id)
                self._pool.spawn(self._attempt_guarded, msg_id)  # a slot is free: does not block
                now = self.clock()
            until = min(self._heap[0][0], next_scan) if self._heap else next_scan
            self._wake.wait(timeout=max(0.0, until - self.clock()))

    # -- attempts -------------------------------------------------------------------

    def _attempt_guarded(self, msg_id: str) -> None:
        try:
            self.attempt(msg_id)
        except Exception as e:  # noqa: BLE001 - a crash marks only this message broken (D-21)
            self.log.error("delivery attempt crashed, message set aside", e, msg_id=msg_id)
            try:
                os.replace(self._path(msg_id, "meta"), self._path(msg_id, "meta_broken"))
            except OSError:
                pass
        finally:
            self._running.discard(msg_id)

    def attempt(self, msg_id: str) -> None:
        """attempt delivers the pending recipients of one message once."""
        fresh = self._fresh.pop(msg_id, None)
        if fresh is not None and os.path.exists(self._path(msg_id, "meta")):
            # The first attempt right after acceptance uses what was just written;
            # retries always read the files again (D-34).
            qm, header, body = fresh
        else:
            try:
                qm = self.read_meta(msg_id)
            except FileNotFoundError:
                self._unwritten.pop(msg_id, None)
                return  # dropped meanwhile
            # the file is behind when the last attempt could not write its record back
            qm = self._unwritten.pop(msg_id, qm)
            with open(self._path(msg_id, "header"), "rb") as f:
                header = f.read()
            with open(self._path(msg_id, "body"), "rb") as f:
                body = f.read()
        meta = MsgMetadata.from_json(qm.msg)
        now = self.clock()
        qm.attempts += 1
        qm.first_attempt = qm.first_attempt or now
        qm.last_attempt = now
        results = self._deliver(meta, qm.sender, qm.pending, header, body)
        perm_failed: list[str] = []
        still: list[str] = []
        for rcpt in qm.pending:
            err = results.get(rcpt)
            if err is None:
                self.log.info("delivered", msg_id=msg_id, rcpt=rcpt, attempt=qm.attempts)
                continue
            qm.tries[rcpt] = qm.tries.get(rcpt, 0) + 1
            qm.errors[rcpt] = error_record(err)
            if classify(err) and qm.tries[rcpt] < self.settings.max_tries:
                self.log.info("delivery attempt failed", msg_id=msg_id, rcpt=rcpt, reason=str(err), attempt=qm.attempts)
                still.append(rcpt)
            else:
                self.log.error("not delivered, permanent error", err, msg_id=msg_id, rcpt=rcpt, attempt=qm.attempts)
                perm_failed.append(rcpt)
        qm.pending = still
        qm.failed.extend(perm_failed)
        if perm_failed:
            self._bounce(qm, perm_failed, header)
        if not still:
            self.remove(msg_id)
            return
        notice = self.settings.delay_notice
        if notice and not qm.delay_notified and not perm_failed and now - qm.received >= notice:
            # at most one DSN per attempt (D-27): after a failure DSN the notice waits a turn
            qm.delay_notified = True
            self._bounce(qm, still, header, delayed=True)
        n = min(qm.tries[r] for r in still)
        delay = retry_delay(n, self.settings.initial_retry_time, self.settings.retry_time_scale)
        if not os.path.exists(self._path(msg_id, "meta")):
            # dropped while the attempt ran (``maddylite queue drop``): not written back
            self.log.info("dropped during the attempt", msg_id=msg_id)
            self.remove(msg_id)
            return
        try:
            self._write_meta(qm)
        except OSError as e:
            # Not a crash (D-21): the message is on disk, only its record is behind. The
            # newer record is kept for the next attempt, so that no recipient delivered
            # now is sent again, and written then.
            self.log.error("cannot update queue entry, keeping it in memory", e, msg_id=msg_id)
            self._unwritten[msg_id] = qm
        self.log.info("will retry", msg_id=msg_id, rcpts=len(still), next_try_delay=round(delay, 2))
        self.schedule(msg_id, now + delay)

    def _deliver(self, meta: MsgMetadata, sender: str, rcpts: list[str], header: bytes, body: bytes) -> dict[str, BaseException | None]:
        """_deliver runs one attempt; every recipient gets a result, and None (delivered)
        only from the target's body step: an accepted RCPT alone delivers nothing."""
        results: dict[str, BaseException | None] = {}
        try:
            delivery = self.target.start_delivery(meta, sender)
        except SMTPError as e:  # the error applies to every recipient
            return {r: e for r in rcpts}
        final: set[str] = set()  # recipients whose result is known
        try:
            accepted = []
            add_many = getattr(delivery, "add_rcpts", None)
            if add_many is not None:
                for r, err in add_many(rcpts).items():
                    if err is None:
                        accepted.append(r)
                    else:
                        results[r] = err
                        final.add(r)
            else:
                for r in rcpts:
                    try:
                        delivery.add_rcpt(r)
                    except SMTPError as e:  # per recipient (D-9, D-10)
                        results[r] = e
                        final.add(r)
                        continue
                    accepted.append(r)
            if not accepted:
                delivery.abort()  # D-11: no DATA
                return results
            body_results = delivery.body_per_rcpt(header, body)
            for r in accepted:
                # a target that gives an accepted recipient no result has not delivered it
                results[r] = body_results[r] if r in body_results else SMTPError(
                    451, (4, 3, 0), "The delivery target gave no result for this recipient")
                final.add(r)
            delivery.commit()
        except gevent.GreenletExit:
            # killed when stop's bound ran out (D-33): the delivery still lets go of its
            # connections and slots (B-1)
            try:
                delivery.abort()
            except Exception:  # noqa: BLE001
                pass
            raise
        except Exception as e:  # noqa: BLE001 - anything unexpected fails the rest temporarily
            for r in rcpts:
                if r not in final:
                    results[r] = e
            try:
                delivery.abort()
            except Exception:  # noqa: BLE001
                pass
            if not isinstance(e, SMTPError):
                raise
        return results

    # -- DSN ------------------------------------------------------------------------

    def _bounce(self, qm: QueueMeta, failed: list[str], header: bytes, *, delayed: bool = False) -> None:
        if not qm.sender:
            return  # never a DSN for a DSN (D-24)
        if self.bounce_target is None:
            return
        meta = MsgMetadata.from_json(qm.msg)
        dsn_header, dsn_body = build_dsn(
            qm, failed, header, hostname=self.settings.hostname,
            msg_domain=self.settings.autogenerated_msg_domain, smtputf8=meta.smtputf8, delayed=delayed,
        )
        dsn_meta = MsgMetadata(id=uuid.uuid4().hex, smtputf8=meta.smtputf8, requiretls=meta.requiretls)
        try:
            d = self.bounce_target.start_delivery(dsn_meta, "")
            d.add_rcpt(qm.sender)
            d.body(dsn_header, dsn_body)
            d.commit()
            self.log.info("delay notice sent" if delayed else "DSN sent", msg_id=qm.id, dsn_id=dsn_meta.id, rcpts=len(failed))
        except Exception as e:  # noqa: BLE001 - a failed DSN is logged, the message is done
            self.log.error("cannot send DSN", e, msg_id=qm.id)

    # -- tools ----------------------------------------------------------------------

    def flush(self, msg_id: str | None = None) -> int:
        """flush asks the running queue (through a marker file) to try messages now."""
        ids = [msg_id] if msg_id else self.list_ids()
        if msg_id is None:
            open(os.path.join(self.location, "flush"), "w").close()
        else:
            open(self._path(msg_id, "flush"), "w").close()
        return len(ids)

    def drop(self, msg_id: str) -> bool:
        """drop deletes a message without delivering it; a message set aside as broken
        (D-21) or an unknown id is left alone and reported as not found."""
        if os.sep in msg_id or msg_id.startswith(".") or not os.path.exists(self._path(msg_id, "meta")):
            return False  # an id names a file of this directory, nothing else
        self.remove(msg_id)
        return True


def _rfc822_date(ts: float | None) -> str:
    if ts is None:
        return formatdate(localtime=False)
    return format_datetime(datetime.fromtimestamp(ts, UTC))


def build_dsn(qm: QueueMeta, failed: Sequence[str], orig_header: bytes, *, hostname: str, msg_domain: str,
              smtputf8: bool = False, delayed: bool = False) -> tuple[bytes, bytes]:
    """build_dsn returns the header and body of a DSN [RFC 3464] (D-23, D-26, D-28).

    With ``delayed`` it is a "still trying" notice (``Action: delayed``) for recipients
    that are still pending, naming the reason of their last failure.
    """
    boundary = "=_" + uuid.uuid4().hex
    originals = qm.msg.get("original_rcpts") or {}
    status_type = "message/global-delivery-status" if smtputf8 else "message/delivery-status"
    headers_type = "message/global-headers" if smtputf8 else "message/rfc822-headers"
    header = (
        f"From: MAILER-DAEMON@{msg_domain}\r\n"
        f"To: {header_address(qm.sender, smtputf8)}\r\n"
        f"Subject: {'Delayed Mail (still being retried)' if delayed else 'Undelivered Mail Returned to Sender'}\r\n"
        f"Date: {formatdate(localtime=False)}\r\n"
        f"Message-Id: <{uuid.uuid4().hex}@{msg_domain}>\r\n"
        f"Auto-Submitted: auto-replied\r\n"
        f"MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"\r\n'
    ).encode()
    lines = [
        "This is a delivery status notification from " + hostname + ".",
        "",
        ("The message has not been delivered yet to these recipients; delivery will be retried:" if delayed
         else "The message could not be delivered to these recipients:"),
        "",
    ]
    per = []
    for rcpt in failed:
        err = qm.errors.get(rcpt, {})
        code = err.get("code", 550)
        enh = ".".join(str(x) for x in err.get("enhanced", [5, 0, 0]))
        text = str(err.get("message", "delivery failed")).replace("\r", " ").replace("\n", " ")
        reason = (err.get("fields") or {}).get("reason")
        if delayed and reason and str(reason) not in text:
            text += f" ({reason})"
        if err.get("remote_server") and str(err["remote_server"]) not in text:
            text += f" [{err['remote_server']}]"
        shown = originals.get(rcpt, rcpt)
        lines.append(f"  {shown}: {code} {enh} {text}")
        per.append(
            f"Final-Recipient: {'utf-8' if smtputf8 else 'rfc822'}; {header_address(shown, smtputf8)}\r\n"
            f"Action: {'delayed' if delayed else 'failed'}\r\nStatus: {enh}\r\nDiagnostic-Code: smtp; {code} {enh} {text}\r\n"
        )
    human = "\r\n".join(lines) + "\r\n"
    status = (
        f"Reporting-MTA: dns; {hostname}\r\n"
        f"Arrival-Date: {_rfc822_date(qm.received)}\r\n"
        f"Last-Attempt-Date: {_rfc822_date(qm.last_attempt)}\r\n\r\n" + "\r\n".join(per)
    )
    body = (
        f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{human}\r\n"
        f"--{boundary}\r\nContent-Type: {status_type}\r\n\r\n{status}\r\n"
        f"--{boundary}\r\nContent-Type: {headers_type}\r\n\r\n"
    ).encode() + orig_header.rstrip(b"\r\n") + f"\r\n\r\n--{boundary}--\r\n".encode()
    return header, body

