"""pytest glue: a session-scoped ``harness`` fixture and the CI rule.

``tests/conftest.py`` imports the fixture (``from harness.fixtures import harness``).
Rule: when the harness cannot be started, a test that needs it *fails* with the reason if
``CI=true``; otherwise it is *skipped* with the reason (shown by ``-ra``).

A harness this process started is stopped when the process exits, unless another process
is still using it or ``MADDYLITE_HARNESS_KEEP=1``; one started by hand
(``python -m tests.harness up``) is left running.
"""

from __future__ import annotations

import atexit
import fcntl
import os

import pytest

from .core import Harness, HarnessError

_harness: Harness | None = None
_failure: str | None = None
_users_fd: int | None = None


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def get_harness() -> Harness:
    """The running Harness (started on first use, idempotently).  Raises HarnessError
    (with the reason) if it cannot be started; the failure is remembered."""
    global _harness, _failure, _users_fd
    if _harness is not None:
        return _harness
    if _failure is not None:
        raise HarnessError(_failure)
    h = Harness()
    try:
        h.preflight()
        # announce this process as a user before starting, so a concurrent session's
        # teardown leaves the harness alone
        h.users_lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(h.users_lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        _users_fd = fd
        h.up(started_by="pytest")
    except Exception as e:  # noqa: BLE001 - every failure becomes the skip/fail reason
        _failure = f"real-peer harness unavailable: {e}"
        _release()
        raise HarnessError(_failure) from e
    _harness = h
    atexit.register(_teardown)
    return h


def require_harness() -> Harness:
    """get_harness(), turning a failure into pytest.fail (CI) or pytest.skip (elsewhere)."""
    try:
        return get_harness()
    except HarnessError as e:
        if in_ci():
            pytest.fail(f"{e} (CI=true: the harness is required)", pytrace=False)
        pytest.skip(str(e))
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def harness() -> Harness:
    """The running real-peer harness (session-scoped)."""
    return require_harness()


def _release() -> None:
    global _users_fd
    if _users_fd is not None:
        os.close(_users_fd)
        _users_fd = None


def _teardown() -> None:
    h = _harness
    _release()
    if h is None or os.environ.get("MADDYLITE_HARNESS_KEEP", "") not in ("", "0"):
        return
    h._load_state()
    if h.state.get("started_by") != "pytest":
        return
    fd = os.open(h.users_lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another session is still using it
        h.down(force=True)  # we hold the exclusive lock: nobody else uses it
    finally:
        os.close(fd)
