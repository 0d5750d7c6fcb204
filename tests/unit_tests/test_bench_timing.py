"""Benchmarks time their methods in turns, so a ratio compares runs made seconds apart."""

from __future__ import annotations

import time

import pytest

from loraretriever.evaluation.workload import tokens_per_second_in_turns


def test_methods_are_timed_in_turns_and_ratios_survive_a_machine_that_slows_down():
    calls: list[str] = []

    def method(name: str, seconds_per_token: float):
        def run() -> int:
            calls.append(name)
            slowdown = 1 + (len(calls) - 1) // 2  # the machine gets slower every round, for both methods
            time.sleep(4 * seconds_per_token * slowdown)
            return 4

        return run

    rates, ratios = tokens_per_second_in_turns(
        {"base": method("base", 0.005), "half": method("half", 0.010)}, reference="base", rounds=3
    )
    assert calls == ["base", "half"] * 4  # a warm-up, then three rounds, each method once per round
    assert ratios["base"] == 1.0
    assert ratios["half"] == pytest.approx(0.5, rel=0.15)
    assert rates["half"] < rates["base"]
