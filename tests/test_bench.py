"""distprop bench: units, projection, step breakdown, reporting, trace, CLI smoke tests."""

from __future__ import annotations

import json
import math

import pytest

from distprop import heap, trace
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
    sizes = [1e3, 1e5, 4e6, 1e7]
    times = [4e-6 + s / 5e9 for s in sizes]  # a = 2 * alpha, alpha = 2 us
    alpha, beta = project.fit_alpha_beta(sizes, times)
    assert alpha == pytest.approx(2e-6, rel=1e-6)
    assert beta == pytest.approx(1 / 5e9, rel=1e-6)
    # Out of cache the bandwidth halves: beta follows the large messages, alpha the small one.
    times = [4e-6 + s / 5e9 if s < 2**20 else 4e-6 + s / 2.5e9 for s in sizes]
    alpha, beta = project.fit_alpha_beta(sizes, times)
    assert beta == pytest.approx(1 / 2.5e9, rel=1e-6)
    assert alpha == pytest.approx((4e-6 + 1e3 / 5e9 - 1e3 / 2.5e9) / 2, rel=1e-6)
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
    assert got["launch_s"] == pytest.approx(10e-6)


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


# --- CLI: bad input is a usage error ----------------------------------------------------------

from click.testing import CliRunner  # noqa: E402

from distprop.cli import cli  # noqa: E402


def _invoke(*args):
    return CliRunner().invoke(cli, ["bench", *args], catch_exceptions=False)


@pytest.mark.parametrize("args, needle", [
    (["scaling", "--model", "mlp", "--ranks", "1,4096"], "cores"),
    (["scaling", "--model", "nope"], "unknown model"),
    (["scaling", "--model", "mlp", "--ranks", "two"], "cannot parse rank counts"),
    (["scaling", "--model", "mlp", "--ranks", "1,2", "--mode", "strong",
      "--global-batch-size", "3"], "does not split evenly"),
    (["scaling", "--model", "mlp", "--mode", "weak", "--global-batch-size", "8"], "--mode strong"),
    (["allreduce", "--sizes", "1XB"], "cannot parse size"),
    (["allreduce", "--sizes", "1KB", "--ranks", "1"], "at least 2 ranks"),
    (["allreduce", "--sizes", "1KB", "--methods", "mpi,nccl"], "unknown method"),
    (["peers", "--model", "mlp", "--peers", "jax"], "unknown peer"),
    (["peers", "--model", "resnet"], "unknown model"),
    (["project", "--model", "wide"], "--compute-ms"),
    (["project", "--compute-ms", "10", "--bandwidth", "fast"], "cannot parse bandwidth"),
])
def test_bad_input_is_usage_error(args, needle):
    result = _invoke(*args)
    assert result.exit_code == 2, result.output
    assert needle in result.output


@pytest.mark.parametrize("command", [["allreduce", "--sizes", "1KB"], ["project",
                                     "--compute-ms", "10"], ["peers", "--model", "mlp"],
                                     ["scaling", "--model", "mlp"]])
def test_out_that_cannot_be_created_is_usage_error_before_running(command, tmp_path):
    (tmp_path / "file").write_text("")
    result = _invoke(*command, "--out", str(tmp_path / "file" / "sub"))
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--out': cannot create directory" in result.output


def test_cuda_without_a_gpu_is_usage_error():
    from distprop import backend

    if backend.gpu_count() > 0:
        pytest.skip("a GPU is visible")
    result = _invoke("scaling", "--model", "mlp", "--device", "cuda")
    assert result.exit_code == 2 and "CUDA" in result.output


