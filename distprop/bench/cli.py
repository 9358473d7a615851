"""``distprop bench``: the click group (added to the ``distprop`` app in :mod:`distprop.cli`).

Thin: options are parsed and checked here (bad input is a usage error, exit 2), then a config
dataclass goes to the library function that does the work.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from distprop.bench import launching, units
from distprop.cli_choices import RegistryChoice
from distprop.registry import COMPRESSIONS


def _workloads() -> tuple[str, ...]:
    from distprop.models import model_names

    return tuple(model_names())


def _check_model(ctx, param, value):
    if value is None:
        return value
    if value not in _workloads():
        raise click.BadParameter(f"unknown model {value!r}; choose from "
                                 f"{', '.join(_workloads())}")
    return value


def _parse_ranks(ctx, param, value):
    try:
        return units.parse_ranks(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _parse_sizes(ctx, param, value):
    if value is None:
        return None
    try:
        return units.parse_sizes(value, factor=ctx.params.get("factor", 2) if ctx else 2)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _parse_bandwidth(ctx, param, value):
    if value is None:
        return None
    try:
        return units.parse_bandwidth(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _check_out(ctx, param, value):
    """Create ``--out`` before any run, so an unusable directory is a usage error, not a
    traceback after minutes of benchmarking."""
    if value is None:
        return value
    try:
        Path(value).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.BadParameter(f"cannot create directory {value}: {exc}") from None
    return value


def _check_launch(ranks: list[int], threads: int, oversubscribe: bool) -> None:
    try:
        launching.check_launchable(ranks, threads, oversubscribe)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def _command_line() -> str:
    return "distprop " + " ".join(sys.argv[1:])


def _write_rows(out: str | None, name: str, rows: list[dict], tables=(), plot=None) -> None:
    """Write ``rows`` to ``OUT/NAME.jsonl``, each ``(suffix, rows, keys)`` of ``tables`` to
    ``OUT/NAME<suffix>.csv`` and, with matplotlib, ``plot(rows, OUT/NAME.png)``; say so."""
    if not out:
        return
    import importlib.util

    from distprop.bench import report

    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    report.write_jsonl(rows, path / f"{name}.jsonl")
    written = [f"{path / name}.jsonl"]
    for suffix, part, keys in tables:
        report.write_csv(part, path / f"{name}{suffix}.csv", keys)
        written.append(f"{suffix}.csv")
    note = ""
    if plot is not None:
        if plot(rows, path / f"{name}.png"):
            written.append(".png")
        elif importlib.util.find_spec("matplotlib") is None:
            note = " (no PNG: install the 'plot' extra, matplotlib)"
    click.echo("# wrote " + ", ".join(written) + note, err=True)


def _stderr_print(*args, file=None, **kw):
    print(*args, file=file or sys.stdout, **kw)


_common = [
    click.option("--steps", type=click.IntRange(min=1), default=30, show_default=True,
                 help="timed steps per rank"),
    click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True,
                 help="untimed warm-up steps"),
    click.option("--threads-per-rank", type=click.IntRange(min=1), default=1, show_default=True,
                 help="BLAS threads of each rank"),
    click.option("--oversubscribe", is_flag=True,
                 help="allow more ranks x threads than cores (timings then measure sharing)"),
    click.option("--timeout", type=click.FloatRange(min=1), default=600.0, show_default=True,
                 help="seconds before one launched run is abandoned"),
]


def common_options(fn):
    for opt in reversed(_common):
        fn = opt(fn)
    return fn


@click.group("bench")
def bench() -> None:
    """Benchmarks: scaling sweeps, allreduce bandwidth, peer comparisons, projections."""


@bench.command("scaling")
@click.option("--model", "workload", required=True, callback=_check_model,
              help="zoo workload: mlp, cnn, lstm, transformer, wide")
@click.option("--ranks", default="1,2", show_default=True, callback=_parse_ranks,
              help="rank counts, e.g. 1,2,4 or 1..8")
@click.option("--mode", type=click.Choice(["weak", "strong"]), default="weak", show_default=True,
              help="weak: fixed batch per rank; strong: fixed global batch")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="batch per rank (weak; default: the workload's)")
@click.option("--global-batch-size", type=click.IntRange(min=1), default=None,
              help="global batch (strong; default: workload batch x largest rank count)")
@common_options
@click.option("--overlap/--no-overlap", default=True, show_default=True,
              help="start bucket allreduces during backward")
@click.option("--bucket-mb", type=click.FloatRange(min=0, min_open=True), default=25.0,
              show_default=True, help="DDP bucket size")
@click.option("--compression", type=RegistryChoice(COMPRESSIONS), default=None,
              help="DDP communication hook: " + ", ".join(COMPRESSIONS)
              + " (powersgd compresses from the second step)")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="where each rank trains (cuda: one GPU per rank)")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              callback=_check_out,
              help="directory for JSON lines, CSV and PNG")
@click.option("--trace", "trace_file", type=click.Path(dir_okay=False), default=None,
              help="Chrome trace per rank (FILE.n<R>.rank<r>.json) and merged per run")
def scaling_cmd(workload, ranks, mode, batch_size, global_batch_size, steps, warmup,
                threads_per_rank, oversubscribe, timeout, overlap, bucket_mb, compression, device,
                out, trace_file):
    """Scaling sweep: one run per rank count, every rank's step times, one report."""
    from distprop.bench.scaling import ScalingConfig, run_scaling

    _check_launch(ranks, threads_per_rank, oversubscribe)
    if device == "cuda":
        from distprop import backend

        if backend.gpu_count() == 0:
            raise click.BadParameter("no CUDA device is visible (CuPy with a GPU is needed)",
                                     param_hint="--device")
    cfg = ScalingConfig(workload=workload, ranks=ranks, mode=mode, batch_size=batch_size,
                        global_batch_size=global_batch_size, steps=steps, warmup=warmup,
                        threads_per_rank=threads_per_rank, overlap=overlap, bucket_mb=bucket_mb,
                        compression=compression, device=device, out=out, trace=trace_file,
                        timeout_s=timeout, oversubscribe=oversubscribe,
                        command=_command_line())
    try:
        cfg.validate()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    rows = run_scaling(cfg, echo=_stderr_print)
    if any(r.get("error") for r in rows):
        sys.exit(1)


