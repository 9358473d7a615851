"""distprop bench: units, projection, step breakdown, reporting, trace, CLI smoke tests."""

from __future__ import annotations

import json
import math

import pytest

from distprop import trace
from distprop.bench import breakdown, project, report, units

# --- units ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("64", 64), ("1KB", 1024), ("1kb", 1024), ("4MiB", 4 * 2**20), ("256MB", 256 * 2**20),
    ("1.5GB", int(1.5 * 2**30)), ("12 B", 12),
])
def test_parse_size(text, expected):
    assert units.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "1XB", "-1KB", "0.1B", "1..", "2MB..1MB"])
def test_parse_sizes_rejects(text):
    with pytest.raises(ValueError):
        units.parse_sizes(text)


def test_parse_sizes_range_and_list():
    assert units.parse_sizes("1KB..8KB") == [1024, 2048, 4096, 8192]
    assert units.parse_sizes("1KB..64KB", factor=4) == [1024, 4096, 16384, 65536]
    assert units.parse_sizes("1KB,1MB") == [1024, 2**20]
    assert len(units.parse_sizes("1KB..256MB")) == 19


@pytest.mark.parametrize("text, expected", [
    ("1,2,4", [1, 2, 4]), ("4,1,2,2", [1, 2, 4]), ("8..64", [8, 16, 32, 64]), ("3", [3]),
])
def test_parse_ranks(text, expected):
    assert units.parse_ranks(text) == expected


@pytest.mark.parametrize("text", ["0", "a,b", "8..4", "", "1,-2"])
def test_parse_ranks_rejects(text):
    with pytest.raises(ValueError):
        units.parse_ranks(text)


@pytest.mark.parametrize("text, bytes_per_s", [
    ("100Gbps", 12.5e9), ("100Gb/s", 12.5e9), ("12.5GB/s", 12.5e9), ("25GBps", 25e9),
    ("800Mbps", 1e8), ("1gbps", 1.25e8),
])
def test_parse_bandwidth(text, bytes_per_s):
    assert units.parse_bandwidth(text) == pytest.approx(bytes_per_s)


@pytest.mark.parametrize("text", ["fast", "100", "100GHz", "0Gbps"])
def test_parse_bandwidth_rejects(text):
    with pytest.raises(ValueError):
        units.parse_bandwidth(text)


# --- projection model -----------------------------------------------------------------------

ALPHA, BETA = 2e-6, 1 / 12.5e9  # 2 us, 100 Gbit/s


def test_allreduce_formulas_by_hand():
    n = 100 * 2**20
    # ring, 8 ranks: 2*7*2us + 2*7/8 * n / 12.5e9
    assert project.ring_allreduce_time(n, 8, ALPHA, BETA) == pytest.approx(
        28e-6 + 1.75 * n / 12.5e9)
    # tree (recursive doubling), 8 ranks: 3 rounds of (2us + n/12.5e9); 5 ranks: 3 rounds too
    assert project.tree_allreduce_time(n, 8, ALPHA, BETA) == pytest.approx(3 * (2e-6 + n / 12.5e9))
    assert project.tree_allreduce_time(n, 5, ALPHA, BETA) == pytest.approx(3 * (2e-6 + n / 12.5e9))
    assert project.ring_allreduce_time(n, 1, ALPHA, BETA) == 0.0
    assert project.ring_allreduce_time(n, 2, ALPHA, BETA) == pytest.approx(4e-6 + n / 12.5e9)


def test_bucket_sizes():
    mb = 2**20
    assert project.bucket_sizes(60 * mb, 25 * mb, 1 * mb) == [mb, 25 * mb, 25 * mb, 9 * mb]
    assert project.bucket_sizes(0.5 * mb, 25 * mb, 1 * mb) == [0.5 * mb]
    assert sum(project.bucket_sizes(123456789, 25 * mb, mb)) == 123456789


def test_projected_step_without_overlap_by_hand():
    mb = 2**20
    buckets = [mb, 25 * mb, 25 * mb, 9 * mb]  # 60 MB
    got = project.project_step(0.1, buckets, 4, "ring", ALPHA, BETA, overlap=False)
    # each bucket: 2*3*alpha + 2*3/4 * b * beta
    comm = sum(6 * ALPHA + 1.5 * b * BETA for b in buckets)
    assert got.comm_s == pytest.approx(comm)
    assert got.step_s == pytest.approx(0.1 + comm)
    assert got.efficiency == pytest.approx(0.1 / (0.1 + comm))
    assert got.exposed_comm_s == pytest.approx(comm)


