"""Split one training step's trace events into compute, communication and exposed communication.

The definitions (all per rank, per step, in seconds):

- ``forward_s``, ``backward_s``, ``optimizer_s``: the wall time of those spans on the compute
  stream (the benchmark loop records them).
- ``exposed_comm_s``: time the training thread itself spent blocked in communication: the union of
  blocking spans on the ``comm`` stream (waiting for buckets, launching allreduces). This is the
  time communication added to the step.
- ``compute_s``: forward + backward minus the exposed communication inside them.
- ``comm_s``: the union of every ``comm`` interval, blocking or in flight (a bucket's allreduce
  from launch to completion): how long communication was active at all. ``comm_s -
  exposed_comm_s`` is the part hidden behind compute.
- ``launch_s``: the part of ``exposed_comm_s`` spent starting allreduces (``allreduce.launch``:
  DDP's divide-by-world-size pass over the bucket and the MPI call that starts it).
"""

from __future__ import annotations

COMPUTE_PHASES = ("forward", "backward")


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Merge overlapping ``(start, end)`` intervals."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in union(intervals))


def intersection_length(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length covered by both interval sets."""
    a, b = union(a), union(b)
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            total += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def step_breakdown(events: list[dict]) -> dict[str, float]:
    """Compute/comm/exposed seconds of one step from its Chrome-trace events (``ts``/``dur`` in
    microseconds, ``tid`` 0 = compute, 1 = comm, ``cat`` ``"blocking"`` or ``"async"``)."""
    phases = {"forward": [], "backward": [], "optimizer.step": []}
    comm_all, comm_blocking, launches = [], [], []
    for e in events:
        if e.get("ph") != "X":
            continue
        iv = (e["ts"], e["ts"] + e["dur"])
        if e.get("tid") == 1:
            comm_all.append(iv)
            if e.get("cat", "blocking") == "blocking":
                comm_blocking.append(iv)
                if e["name"] == "allreduce.launch":
                    launches.append(iv)
        elif e["name"] in phases:
            phases[e["name"]].append(iv)
    compute_ivs = phases["forward"] + phases["backward"]
    exposed = length(comm_blocking)
    compute = length(compute_ivs) - intersection_length(compute_ivs, comm_blocking)
    us = 1e-6
    return {
        "forward_s": length(phases["forward"]) * us,
        "backward_s": length(phases["backward"]) * us,
        "optimizer_s": length(phases["optimizer.step"]) * us,
        "compute_s": compute * us,
        "comm_s": length(comm_all) * us,
        "exposed_comm_s": exposed * us,
        "launch_s": length(launches) * us,
    }