@bench.command("allreduce")
@click.option("--factor", type=click.IntRange(min=2), default=2, show_default=True,
              is_eager=True, help="step between sizes of a LO..HI range")
@click.option("--sizes", default=None, callback=_parse_sizes,
              help="bytes per allreduce: LO..HI or a list, e.g. 1KB..256MB or 4KB,1MB "
                   "[default: 1KB..64MB, none with --model]")
@click.option("--ranks", default="2", show_default=True, callback=_parse_ranks,
              help="rank counts")
@click.option("--methods", default="mpi,distprop,ddp", show_default=True,
              help="mpi (raw mpi4py Allreduce), distprop (communicator), ddp (bucketed sync), "
                   "ddp-mpi / ddp-shm (DDP forcing MPI / node-shared buffers), memcpy (the "
                   "memory-bandwidth floor)")
@click.option("--bucket-mb", type=click.FloatRange(min=0, min_open=True), default=25.0,
              show_default=True, help="DDP bucket size (the ddp method)")
@click.option("--repeats", type=click.IntRange(min=1), default=None,
              help="timed calls per method and size [default: about 1 s of calls, 5..50]")
@click.option("--compression", default="", show_default=False,
              help="also time DDP's sync with these gradient compressions (fp16,bf16): "
                   "methods ddp-fp16 / ddp-bf16")
@click.option("--model", "workload", default=None, callback=_check_model,
              help="also time DDP's sync of this zoo model's real gradient")
@click.option("--oversubscribe", is_flag=True,
              help="allow more ranks than cores (timings then measure sharing)")
