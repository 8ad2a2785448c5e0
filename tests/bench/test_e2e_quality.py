"""``bench e2e`` reports prediction quality computed from memd's StatsReply: the run's difference of two replies,
prefetch precision and recall, precision and recall by lookahead distance, in the rows, the table and the targets."""
import pytest

from common import messages as m
from services.bench.e2e import MOEINF, ONDEMAND, Result, Timing
from services.bench.e2e_quality import delta, stats_counters
from services.bench.e2e_report import _HEADER, _floor, _line, _quality_lines, _targets


def stats(scale: int) -> m.StatsReply:
    """A StatsReply whose counters grow with ``scale`` (two of them: before and after a run)."""
    la = [m.LookaheadStats(1, 10 * scale, 7 * scale, 12 * scale),
          m.LookaheadStats(2, 10 * scale, 4 * scale, 13 * scale)]
    spec = [m.LookaheadStats(1, 8 * scale, 5 * scale, 9 * scale)] if scale > 1 else []  # first scored in the run
    return m.StatsReply(1, 1 << 20, 8, 8, 0, 100 * scale, 20 * scale, 5, 1000 * scale, 0.5 * scale, 0.25 * scale,
                        False, [1, 1], prefetch_issued=30 * scale, prefetch_used=9 * scale,
                        prefetch_wasted=3 * scale, lookahead=la, speculation=spec,
                        prefetch_precision=0.99, prefetch_recall=0.99)  # memd's lifetime ratios: not what is shown


def test_run_quality_is_the_difference_of_two_stats_replies():
    counters = delta(stats_counters(stats(1)), stats_counters(stats(3)))
    timing = Timing(0, 0.0, [0.1, 0.2, 0.35], [1, 2, 3])
    row = {**Result(MOEINF, 1, [timing], counters).row(), "expert_memory": "25%", "memory_limit_bytes": None,
           "peak_memory_bytes": None}
    assert (row["prefetch_issued"], row["prefetch_used"], row["prefetch_wasted"]) == (60, 18, 6)
    assert row["prefetch_precision"] == 18 / 24 and row["prefetch_recall"] == 18 / (18 + 40)
    la1, la2 = row["lookahead"]
    assert (la1["distance"], la1["precision"], la1["recall"]) == (1, 14 / 20, 14 / 24)
    assert (la2["distance"], la2["precision"], la2["recall"]) == (2, 8 / 20, 8 / 26)
    assert row["speculation"] == [{"distance": 1, "predicted": 24, "correct": 15, "routed": 27,
                                   "precision": 15 / 24, "recall": 15 / 27}]

    assert all(col in _HEADER for col in ("pf P", "pf R", "la1 P", "la1 R"))
    assert _line(row).split()[-4:] == ["0.75", "0.31", "0.70", "0.58"]
    (text,) = _quality_lines([row])
    assert "lookahead P/R by distance 1: 0.70/0.58, 2: 0.40/0.31" in text
    assert "speculation P/R by distance 1: 0.62/0.56" in text
    (target,) = _targets([row], [], 0.0, ["25%"])
    assert target["target"] == ("prefetch precision >= 0.6 (every distance) and memd's prediction one layer ahead"
                                " >= 0.6") and target["value"] == 0.75 and target["met"]
    assert "18 used, 6 wasted" in target["measured"] and "prediction one layer ahead 0.70" in target["measured"]
    for la1 in (0.5, None):  # the prefetches' precision alone does not meet it: the prediction one layer ahead too
        ahead = [{**row["lookahead"][0], "precision": la1}] if la1 else []
        (target,) = _targets([{**row, "lookahead": ahead}], [], 0.0, ["25%"])
        assert not target["met"] and target["value"] == 0.75
    idle = {**row, "prefetch_issued": 0, "prefetch_used": 0, "prefetch_wasted": 0, "prefetch_precision": None}
    (target,) = _targets([idle], [], 0.0, ["25%"])
    assert not target["met"] and target["value"] is None and "no prefetch issued" in target["measured"]
    lru = {**row, "system": ONDEMAND, "decode_ms_per_token_p50": row["decode_ms_per_token_p50"] / 0.8}
    vs = next(t for t in _targets([row, lru], [], 0.0, ["25%"]) if "moeinf-ondemand-lru" in t["target"])
    assert abs(vs["value"] - 0.8) < 1e-9 and vs["met"] and vs["target"] == "decode <= 0.85x of moeinf-ondemand-lru"


def test_rows_without_memd_have_no_quality_columns():
    timing = Timing(0, 0.0, [0.1, 0.2], [1, 2])
    row = {**Result("transformers-resident", 1, [timing], None).row(), "expert_memory": "25%",
           "memory_limit_bytes": None, "peak_memory_bytes": None}
    assert "prefetch_precision" not in row and _line(row).split()[-4:] == ["-"] * 4 and _quality_lines([row]) == []


