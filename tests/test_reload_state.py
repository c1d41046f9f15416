"""What a reload carries over and what it does not (behaviour.md E-8..E-10; E-7 is in test_reload.py)."""

import time

from maddylite.modules.mx_auth.mtasts import CachedPolicy, Policy
from maddylite.modules.target.remote import _Idle

from maddylite.policy import MXCandidate
from maddylite.smtp.errors import SMTPError

CONF = "hostname h\nmx_auth p {{\n mtasts {{\n  cache {cache}\n }}\n}}\nlimits l {{\n all concurrency 1\n}}\ntarget.remote r {{\n mx_auth &p\n limits &l\n}}\n"


class FakeConn:
    """FakeConn stands for an idle SMTP connection and records QUIT."""

    def __init__(self):
        self.quits = 0
        self.last_used = time.monotonic()
        self.transactions = 1

    def quit(self, timeout=5.0):
        self.quits += 1


def test_new_remote_has_empty_pool_old_idle_connections_get_quit_E_8(build_config):
    """E-8: the new target.remote starts with an empty pool; the old one QUITs its idle connections."""
    old = build_config(CONF.format(cache="ram")).instance("r")
    conn = FakeConn()
    old.pool.put(old.pool_key("example.test", False), _Idle(conn, MXCandidate("example.test", "mx.example.test.", 10, conn=conn)))
    new = build_config(CONF.format(cache="ram")).instance("r")
    assert old.pool.count() == 1 and new.pool.count() == 0
    old.stop(1)
    assert conn.quits == 1 and old.pool.count() == 0


def test_mtasts_fs_cache_survives_ram_cache_does_not_E_9(build_config):
    """E-9: an fs cache carries over through the disk, a ram cache is lost."""
    entry = CachedPolicy("example.test", "id1", Policy("enforce", 86400, ("mx.example.test",)), time.time())
    for cache, survives in (("fs", True), ("ram", False)):
        old = build_config(CONF.format(cache=cache)).instance("p").policies()[0]
        old.start()
        old.store.put(entry)
        old.stop(1)
        new = build_config(CONF.format(cache=cache)).instance("p").policies()[0]
        new.start()
        assert [e.domain for e in new.cached()] == (["example.test"] if survives else []), cache
        new.stop(1)


def test_limit_counters_start_fresh_E_10(build_config):
    """E-10: a reloaded limits block has its own, empty counters."""
    old = build_config(CONF.format(cache="ram")).instance("l")
    old.wait = 0.1
    old.take_msg("127.0.0.1", "example.org")
    try:
        old.take_msg("127.0.0.1", "example.org")
        raise AssertionError("the old limit should be full")
    except SMTPError as e:
        assert e.code == 451
    new = build_config(CONF.format(cache="ram")).instance("l")
    new.take_msg("127.0.0.1", "example.org")  # would time out if counters were shared
    new.release_msg("127.0.0.1", "example.org")