@click.option("--timeout", type=click.FloatRange(min=1), default=600.0, show_default=True,
              help="seconds before one launched run is abandoned")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              callback=_check_out, help="directory for JSON lines, CSV and PNG")
def allreduce_cmd(factor, sizes, ranks, methods, bucket_mb, repeats, compression, workload,
                  oversubscribe, timeout, out):
    """Allreduce bus bandwidth: distprop's communicator and DDP vs raw mpi4py."""
    from distprop.bench import allreduce

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(allreduce.METHODS))
    if unknown or not chosen:
        raise click.BadParameter(f"unknown method(s) {unknown}; choose from "
                                 f"{', '.join(allreduce.METHODS)}", param_hint="--methods")
    kinds = [k.strip() for k in compression.split(",") if k.strip()]
    bad = sorted(set(kinds) - {"fp16", "bf16"})
    if bad:
        raise click.BadParameter(f"unknown compression(s) {bad}; choose from fp16, bf16",
                                 param_hint="--compression")
    if kinds and "ddp" not in chosen:
        raise click.BadParameter("--compression times DDP's sync: add ddp to --methods",
                                 param_hint="--compression")
    if sizes is None:
        sizes = [] if workload else units.parse_sizes("1KB..64MB", factor)
    _check_launch(ranks, 1, oversubscribe)
    if min(ranks) < 2:
        raise click.BadParameter("an allreduce needs at least 2 ranks", param_hint="--ranks")
    rows = []
    failed = False
    for n in ranks:
        cfg = {"kind": "allreduce", "sizes": sizes, "methods": chosen, "bucket_mb": bucket_mb,
               "model": workload, "repeats": repeats, "compression": kinds}
        outcome = launching.run_worker(n, ["-m", "distprop.bench.runner", json.dumps(cfg)],
                                       threads=1, timeout=timeout, oversubscribe=oversubscribe)
        if outcome.error:
            failed = True
            rows.append({"ranks": n, "error": outcome.error})
            click.echo(f"{n} ranks: FAILED: {outcome.error}")
            continue
        got = allreduce.add_ratios(outcome.result["rows"])
        for r in got:
            r["command"] = _command_line()
        click.echo(f"# {n} ranks")
        click.echo(allreduce.format_table(got))
        rows.extend(got)
    for r in rows:
        click.echo(json.dumps(r))
    from distprop.bench import report

    _write_rows(out, "allreduce", rows, tables=[("", rows, report.ALLREDUCE_KEYS)],
                plot=report.plot_allreduce)
    if failed:
        sys.exit(1)


@bench.command("peers")
@click.option("--model", "workload", required=True, callback=_check_model,
              help="zoo workload: mlp, cnn, lstm, transformer, wide")
@click.option("--ranks", default="1,2", show_default=True, callback=_parse_ranks,
              help="rank counts, e.g. 1,2,4 or 1..8")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="batch per rank (default: the workload's)")
@common_options
@click.option("--overlap/--no-overlap", default=True, show_default=True,
              help="start bucket allreduces during backward (distprop)")
@click.option("--bucket-mb", type=click.FloatRange(min=0, min_open=True), default=25.0,
              show_default=True, help="DDP bucket size (distprop)")
@click.option("--peers", "peer_list", default=",".join(
    ("torch", "torch-ddp", "mpi-allreduce", "gemm-floor")), show_default=True,
    help="what to compare with: torch (one process), torch-ddp (gloo), mpi-allreduce (one "
         "Allreduce of the gradient's bytes), gemm-floor (the matrix products alone)")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              callback=_check_out, help="directory for JSON lines, CSV and PNG")
