"""benchmarks/speed.py --rounds: rows repeated round-robin, ratios paired per round."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def speed(benchmark_script):
    return benchmark_script("speed")


def test_rounds_give_median_seconds_and_paired_ratio_with_range(speed):
    core = speed.combine([{"name": "maml_32x1", "seconds": s, "peak_mb": m, "path": "core, NCHW"}
                          for s, m in ((2.0, 10), (3.0, 12), (2.2, 11))])
    ref = speed.combine([{"name": "higher_32x1", "seconds": s, "peak_mb": 20} for s in (4.0, 3.0, 2.0)])
    assert core["seconds"] == 2.2 and core["rounds"] == [2.0, 3.0, 2.2] and core["peak_mb"] == 12
    assert core["path"] == "core, NCHW"
    # per round 0.5, 1.0, 1.1: the median of those (1.0), not the ratio of the medians (2.2 / 3.0)
    value, spread = speed.ratio(core, ref)
    assert value == pytest.approx(1.0) and spread == " (0.50-1.10)"
    lines = speed.table({"maml_32x1": core, "higher_32x1": ref})
    assert "| MAML 32x1 / plain higher | 1.00x (0.50-1.10) | <= 0.65: MISSED |" in lines
    assert any("rounds 2.000 / 3.000 / 2.200" in line for line in lines)


def test_a_failed_round_is_reported_not_averaged_away(speed):
    out = speed.combine([{"name": "x", "seconds": 1.0, "peak_mb": 1}, {"name": "x", "error": "RuntimeError: boom"}])
    assert out == {"name": "x", "error": "RuntimeError: boom"}
    single = {"name": "x", "seconds": 1.0, "peak_mb": 1}
    assert speed.combine([single]) is single and speed.ratio(single, single) == (1.0, "")


def test_paths_that_differ_between_rounds_are_all_listed(speed):
    out = speed.combine([{"name": "x", "seconds": 1.0, "peak_mb": 1, "path": p}
                         for p in ("core, channels_last", "core, NCHW")])
    assert out["path"] == "core, channels_last / core, NCHW"


def test_peak_mb_counts_the_measured_steps_even_after_a_memory_hungry_setup(speed, monkeypatch):
    """speed.py read the RSS high-water mark after the row's setup: a setup that peaked higher than
    the step (the automatic layout's probe runs real meta-steps) left "peak MB" near 0."""
    import torch

    def factory(device):
        big = torch.ones(80 * 2**20 // 4)  # 80 MB touched and freed during setup (a layout probe)
        del big

        def step():
            t = torch.ones(40 * 2**20 // 4)  # 40 MB per measured step
            t.add_(1)
        return step, {}

    monkeypatch.setitem(speed.ROWS, "hungry_setup", ("test", factory))
    res = speed.child("hungry_setup", 1, "cpu", 1)
    if res.get("resettable", True):
        assert res["peak_mb"] >= 30