def test_delivered_bandwidth_above_the_probe_is_not_counted_as_met():
    def check(delivered):
        row = {"system": ONDEMAND, "concurrency": 1, "expert_memory": "25%", "decode_ms_per_token_p50": 500.0,
               "busy_read_gbps": delivered, "stall_read_gbps": 2 * delivered, "load_read_gbps": delivered,
               "disk_read_gbps_before": 1.0}
        return next(t for t in _targets([row], [], 1.0, ["25%"]) if "bandwidth" in t["target"])

    assert check(0.95)["met"] and not check(0.85)["met"]
    above = check(1.3)  # the reader cannot beat the probe on one disk state: the disk changed between the two
    assert not above["met"] and "not counted as met" in above["measured"]


def test_the_bandwidth_target_and_floor_take_the_best_probe_around_the_run():
    """A disk that sped up during the run shows in the probe just after it: the loads are judged against the best
    of the run start's and the probes just before and after (a faster probe: a harder target, a lower I/O floor)."""
    row = {"system": ONDEMAND, "concurrency": 1, "expert_memory": "25%", "decode_ms_per_token_p50": 500.0,
           "busy_read_gbps": 1.3, "stall_read_gbps": 2.6, "load_read_gbps": 1.3, "disk_read_gbps_before": 1.0,
           "disk_read_gbps_after": 1.4, "bytes_read_per_token": 1.4e8}
    target = next(t for t in _targets([row], [], 1.0, ["25%"]) if "bandwidth" in t["target"])
    assert target["met"] and "1.30 of 1.40 GB/s" in target["measured"]
    assert not next(t for t in _targets([{**row, "disk_read_gbps_after": 1.6}], [], 1.0, ["25%"])
                    if "bandwidth" in t["target"])["met"]  # 81%
    assert _floor(row, None, 1.0)["io_floor_ms"] == pytest.approx(100.0)  # 1.4e8 bytes at 1.4 GB/s


def test_the_io_floor_leaves_out_wasted_prefetches():
    """A system's I/O floor counts the bytes it needed: a prefetch that ended unused (a whole expert each) does
    not make its own floor larger, and so its "within 1.15x of the floor" easier."""
    row = {"system": ONDEMAND, "concurrency": 1, "expert_memory": "25%", "decode_ms_per_token_p50": 500.0,
           "decode_bytes_read_per_token": 4e8, "bytes_read_per_token": 5e8, "disk_read_gbps_before": 1.0,
           "expert_budget_bytes": 3.2e8, "experts": 32}
    assert _floor(row, None, 1.0)["io_floor_ms"] == pytest.approx(400.0)
    wasteful = {**row, "decode_wasted_prefetches_per_token": 5.0}  # 5 x 1e7 bytes of 4e8 never used
    assert _floor(wasteful, None, 1.0)["io_floor_ms"] == pytest.approx(350.0)


def test_the_floor_is_judged_on_the_mean_decode_time():
    """The floor's bytes are a mean per token and reads are bursty: a p50 below the floor is no proof of anything,
    so vs_floor divides the mean decode gap (none without one)."""
    row = {"system": ONDEMAND, "concurrency": 1, "expert_memory": "25%", "decode_ms_per_token_p50": 90.0,
           "decode_ms_per_token_mean": 150.0, "bytes_read_per_token": 1.4e8, "disk_read_gbps_before": 1.4}
    assert _floor(row, None, 1.0)["vs_floor"] == pytest.approx(1.5)  # not 0.9
    assert _floor({**row, "decode_ms_per_token_mean": None}, None, 1.0)["vs_floor"] is None


def test_disk_busy_is_the_loading_share_of_decode_time_else_of_the_run():
    counters = {**delta(stats_counters(stats(1)), stats_counters(stats(3))), "reader_busy_seconds": 0.5}
    split = [Timing(0, 0.0, [1.0, 2.0], [1, 2], 10.0, (0.3, 1.0)), Timing(1, 2.0, [3.0, 5.0], [1, 2], 10.0, (0.5, 3.0))]
    assert Result(MOEINF, 1, split, counters).row()["disk_busy"] == 0.8 / 4.0  # decode spans only
    whole = [Timing(0, 0.0, [1.0, 2.0], [1, 2]), Timing(1, 0.5, [3.0, 5.0], [1, 2])]
    assert Result(MOEINF, 2, whole, counters).row()["disk_busy"] == 0.5 / 5.0  # the run: first sent to last token
    assert Result("transformers-resident", 1, whole, None).row()["disk_busy"] is None
