"""The server's pre-auth defences as pure objects with explicit clocks: source keys, the
failure memory (HandshakeGuard), the pre-auth connection caps and the log throttle."""

from __future__ import annotations

import pytest

from achilles.server.guard import (FREE_FAILURES, MAX_DELAY, WINDOW, HandshakeGuard, LogThrottle,
                                   PreauthLimiter, source_key)

pytestmark = pytest.mark.timeout(30)


def test_source_key_groups_ipv6_by_64_and_keeps_ipv4_exact():
    """IPv4 addresses are their own source; IPv6 addresses in one /64 are one source (also with
    a zone index); IPv4-mapped IPv6 counts as the IPv4 address; names are kept as they are."""
    assert source_key("10.1.2.3") == "10.1.2.3"
    assert source_key("10.1.2.3") != source_key("10.1.2.4")
    a = source_key("2001:db8:1:2:aaaa:bbbb:cccc:1")
    assert a == source_key("2001:db8:1:2::ffff") == "2001:db8:1:2::/64"
    assert a != source_key("2001:db8:1:3::1")
    assert source_key("::ffff:10.0.0.1") == "10.0.0.1"
    assert source_key("fe80::1%eth0") == "fe80::/64"
    assert source_key("unix-socket") == "unix-socket"


def test_fresh_ipv6_addresses_in_one_64_share_the_delay():
    """An attacker cycling through addresses of its /64 is slowed down like one address."""
    g = HandshakeGuard()
    for i in range(FREE_FAILURES + 2):
        g.record_failure(f"2001:db8::{i + 1:x}", 100.0)
    assert g.delay("2001:db8::ffff:1", 100.0) > 0
    assert g.failures("2001:db8::beef", 100.0) == FREE_FAILURES + 2
    assert g.delay("2001:db8:0:1::1", 100.0) == 0.0


def test_delay_is_short_and_capped():
    """The delay stays at most MAX_DELAY (well under a second), however many failures; it
    ends once the failures leave the window."""
    g = HandshakeGuard()
    for _ in range(200):
        g.record_failure("10.0.0.1", 50.0)
    assert g.delay("10.0.0.1", 50.0) == MAX_DELAY <= 1.0
    assert g.failures("10.0.0.1", 50.0) <= 4 * FREE_FAILURES
    assert g.delay("10.0.0.1", 50.0 + WINDOW + 1) == 0.0
    assert len(g) == 0


def test_full_guard_evicts_the_least_recently_failing_source():
    """When full, the guard forgets the source whose last failure is oldest (LRU), so a source
    that keeps failing is kept while others come and go."""
    g = HandshakeGuard(max_sources=3)
    for _ in range(FREE_FAILURES + 1):
        g.record_failure("10.0.0.1", 10.0)
    g.record_failure("10.0.0.2", 11.0)
    g.record_failure("10.0.0.3", 12.0)
    g.record_failure("10.0.0.1", 13.0)  # the offender fails again: most recent now
    g.record_failure("10.0.0.4", 14.0)
    assert len(g) == 3
    assert g.failures("10.0.0.2", 14.0) == 0
    assert g.failures("10.0.0.3", 14.0) == 1
    assert g.delay("10.0.0.1", 14.0) > 0
    for i in range(100):  # a stream of fresh sources, while the offender keeps failing
        g.record_failure(f"192.0.2.{i}", 20.0)
        if i % 2:
            g.record_failure("10.0.0.1", 20.0)
        assert len(g) <= 3
    assert g.delay("10.0.0.1", 20.0) > 0


def test_limiter_caps_per_source_and_in_total():
    """The limiter admits up to per_source connections from one source and total overall,
    names the setting to change when it refuses, and frees a slot on release."""
    lim = PreauthLimiter(total=5, per_source=3)
    assert [lim.admit("a") for _ in range(3)] == [None, None, None]
    reason = lim.admit("a")
    assert reason is not None and "ACHILLES_MAX_PREAUTH_PER_SOURCE=3" in reason and "a" in reason
    assert lim.admit("b") is None and lim.admit("b") is None
    reason = lim.admit("c")
    assert reason is not None and "ACHILLES_MAX_PREAUTH=5" in reason
    assert lim.count == 5 and lim.held_by("a") == 3
    lim.release("a")
    assert lim.admit("c") is None
    assert lim.admit("a") is not None  # total is full again
    for key in ("a", "a", "b", "b", "c"):
        lim.release(key)
    assert lim.count == 0 and lim.held_by("a") == 0
    lim.release("a")  # releasing more than was admitted changes nothing
    assert lim.count == 0


def test_log_throttle_lets_one_message_through_per_interval():
    """The throttle allows the first message, drops the rest within the interval, and reports
    how many it dropped with the next one let through."""
    t = LogThrottle(interval=10.0)
    assert t.allow(0.0) == 0
    assert t.allow(1.0) is None
    assert t.allow(9.9) is None
    assert t.allow(10.5) == 2
    assert t.allow(30.0) == 0
