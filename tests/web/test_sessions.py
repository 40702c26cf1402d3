"""Sessions, CSRF comparison and the login brake."""

from __future__ import annotations

from relaypacsd.web import sessions as sessions_module
from relaypacsd.web.sessions import LoginThrottle, Sessions, same_token


def test_a_session_is_kept_by_its_digest_only_and_ends_when_idle():
    s = Sessions()
    token, session = s.create("olga", "operator", now=0.0)
    assert token not in repr(s._by_digest) and s.get(token, now=10.0) is session
    assert s.get(token + "x", now=10.0) is None
    assert s.get(token, now=10.0 + sessions_module.IDLE + 1) is None


def test_a_session_ends_after_its_maximum_age_however_busy():
    s = Sessions()
    token, _ = s.create("olga", "operator", now=0.0)
    t = 0.0
    while t < sessions_module.MAX_AGE - 3600:
        t += 3600
        assert s.get(token, now=t) is not None
    assert s.get(token, now=sessions_module.MAX_AGE + 1) is None


def test_tokens_compare_only_when_both_are_there():
    assert same_token("a", "a") and not same_token("a", "b") and not same_token("", "") and not same_token(None, "a")


def test_the_brake_locks_a_name_and_an_address_after_five_failures_and_doubles():
    t = LoginThrottle()
    for i in range(4):
        t.failed("olga", "10.0.0.1", now=float(i))
    assert t.wait("olga", "10.0.0.2", now=5.0) == 0
    t.failed("olga", "10.0.0.1", now=5.0)
    assert t.wait("OLGA", "10.0.0.9", now=5.0) == sessions_module.LOCKOUT  # the name, from any address
    assert t.wait("other", "10.0.0.1", now=5.0) == sessions_module.LOCKOUT  # the address, for any name
    t.failed("olga", "10.0.0.1", now=70.0)
    assert t.wait("olga", "x", now=70.0) == 2 * sessions_module.LOCKOUT
    t.succeeded("olga", "10.0.0.1")
    assert t.wait("olga", "10.0.0.1", now=70.0) == 0