def test_projected_step_with_overlap_by_hand():
    # Two buckets of 50 bytes, compute 3 s (forward 1 s, backward 2 s); alpha 0.5 s, beta 0.01
    # s/B, 2 ranks ring: each allreduce = 2*0.5 + 50*0.01 = 1.5 s.
    # bucket 1 ready at 1 + 2*0.5 = 2 s, ends 3.5 s; bucket 2 ready at 3 s, starts 3.5, ends 5 s.
    got = project.project_step(3.0, [50, 50], 2, "ring", 0.5, 0.01, overlap=True,
                               backward_fraction=2 / 3)
    assert got.step_s == pytest.approx(5.0)
    assert got.exposed_comm_s == pytest.approx(2.0)
    assert got.comm_s == pytest.approx(3.0)
    assert got.efficiency == pytest.approx(0.6)
    # Tiny messages hide completely behind backward.
    hidden = project.project_step(3.0, [50, 50], 2, "ring", 0.0, 1e-4, overlap=True)
    assert hidden.step_s == pytest.approx(3.0 + 50 * 1e-4)  # only the last bucket sticks out


def test_project_rows_and_one_rank():
    rows = project.project(0.1, 100 * 2**20, [1, 8, 4096], ALPHA, BETA)
    assert {(r["ranks"], r["algorithm"]) for r in rows} == {
        (p, a) for p in (1, 8, 4096) for a in ("ring", "tree")}
    one = [r for r in rows if r["ranks"] == 1]
    assert all(r["efficiency"] == 1.0 and r["comm_s"] == 0.0 for r in one)
    eff = {(r["ranks"], r["algorithm"]): r["efficiency"] for r in rows}
    assert eff[(4096, "ring")] < eff[(8, "ring")] <= 1.0


def test_fit_alpha_beta_recovers_line():
    sizes = [1e3, 1e5, 1e7]
    times = [4e-6 + s / 5e9 for s in sizes]  # a = 2 * alpha, alpha = 2 us
    alpha, beta = project.fit_alpha_beta(sizes, times)
    assert alpha == pytest.approx(2e-6, rel=1e-6)
    assert beta == pytest.approx(1 / 5e9, rel=1e-6)
    with pytest.raises(ValueError):
        project.fit_alpha_beta([1.0], [1.0])


# --- breakdown --------------------------------------------------------------------------------


def _ev(name, ts, dur, tid=0, cat="blocking"):
    return {"name": name, "ph": "X", "ts": ts, "dur": dur, "tid": tid, "cat": cat}


def test_step_breakdown():
    events = [
        _ev("forward", 0, 100),
        _ev("backward", 100, 300),
        _ev("allreduce", 150, 200, tid=1, cat="async"),      # in flight 150..350
        _ev("allreduce.launch", 150, 10, tid=1),             # blocking inside backward
        _ev("wait", 360, 40, tid=1),                         # blocking at end of backward
        _ev("optimizer.step", 400, 50),
    ]
    got = breakdown.step_breakdown(events)
    assert got["forward_s"] == pytest.approx(100e-6)
    assert got["backward_s"] == pytest.approx(300e-6)
    assert got["exposed_comm_s"] == pytest.approx(50e-6)
    assert got["compute_s"] == pytest.approx(350e-6)
    assert got["comm_s"] == pytest.approx(240e-6)  # 150..350 and 360..400
    assert got["optimizer_s"] == pytest.approx(50e-6)


def test_interval_helpers():
    assert breakdown.union([(3, 4), (0, 2), (1, 3)]) == [(0, 4)]
    assert breakdown.intersection_length([(0, 10)], [(2, 3), (5, 7), (9, 12)]) == 4


# --- report: all ranks count -----------------------------------------------------------------


def _result(per_rank_steps, batch=8, compute=None):
    per_rank = []
    for i, steps in enumerate(per_rank_steps):
        comp = compute[i] if compute else [t * 0.8 for t in steps]
        per_rank.append({"step_s": steps, "compute_s": comp, "comm_s": [0.01] * len(steps),
                         "exposed_comm_s": [0.005] * len(steps),
                         "optimizer_s": [0.001] * len(steps), "peak_rss_mb": 100.0 + i})
    return {"workload": "mlp", "mode": "weak", "threads_per_rank": 1, "batch_per_rank": batch,
            "overlap": True, "bucket_mb": 25.0, "compression": None, "device": "cpu",
            "per_rank": per_rank}


