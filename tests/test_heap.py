"""distprop/heap.py: freed memory stays with the process (no page faults on reuse), unless the
user says otherwise; checked in real processes, counting their page faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from distprop import heap, info

# A child that imports distprop, then allocates and frees a 40 MiB array (above glibc's largest
# automatic mmap threshold, 32 MiB) ten times, and reports its minor page faults per allocation.
CHILD = """
import json, resource
import numpy as np
import distprop
from distprop import heap

def faults(reps=10):
    for _ in range(2):
        np.ones(10 << 20, np.float32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(reps):
        np.ones(10 << 20, np.float32)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / reps

print(json.dumps({"state": heap.state, "faults": faults()}))
"""


def run_child(**env):
    full = {k: v for k, v in os.environ.items()
            if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "DISTPROP_MALLOC")}
    out = subprocess.run([sys.executable, "-c", CHILD], env={**full, **env}, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_page_faults():
    kept = run_child()
    if not kept["state"].startswith("freed memory kept"):
        pytest.skip(f"not applied here: {kept['state']}")
    system = run_child(DISTPROP_MALLOC="system")
    assert system["state"] == "glibc defaults (DISTPROP_MALLOC=system)"
    assert system["faults"] >= 10, system  # a fresh mapping per allocation
    assert kept["faults"] <= 1, kept  # the same heap memory again


@pytest.mark.parametrize("env,why", [
    ({"DISTPROP_MALLOC": "system"}, "glibc defaults (DISTPROP_MALLOC=system)"),
    ({"DISTPROP_MALLOC": " System "}, "glibc defaults (DISTPROP_MALLOC=system)"),
    ({"MALLOC_TOP_PAD_": "0"}, "the environment's malloc settings (MALLOC_TOP_PAD_)"),
    ({"MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_MMAP_THRESHOLD_": "0"},
     "the environment's malloc settings (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_)"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
     "the environment's malloc settings (GLIBC_TUNABLES)"),
    ({"GLIBC_TUNABLES": "glibc.pthread.rseq=0:glibc.malloc.mmap_max=0"},
     "the environment's malloc settings (GLIBC_TUNABLES)"),
])
def test_the_users_choice_is_left_alone(monkeypatch, env, why):
    monkeypatch.setattr(heap, "state", heap.state)  # restored afterwards
    assert heap.keep_freed_memory(env) is False
    assert heap.state == why


def test_settings_other_than_the_thresholds_do_not_count():
    child = run_child(MALLOC_ARENA_MAX="2",
                      GLIBC_TUNABLES="glibc.malloc.arena_max=2:glibc.pthread.rseq=0")
    if heap._glibc() is None:
        pytest.skip("not glibc")
    assert child["state"].startswith("freed memory kept"), child


@pytest.mark.parametrize("value", ["keepp", "off", "1"])
def test_a_bad_choice_is_refused_by_name(monkeypatch, value):
    monkeypatch.setattr(heap, "state", heap.state)
    with pytest.raises(ValueError, match=rf"DISTPROP_MALLOC must be one of keep, system, got "
                                         rf"'{value}'"):
        heap.keep_freed_memory({"DISTPROP_MALLOC": value})


def test_a_bad_choice_stops_the_import_with_that_message():
    out = subprocess.run([sys.executable, "-c", "import distprop"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "DISTPROP_MALLOC": "never"})
    assert out.returncode != 0
    assert "DISTPROP_MALLOC must be one of keep, system, got 'never'" in out.stderr


def test_info_reports_the_policy():
    report = info.report(with_mpi_library=False)
    assert report["heap"] == heap.state
    assert f"heap          {heap.state}" in info.format_report(report)
