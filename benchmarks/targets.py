"""The scaling targets of BENCHMARKS.md: the commands that measure them and how to read the result.

Used by ``run_targets.py`` (runs the commands, stores ``results/target-<name>.json``) and by
``make_table.py`` (builds ``results/README.md`` from those files). Every metric is a ratio taken
within one invocation, so machine drift between invocations does not enter it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str
    what: str
    goal: str | None  # e.g. ">= 0.90"; None for a reference number
    commands: tuple[tuple[str, ...], ...]  # arguments after `distprop`
    metric: Callable[[list[list[dict]]], float | None]  # rows of each command -> value
    detail: Callable[[list[list[dict]]], str]  # where the time went, from the same rows

    def met(self, value: float | None) -> bool | None:
        if value is None or self.goal is None:
            return None
        op, threshold = self.goal.split()
        return value >= float(threshold) if op == ">=" else value <= float(threshold)


def _row(rows: list[dict], **match) -> dict | None:
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()) and not r.get("error"):
            return r
    return None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f} ms"


# --- mlp weak scaling ---------------------------------------------------------------------------

def _mlp_eff(runs):
    two = _row(runs[0], ranks=2)
    return None if two is None else two["efficiency"]


def _mlp_detail(runs):
    one, two = _row(runs[0], ranks=1), _row(runs[0], ranks=2)
    if one is None or two is None:
        return "a run failed"
    return (f"step {_ms(one['step_s'])} -> {_ms(two['step_s'])}; compute "
            f"{_ms(one['compute_s'])} -> {_ms(two['compute_s'])}; exposed comm "
            f"{_ms(two['exposed_comm_s'])} of {_ms(two['comm_s'])} comm; straggler spread "
            f"{_ms(two['straggler_spread_s'])}")


# --- mlp against its peers (torch-ddp's efficiency, 1-rank and RSS ratios) ------------------------

def _ratio(runs, peer, ranks, key="ratio"):
    r = _row(runs[0], kind="ratio", peer=peer, ranks=ranks)
    return None if r is None else r.get(key)


def _torch_ddp_eff(runs):
    r = _row(runs[0], peer="torch-ddp", ranks=2)
    return None if r is None else r.get("efficiency")


def _mlp_peers_detail(runs):
    d2, t2 = _row(runs[0], peer="distprop", ranks=2), _row(runs[0], peer="torch-ddp", ranks=2)
    if d2 is None or t2 is None:
        return "a run failed"
    return (f"same invocation: distprop efficiency {d2['efficiency']:.2f}, torch-ddp "
            f"{t2['efficiency']:.2f}; 2-rank step distprop {_ms(d2['step_s'])}, torch-ddp "
            f"{_ms(t2['step_s'])}")


def _mlp_vs_torch_detail(runs):
    d1, t1 = _row(runs[0], peer="distprop", ranks=1), _row(runs[0], peer="torch", ranks=1)
    if d1 is None or t1 is None:
        return "a run failed"
    return f"1 rank x 1 thread: distprop {_ms(d1['step_s'])}, torch {_ms(t1['step_s'])}"


def _rss_detail(runs):
    d1, t1 = _row(runs[0], peer="distprop", ranks=1), _row(runs[0], peer="torch", ranks=1)
    if d1 is None or t1 is None:
        return "a run failed"
    return f"peak RSS distprop {d1['peak_rss_mb_max']:.0f} MB, torch {t1['peak_rss_mb_max']:.0f} MB"


# --- wide against torch-ddp ---------------------------------------------------------------------

def _wide_ddp_detail(runs):
    d2, t2 = _row(runs[0], peer="distprop", ranks=2), _row(runs[0], peer="torch-ddp", ranks=2)
    floor = _row(runs[0], peer="mpi-allreduce", ranks=2)
    if d2 is None or t2 is None:
        return "a run failed"
    text = (f"step distprop {_ms(d2['step_s'])} (compute {_ms(d2['compute_s'])}, exposed comm "
            f"{_ms(d2['exposed_comm_s'])}), torch-ddp {_ms(t2['step_s'])}")
    if floor is not None:
        text += f"; one MPI Allreduce of the gradient: {_ms(floor['step_s'])}"
    return text


# --- wide gradient sync against raw MPI ---------------------------------------------------------

def _sync_ratio(runs):
    r = _row(runs[0], method="ddp", model="wide")
    return None if r is None else r["vs_mpi"]


def _sync_detail(runs):
    ddp, mpi = _row(runs[0], method="ddp", model="wide"), _row(runs[0], method="mpi", model="wide")
    if ddp is None or mpi is None:
        return "a run failed"
    return (f"{ddp['bytes'] / 2**20:.1f} MB: DDP sync {_ms(ddp['time_median_s'])}, "
            f"MPI Allreduce {_ms(mpi['time_median_s'])} ({mpi['busbw_gbs']:.2f} GB/s bus)")


# --- wide overlap -------------------------------------------------------------------------------

def _overlap_ratio(runs):
    on, off = _row(runs[0], ranks=2), _row(runs[1], ranks=2)
    if on is None or off is None or not off["exposed_comm_s"]:
        return None
    return on["exposed_comm_s"] / off["exposed_comm_s"]


def _overlap_detail(runs):
    on, off = _row(runs[0], ranks=2), _row(runs[1], ranks=2)
    if on is None or off is None:
        return "a run failed"
    return (f"exposed comm {_ms(on['exposed_comm_s'])} (overlap on) vs "
            f"{_ms(off['exposed_comm_s'])} (off); comm active {_ms(on['comm_s'])} vs "
            f"{_ms(off['comm_s'])}; compute {_ms(on['compute_s'])} vs {_ms(off['compute_s'])}; "
            f"step {_ms(on['step_s'])} vs {_ms(off['step_s'])}")


def _compute_on_off(runs):
    on, off = _row(runs[0], ranks=2), _row(runs[1], ranks=2)
    return None if on is None or off is None else on["compute_s"] / off["compute_s"]


def _compute_two_one(runs):
    one, two = _row(runs[0], ranks=1), _row(runs[0], ranks=2)
    return None if one is None or two is None else two["compute_s"] / one["compute_s"]


def _step_on_off(runs):
    on, off = _row(runs[0], ranks=2), _row(runs[1], ranks=2)
    return None if on is None or off is None else on["step_s"] / off["step_s"]


def _no_overlap_detail(runs):
    one, two = _row(runs[0], ranks=1), _row(runs[0], ranks=2)
    if one is None or two is None:
        return "a run failed"
    return (f"1 rank: step {_ms(one['step_s'])}, compute {_ms(one['compute_s'])}, optimizer "
            f"{_ms(one['optimizer_s'])}; 2 ranks: step {_ms(two['step_s'])}, compute "
            f"{_ms(two['compute_s'])}, sync {_ms(two['exposed_comm_s'])}, optimizer "
            f"{_ms(two['optimizer_s'])}")


def _calibration(runs):
    cal = _row(runs[0], kind="calibration")
    return None if cal is None else cal["predicted_step_s_2"] / cal["measured_step_s_2"]


def _calibration_detail(runs):
    cal = _row(runs[0], kind="calibration")
    if cal is None:
        return "the calibration failed"
    return (f"fitted alpha {cal['alpha_s'] * 1e6:.1f} us, beta 1/{cal['bandwidth_gbs']:.2f} GB/s;"
            f" 1-rank step {_ms(cal['compute_s'])}; 2 ranks predicted "
            f"{_ms(cal['predicted_step_s_2'])}, measured {_ms(cal['measured_step_s_2'])} "
            f"(exposed comm predicted {_ms(cal['predicted_exposed_comm_s_2'])}, measured "
            f"{_ms(cal['measured_exposed_comm_s_2'])})")


def targets(steps: int = 30, warmup: int = 5) -> list[Target]:
    """The targets, with ``steps`` timed and ``warmup`` untimed steps per run."""
    sw = ("--steps", str(steps), "--warmup", str(warmup))
    wide_on = ("bench", "scaling", "--model", "wide", "--ranks", "2", "--overlap", *sw)
    wide_off = ("bench", "scaling", "--model", "wide", "--ranks", "1,2", "--no-overlap", *sw)
    mlp_peers = ("bench", "peers", "--model", "mlp", "--ranks", "1,2", "--peers",
                 "torch,torch-ddp", *sw)
    return [
        Target("mlp_weak_scaling", "mlp, 2 ranks: weak-scaling efficiency (2 x 1 thread vs 1 x 1)",
               ">= 0.90", (("bench", "scaling", "--model", "mlp", "--ranks", "1,2", *sw),),
               _mlp_eff, _mlp_detail),
        Target("mlp_torch_ddp_scaling", "reference: torch-ddp (gloo) weak-scaling efficiency, "
               "mlp, 2 ranks", None, (mlp_peers,), _torch_ddp_eff, _mlp_peers_detail),
        Target("mlp_vs_torch", "mlp, 1 rank, 1 thread: step time vs torch", "<= 1.0",
               (mlp_peers,), lambda runs: _ratio(runs, "torch", 1), _mlp_vs_torch_detail),
        Target("mlp_rss_vs_torch", "mlp, 1 rank: peak RSS vs torch", "<= 1.0", (mlp_peers,),
               lambda runs: _ratio(runs, "torch", 1, "peak_rss_ratio"), _rss_detail),
        Target("wide_vs_torch_ddp", "wide, 2 ranks: step time vs torch-ddp (gloo)", "<= 0.6",
               (("bench", "peers", "--model", "wide", "--ranks", "2", "--peers",
                 "torch-ddp,mpi-allreduce", *sw),),
               lambda runs: _ratio(runs, "torch-ddp", 2), _wide_ddp_detail),
        Target("wide_grad_sync", "wide gradient sync (DDP, 2 ranks) vs one MPI Allreduce of "
               "the same bytes", "<= 1.1",
               (("bench", "allreduce", "--model", "wide", "--ranks", "2", "--methods",
                 "mpi,ddp", "--repeats", "20"),), _sync_ratio, _sync_detail),
        Target("wide_overlap", "wide, 2 ranks: exposed comm with overlap on / off", "<= 0.5",
               (wide_on, wide_off), _overlap_ratio, _overlap_detail),
        Target("wide_compute_overlap", "diagnostic: wide, 2 ranks: compute with overlap on / "
               "off", None, (wide_on, wide_off), _compute_on_off, _overlap_detail),
        Target("wide_compute_ranks", "diagnostic: wide, overlap off: compute at 2 ranks / 1 "
               "rank", None, (wide_off,), _compute_two_one, _no_overlap_detail),
        Target("projection_no_overlap", "diagnostic: alpha-beta projection, wide, overlap off: "
               "predicted / measured 2-rank step (calibrated here)", None,
               (("bench", "project", "--calibrate", "--model", "wide", "--no-overlap",
                 "--steps", str(steps), "--ranks", "2..4096"),), _calibration,
               _calibration_detail),
        Target("projection_overlap", "diagnostic: alpha-beta projection, wide, overlap on: "
               "predicted / measured 2-rank step (calibrated here)", None,
               (("bench", "project", "--calibrate", "--model", "wide", "--overlap",
                 "--steps", str(steps), "--ranks", "2..4096"),), _calibration,
               _calibration_detail),
        Target("wide_step_overlap", "diagnostic: wide, 2 ranks: step time with overlap on / "
               "off", None, (wide_on, wide_off), _step_on_off, _overlap_detail),
    ]