def test_efficiency_uses_the_slowest_rank_each_step():
    one = report.summarize_run(_result([[1.0, 1.0, 1.0]]))
    # rank 0 is as fast as alone, rank 1 is slow in every step: the job runs at rank 1's pace.
    two = report.summarize_run(_result([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]))
    rows = report.add_scaling([one, two])
    assert two["step_s"] == 2.0
    assert two["samples_per_s"] == pytest.approx(16 / 2.0)
    assert rows[1]["efficiency"] == pytest.approx(0.5)
    assert rows[1]["speedup"] == pytest.approx(1.0)
    assert rows[0]["efficiency"] == 1.0
    assert two["step_min_s"] == 1.0 and two["step_max_s"] == 2.0
    assert two["peak_rss_mb"] == [100.0, 101.0]
    assert two["straggler_spread_s"] == pytest.approx(0.8)


def test_strong_scaling_efficiency():
    one = report.summarize_run({**_result([[1.0] * 3], batch=16), "mode": "strong"})
    two = report.summarize_run({**_result([[0.6] * 3, [0.6] * 3], batch=8), "mode": "strong"})
    report.add_scaling([one, two])
    assert two["global_batch"] == one["global_batch"] == 16
    assert two["speedup"] == pytest.approx(1 / 0.6)
    assert two["efficiency"] == pytest.approx(1 / 0.6 / 2)


def test_failed_run_keeps_the_others(tmp_path):
    ok = report.summarize_run(_result([[1.0] * 3]))
    bad = report.error_row({"workload": "mlp", "mode": "weak"}, 2, "exit code 1\nboom")
    rows = report.add_scaling([ok, bad])
    assert rows[0]["efficiency"] == 1.0 and rows[1]["efficiency"] is None
    table = report.format_table(rows)
    assert "FAILED: exit code 1" in table and "1000" not in table.splitlines()[0]
    report.write_csv(rows, tmp_path / "x.csv")
    report.write_jsonl(rows, tmp_path / "x.jsonl")
    lines = (tmp_path / "x.jsonl").read_text().splitlines()
    assert json.loads(lines[1])["error"].startswith("exit code 1")
    assert (tmp_path / "x.csv").read_text().splitlines()[0].split(",") == list(report.SCALING_KEYS)


# --- trace ------------------------------------------------------------------------------------


def test_trace_disabled_records_nothing():
    trace.disable()
    trace.clear()
    with trace.span("forward"):
        pass
    trace.instant("x")
    trace.complete("y", 0, 10)
    assert trace.events() == []
    assert trace.span("a") is trace.span("b")  # one shared no-op object


def test_trace_writes_chrome_json(tmp_path):
    trace.enable(tmp_path / "t.json", rank=3)
    try:
        trace.clear()
        with trace.span("forward", step=1):
            with trace.span("wait", stream="comm", bucket=0):
                pass
        t0 = trace.now_ns()
        trace.complete("allreduce", t0, t0 + 5000, stream="comm", blocking=False, bucket=0)
        trace.instant("marker")
        path = trace.save()
    finally:
        trace.disable()
        trace.clear()
    assert path.endswith("t.rank3.json")
    doc = json.loads(open(path).read())
    evs = [e for e in doc["traceEvents"] if e["ph"] != "M"]
    names = {e["name"]: e for e in evs}
    assert set(names) == {"forward", "wait", "allreduce", "marker"}
    assert all(e["pid"] == 3 for e in evs)
    assert names["forward"]["tid"] == 0 and names["wait"]["tid"] == 1
    assert names["allreduce"]["cat"] == "async" and names["allreduce"]["dur"] == 5.0
    assert names["forward"]["args"] == {"step": 1}
    fw, wait = names["forward"], names["wait"]
    assert fw["ts"] <= wait["ts"] and wait["ts"] + wait["dur"] <= fw["ts"] + fw["dur"] + 1e-3
    meta = {(e["name"], e.get("tid")): e["args"] for e in doc["traceEvents"] if e["ph"] == "M"}
    assert meta[("thread_name", 1)] == {"name": "comm"}
    assert meta[("process_name", None)] == {"name": "rank 3"}
    merged = trace.merge([path, path], tmp_path / "all.json")
    assert len(json.loads(open(merged).read())["traceEvents"]) == 2 * len(doc["traceEvents"])


def test_rank_path():
    assert trace.rank_path("out/t.json", 2) == "out/t.rank2.json"
    assert trace.rank_path("t-{rank}.json", 1) == "t-1.json"
    assert trace.rank_path("trace", 0) == "trace.rank0.json"


def test_median_ignores_unmeasured():
    assert report._median([None, 1.0, 3.0]) == 2.0
    assert report._median([None, math.nan]) is None