def test_project_cli_by_hand(tmp_path):
    # 96 MB, ring over 100 Gbit/s, 2 us; no overlap: step = compute + sum over buckets.
    result = _invoke("project", "--grad-mb", "96", "--compute-ms", "100", "--ranks", "8",
                     "--no-overlap", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "assumptions:" in result.output
    rows = [json.loads(x) for x in result.output.splitlines() if x.startswith("{")]
    ring = next(r for r in rows if r["algorithm"] == "ring")
    buckets = [2**20] + [25 * 2**20] * 3 + [20 * 2**20]
    comm = sum(14 * 2e-6 + 1.75 * b / 12.5e9 for b in buckets)
    assert ring["step_s"] == pytest.approx(0.1 + comm)
    assert ring["efficiency"] == pytest.approx(0.1 / (0.1 + comm))
    assert (tmp_path / "project-wide.jsonl").exists()


def test_sweep_reports_a_failed_run_and_keeps_the_others(monkeypatch, capsys):
    from distprop.bench import launching, scaling

    good = {"workload": "mlp", "mode": "weak", "threads_per_rank": 1, "batch_per_rank": 4,
            "overlap": True, "bucket_mb": 25.0, "compression": None, "device": "cpu",
            "params": 10, "per_rank": _result([[0.1, 0.1]])["per_rank"]}

    def fake_run_worker(ranks, argv, threads=1, timeout=600.0, oversubscribe=False):
        if ranks == 2:
            return launching.RunOutcome(2, None, "exit code 1\n[rank 1] MemoryError", [])
        return launching.RunOutcome(ranks, good, None, [])

    monkeypatch.setattr(launching, "run_worker", fake_run_worker)
    cfg = scaling.ScalingConfig(workload="mlp", ranks=[1, 2], steps=2, warmup=0)
    rows = scaling.run_scaling(cfg)
    out = capsys.readouterr().out
    assert rows[0]["efficiency"] == 1.0 and rows[1]["error"].startswith("exit code 1")
    assert "FAILED: exit code 1" in out


# --- CLI smoke runs (real mpiexec, tiny sizes) --------------------------------------------------


def _json_lines(text):
    return [json.loads(x) for x in text.splitlines() if x.startswith("{")]


@pytest.mark.mpi
def test_scaling_smoke(tmp_path):
    result = _invoke("scaling", "--model", "mlp", "--ranks", "1,2", "--batch-size", "8",
                     "--steps", "3", "--warmup", "1", "--out", str(tmp_path),
                     "--trace", str(tmp_path / "t.json"), "--timeout", "120")
    assert result.exit_code == 0, result.output
    rows = _json_lines(result.output)
    assert [r["ranks"] for r in rows] == [1, 2]
    for r in rows:
        assert set(report.SCALING_KEYS) <= set(r), set(report.SCALING_KEYS) - set(r)
        assert r["error"] is None and r["steps"] == 3
        assert len(r["peak_rss_mb"]) == r["ranks"]
        assert r["step_min_s"] <= r["step_median_s"] <= r["step_max_s"]
        assert 0 < r["compute_s"] < r["step_max_s"]
    assert rows[1]["comm_s"] > 0 and rows[1]["exposed_comm_s"] > 0
    # Efficiency comes from every rank's per-step times: recompute it from the raw file.
    raw = [json.loads(x) for x in
           (tmp_path / "scaling-mlp-weak.per-rank.jsonl").read_text().splitlines()]
    assert [len(r["per_rank"]) for r in raw] == [1, 2]
    import statistics

    def job_step(res):
        ranks = res["per_rank"]
        return statistics.median(max(r["step_s"][i] for r in ranks) for i in range(3))

    assert rows[1]["efficiency"] == pytest.approx(job_step(raw[0]) / job_step(raw[1]))
    assert (tmp_path / "scaling-mlp-weak.csv").exists()
    assert (tmp_path / "scaling-mlp-weak.png").exists()
    doc = json.loads((tmp_path / "t.n2.json").read_text())
    events = doc["traceEvents"]
    assert {e["pid"] for e in events} == {0, 1}
    names = {e["name"] for e in events}
    assert {"forward", "backward", "optimizer.step", "allreduce", "wait",
            "gradient sync"} <= names
    assert (tmp_path / "t.n2.rank1.json").exists()


@pytest.mark.mpi
def test_allreduce_smoke():
    result = _invoke("allreduce", "--sizes", "4KB,64KB", "--ranks", "2", "--timeout", "120")
    assert result.exit_code == 0, result.output
    rows = _json_lines(result.output)
    assert {(r["bytes"], r["method"]) for r in rows} == {
        (b, m) for b in (4096, 65536) for m in ("mpi", "distprop", "ddp")}
    for r in rows:
        assert r["ranks"] == 2 and r["time_median_s"] > 0 and r["busbw_gbs"] > 0
        assert r["time_min_s"] <= r["time_median_s"] <= r["time_max_s"]
        assert r["vs_mpi"] == pytest.approx(
            r["time_median_s"] / next(x["time_median_s"] for x in rows
                                      if x["bytes"] == r["bytes"] and x["method"] == "mpi"))


@pytest.mark.mpi
def test_peers_smoke():
    pytest.importorskip("torch")
    result = _invoke("peers", "--model", "mlp", "--ranks", "1", "--batch-size", "8",
                     "--steps", "2", "--warmup", "1", "--peers", "torch,gemm-floor",
                     "--timeout", "120")
    assert result.exit_code == 0, result.output
    lines = _json_lines(result.output)
    peers = {r["peer"]: r for r in lines if "peer" in r and r.get("kind") != "ratio"}
    assert set(peers) == {"distprop", "torch", "gemm-floor"}
    ratios = {r["peer"]: r for r in lines if r.get("kind") == "ratio"}
    assert ratios["torch"]["ratio"] == pytest.approx(
        peers["distprop"]["step_s"] / peers["torch"]["step_s"])
    assert ratios["gemm-floor"]["ratio"] > 0
    # distprop under its heap policy, PyTorch under glibc's defaults (distprop/heap.py)
    assert peers["distprop"]["heap"] == heap.state
    assert peers["torch"]["heap"] == "glibc defaults (DISTPROP_MALLOC=system)"


@pytest.mark.mpi
def test_project_calibrate_smoke():
    result = _invoke("project", "--calibrate", "--model", "mlp", "--steps", "3",
                     "--ranks", "2,8")
    assert result.exit_code == 0, result.output
    rows = _json_lines(result.output)
    cal = next(r for r in rows if r.get("kind") == "calibration")
    assert cal["alpha_s"] >= 0 and cal["beta_s_per_byte"] > 0
    assert 0 < cal["predicted_efficiency_2"] <= 1 and cal["measured_step_s_2"] > 0
    assert cal["prediction_error"] == pytest.approx(
        cal["predicted_step_s_2"] / cal["measured_step_s_2"] - 1)
    projected = [r for r in rows if r.get("algorithm")]
    assert {r["ranks"] for r in projected} == {2, 8}
    # The projection uses the calibrated numbers.
    assert all(r["alpha_s"] == cal["alpha_s"] for r in projected)
    assert "2 ranks: predicted step" in result.output


def test_console_script_usage_error_exit_code():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "distprop", "bench", "scaling", "--model",
                           "mlp", "--ranks", "1,4096"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "cores" in proc.stderr


def test_make_table_from_recorded_rows():
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        make_table = importlib.import_module("make_table")
    finally:
        sys.path.pop(0)
    one = {**report.summarize_run(_result([[1.0, 1.0]])), "efficiency": 1.0}
    two = {**report.summarize_run(_result([[1.0, 1.0], [1.25, 1.25]])), "efficiency": 0.8}
    cmd = "distprop bench scaling --model mlp --ranks 1,2 --steps 2 --warmup 0"
    doc = {"machine": {"cores": 2}, "runs": [
        {"command": cmd, "repeat": r, "load_before": [1.0, 1.0, 1.0], "rows": [one, two]}
        for r in range(3)]}
    text = make_table.build(doc)
    line = next(x for x in text.splitlines() if x.startswith("| mlp, 2 ranks"))
    assert "**0.80** (0.80, 0.80, 0.80)" in line and "| **no** |" in line and cmd in line
    assert "shared 2-core machine" in text
    assert "| not run |" not in line


def test_trace_that_cannot_be_written_says_so_at_exit(tmp_path):
    import subprocess
    import sys

    (tmp_path / "file").write_text("")
    code = (f"from distprop import trace\ntrace.enable({str(tmp_path / 'file' / 't.json')!r}, "
            "rank=0)\nwith trace.span('x'):\n    pass\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0
    assert f"distprop trace: could not write {tmp_path / 'file' / 't.rank0.json'}" in proc.stderr


def test_train_trace_in_unwritable_directory_is_usage_error(tmp_path):
    (tmp_path / "file").write_text("")
    result = CliRunner().invoke(cli, ["train", "--trace", str(tmp_path / "file" / "t.json"),
                                      "--out", str(tmp_path / "run"), "--dry-run"])
    assert result.exit_code == 2, result.output
    assert "Invalid value for --trace: cannot write the directory" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.mpi
def test_train_trace_per_rank(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "distprop", "train", "-n", "2", "--model", "mlp", "--dataset",
         "digits", "--epochs", "1", "--threads-per-rank", "1", "--out", str(tmp_path / "run"),
         "--trace", str(tmp_path / "t.json")], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for rank in (0, 1):
        doc = json.loads((tmp_path / f"t.rank{rank}.json").read_text())
        events = [e for e in doc["traceEvents"] if e["ph"] == "X"]
        assert {e["pid"] for e in events} == {rank}
        names = {e["name"] for e in events}
        assert {"forward", "backward", "optimizer.step", "allreduce", "wait",
                "gradient sync"} <= names
        steps = sum(e["name"] == "optimizer.step" for e in events)
        assert steps == sum(e["name"] == "gradient sync" for e in events) > 0
