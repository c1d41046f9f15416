"""maddylite.flights: one greenlet per question at a time, shared by concurrent callers."""

import gevent
import gevent.event
import gevent.pool

from maddylite.flights import SharedFlights


def _asker(calls, gate):
    def ask(q):
        calls.append(q)
        gate.wait()
        return f"answer {q}"
    return ask


def test_concurrent_callers_share_one_greenlet():
    calls, gate, group, fl = [], gevent.event.Event(), gevent.pool.Group(), SharedFlights()
    ask = _asker(calls, gate)
    a = fl.spawn(group, "k", "q k", ask, "k")
    b = fl.spawn(group, "k", "q k", ask, "k")
    c = fl.spawn(group, "other", "q other", ask, "other")
    assert a is b and a is not c
    assert fl.running() == 2
    gate.set()
    assert (a.get(), c.get()) == ("answer k", "answer other")
    assert sorted(calls) == ["k", "other"]


def test_a_finished_question_is_asked_again():
    calls, gate, group, fl = [], gevent.event.Event(), gevent.pool.Group(), SharedFlights()
    gate.set()
    ask = _asker(calls, gate)
    first = fl.spawn(group, "k", "q", ask, "k")
    first.get()
    gevent.sleep(0)  # the link that forgets it runs
    second = fl.spawn(group, "k", "q", ask, "k")
    assert second is not first and second.get() == "answer k"
    assert calls == ["k", "k"] and fl.running() == 0


def test_released_by_one_of_two_users_keeps_running_last_release_kills():
    calls, gate, group, fl = [], gevent.event.Event(), gevent.pool.Group(), SharedFlights()
    ask = _asker(calls, gate)
    a = fl.spawn(group, "k", "q", ask, "k")
    fl.spawn(group, "k", "q", ask, "k")
    gevent.sleep(0)
    fl.release("k", a)
    gevent.sleep(0)
    assert not a.dead  # the other user still waits for it
    fl.release("k", a)
    gevent.sleep(0)
    assert a.dead and fl.running() == 0
    # a new caller starts afresh rather than getting the killed one
    gate.set()
    assert fl.spawn(group, "k", "q", ask, "k").get() == "answer k"


def test_release_after_it_finished_is_harmless():
    group, fl = gevent.pool.Group(), SharedFlights()
    g = fl.spawn(group, "k", "q", lambda: 42)
    assert g.get() == 42
    gevent.sleep(0)
    fl.release("k", g)
    fl.release("k", g)
    assert fl.running() == 0
