"""Where a night's time goes (flows/night_clock.py): our code's exclusive time, Prefect's share the rest.

The clock reads ``time.perf_counter``; here it reads a counter the test moves by hand, so every expected figure is
the sum of the moves written beside it."""

from __future__ import annotations

import threading

import pytest

from flows import night_clock


@pytest.fixture
def ticks(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(night_clock.time, "perf_counter", lambda: now[0])

    def advance(seconds: float) -> None:
        now[0] += seconds

    return advance


def test_a_body_is_its_own_time_less_the_prefect_calls_it_makes(ticks):
    with night_clock.night() as clock:
        ticks(0.5)  # Prefect starting the flow run: no body yet
        with night_clock.ours("nightly"):
            ticks(1.0)  # the flow's own code
            with night_clock.prefect_call():  # a step: 0.25 before its body, 3 in it, 0.25 after
                ticks(0.25)
                with night_clock.ours("ingest"):
                    ticks(3.0)
                ticks(0.25)
            ticks(2.0)  # the flow's own code again
            with night_clock.prefect_call():  # a subflow with a step inside
                ticks(0.5)
                with night_clock.ours("continual-update"):
                    ticks(1.0)
                    with night_clock.prefect_call():
                        ticks(0.125)
                        with night_clock.ours("register-update"):
                            ticks(4.0)
                        ticks(0.125)
                ticks(0.5)
        ticks(1.0)  # Prefect finishing the flow run
        report = clock.report()
    assert report["ours_s"] == {"continual-update": 1.0, "ingest": 3.0, "nightly": 3.0, "register-update": 4.0}
    # 0.5 + 0.25 + 0.25 + 0.5 + 0.125 + 0.125 + 0.5 + 1.0 of the 14.25 s
    assert report["orchestration_s"] == 3.25
    assert report["night_s"] == 14.25


def test_the_same_step_twice_adds_up_and_a_call_with_no_night_is_not_timed(ticks):
    timed = night_clock.body(lambda x: ticks(x) or x, "ingest")
    assert timed(1.0) == 1.0  # no night: nothing recorded, nothing fails
    with night_clock.night() as clock:
        call = night_clock.called(timed)
        with night_clock.ours("nightly"):
            call(2.0)
            call(0.5)
    assert clock.report()["ours_s"] == {"ingest": 2.5, "nightly": 0.0}


def test_a_thread_started_with_a_copy_of_the_context_shares_the_clock(ticks):
    """The night runs in a thread started with a copy of the caller's context (flows/lifeline.py)."""
    import contextvars

    with night_clock.night() as clock:
        ctx = contextvars.copy_context()

        def work() -> None:
            with night_clock.ours("nightly"):
                ticks(2.0)

        thread = threading.Thread(target=ctx.run, args=(work,))
        thread.start()
        thread.join()
    assert clock.report()["ours_s"] == {"nightly": 2.0}
