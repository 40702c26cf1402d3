"""The charts' per-minute ring."""

from __future__ import annotations

from relaypacsd.web.samples import Samples


def test_delivered_per_minute_is_the_counters_difference_and_waiting_the_last_look():
    s = Samples()
    t0 = 1_800_000_000 // 60 * 60
    s.record(t0, {"a": 100}, {"a": 5})  # the first look sets the base: nothing delivered yet
    s.record(t0 + 20, {"a": 110}, {"a": 3})
    s.record(t0 + 70, {"a": 112}, {"a": 0})
    hour = s.series("hour", t0 + 70)
    assert hour["delivered"]["a"][-2:] == [10, 2] and hour["waiting"]["a"][-2:] == [3, 0]
    assert hour["delivered"]["a"][0] is None and len(hour["times"]) == 60  # no sample: a gap, not a zero


def test_a_counter_that_goes_back_counts_nothing_negative_and_the_day_sums_ten_minutes():
    s = Samples()
    t0 = 1_800_000_000 // 600 * 600
    s.record(t0, {"a": 50}, {})
    s.record(t0 + 60, {"a": 60}, {})
    s.record(t0 + 120, {"a": 0}, {})  # a new journal
    s.record(t0 + 180, {"a": 4}, {})
    day = s.series("day", t0 + 180)
    assert day["step_minutes"] == 10 and len(day["times"]) == 144 and day["delivered"]["a"][-1] == 14


def test_the_ring_keeps_one_day():
    s = Samples(minutes=3)
    for m in range(10):
        s.record(m * 60.0, {"a": m}, {"a": m})
    assert len(s._ring) == 3


def test_a_pacs_whose_counter_appears_after_the_first_look_counts_all_of_it():
    """Bug: a fresh journal has no counter until the first delivery; its first 9 were taken as the base."""
    s = Samples()
    t0 = 1_800_000_000 // 60 * 60
    s.record(t0, {}, {})
    s.record(t0 + 10, {"a": 9}, {"a": 0})
    assert s.series("hour", t0 + 10)["delivered"]["a"][-1] == 9