def peers_cmd(workload, ranks, batch_size, steps, warmup, threads_per_rank, oversubscribe,
              timeout, overlap, bucket_mb, peer_list, out):
    """The same workload in distprop, PyTorch and PyTorch DDP (gloo), with ratios."""
    from distprop.bench.peers import PEERS, PeersConfig, run_peers

    chosen = tuple(p.strip() for p in peer_list.split(",") if p.strip())
    unknown = sorted(set(chosen) - set(PEERS))
    if unknown:
        raise click.BadParameter(f"unknown peer(s) {unknown}; choose from {', '.join(PEERS)}",
                                 param_hint="--peers")
    _check_launch(ranks, threads_per_rank, oversubscribe)
    cfg = PeersConfig(workload=workload, ranks=ranks, batch_size=batch_size, steps=steps,
                      warmup=warmup, threads_per_rank=threads_per_rank, overlap=overlap,
                      bucket_mb=bucket_mb, peers=chosen, timeout_s=timeout,
                      oversubscribe=oversubscribe)
    rows, ratios = run_peers(cfg, echo=_stderr_print)
    for r in rows + ratios:
        r["command"] = _command_line()
    from distprop.bench import report

    _write_rows(out, f"peers-{workload}", rows + ratios,
                tables=[("", rows, report.PEERS_KEYS), (".ratios", ratios, report.RATIO_KEYS)],
                plot=lambda _, path: report.plot_peers(rows, path))
    if any(r.get("error") for r in rows):
        sys.exit(1)


@bench.command("project")
@click.option("--model", "workload", default="wide", show_default=True, callback=_check_model,
              help="zoo workload whose gradient size is projected")
@click.option("--grad-mb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="gradient size instead of the model's (MB)")
@click.option("--compute-ms", type=click.FloatRange(min=0, min_open=True), default=None,
              help="forward+backward+step time of one rank (measured here with --calibrate)")
@click.option("--bandwidth", default=None, callback=_parse_bandwidth,
              help="link bandwidth, e.g. 100Gbps or 12.5GB/s [default: 100Gbps]")
@click.option("--latency-us", type=click.FloatRange(min=0), default=None,
              help="per-message latency [default: 2]")
@click.option("--ranks", default="8..4096", show_default=True, callback=_parse_ranks,
              help="rank counts projected, e.g. 8..4096 or 8,64,512")
@click.option("--bucket-mb", type=click.FloatRange(min=0, min_open=True), default=25.0,
              show_default=True, help="DDP bucket size")
@click.option("--first-bucket-mb", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="size of the first (smaller) bucket, sent earliest in backward")
@click.option("--overlap/--no-overlap", default=True, show_default=True,
              help="bucket allreduces overlap the rest of backward")
@click.option("--backward-fraction", type=click.FloatRange(0, 1), default=2 / 3,
              show_default=True, help="share of compute spent in backward")
@click.option("--calibrate", is_flag=True,
              help="measure alpha/beta and compute here, and check the 2-rank prediction")
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True,
              help="timed steps of the calibration runs")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              callback=_check_out, help="directory for JSON lines")
def project_cmd(workload, grad_mb, compute_ms, bandwidth, latency_us, ranks, bucket_mb,
                first_bucket_mb, overlap, backward_fraction, calibrate, steps, out):
    """Alpha-beta projection of scaling efficiency (ring and tree allreduce, bucket overlap)."""
    from distprop.bench.project import ProjectConfig, run_project

    if compute_ms is None and not calibrate:
        raise click.UsageError("give --compute-ms (one rank's step time) or --calibrate to "
                               "measure it here")
    if calibrate:
        _check_launch([2], 1, False)
    cfg = ProjectConfig(workload=workload, grad_mb=grad_mb, compute_ms=compute_ms,
                        bandwidth=bandwidth, latency_us=latency_us, ranks=ranks,
                        bucket_mb=bucket_mb, first_bucket_mb=first_bucket_mb, overlap=overlap,
                        backward_fraction=backward_fraction, calibrate=calibrate, steps=steps)
    rows = run_project(cfg, echo=click.echo)
    for r in rows:
        r["command"] = _command_line()
    _write_rows(out, f"project-{workload}", rows)
