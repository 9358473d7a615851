"""The environment report behind ``distprop info``: versions, MPI, GPUs, BLAS threads, ranks."""

from __future__ import annotations

import os
import platform
import sys

from distprop import heap

RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID", "MPI_LOCALRANKID")
SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")


def launched_rank() -> int | None:
    """This process's rank from the launcher's environment (None when not under MPI)."""
    for var in RANK_VARS[:4]:
        value = os.environ.get(var)
        if value is not None and value.isdigit():
            return int(value)
    return None


def launched_size() -> int:
    """The world size from the launcher's environment (1 when not under MPI)."""
    for var in SIZE_VARS:
        value = os.environ.get(var)
        if value is not None and value.isdigit():
            return int(value)
    return 1


def under_mpi() -> bool:
    return launched_rank() is not None and launched_size() > 1


def _dist_version(distribution: str) -> str | None:
    """An installed distribution's version, without importing it (fast)."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _blas() -> list[dict]:
    try:
        import numpy  # noqa: F401
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"error": "threadpoolctl is not installed"}]
    return [{k: pool.get(k) for k in ("user_api", "internal_api", "version", "num_threads",
                                      "threading_layer", "filepath") if pool.get(k) is not None}
            for pool in threadpool_info()]


def _cuda_version(code) -> str:
    """CUDA's integer version (12040) as ``12.4``."""
    code = int(code)
    return f"{code // 1000}.{code % 1000 // 10}"


def _gpu() -> dict:
    """CuPy, the GPUs, CUDA runtime/driver and NCCL; every entry degrades to None plus a reason
    (``*_error``) instead of raising."""
    from distprop import backend

    cp = backend.cupy_module()
    if cp is None:
        return {"cupy": None, "reason": backend._cupy_error, "devices": 0, "gpus": [],
                "cuda_runtime": None, "cuda_driver": None, "nccl": None,
                "nccl_error": "CuPy is missing"}
    out: dict = {"cupy": cp.__version__, "devices": backend.gpu_count(), "gpus": []}
    for key, fn in (("cuda_runtime", "runtimeGetVersion"), ("cuda_driver", "driverGetVersion")):
        try:
            out[key] = _cuda_version(getattr(cp.cuda.runtime, fn)())
        except Exception as exc:
            out[key], out["cuda_error"] = None, f"{type(exc).__name__}: {exc}"
    for index in range(out["devices"]):
        entry: dict = {"index": index}
        try:
            props = cp.cuda.runtime.getDeviceProperties(index)
            name = props.get("name", b"")
            entry["name"] = name.decode() if isinstance(name, bytes) else str(name)
            entry["memory_gib"] = round(int(props.get("totalGlobalMem", 0)) / 2**30, 1)
            entry["compute_capability"] = f"{props.get('major')}.{props.get('minor')}"
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
        out["gpus"].append(entry)
    from distprop.distributed.nccl import format_version, nccl_module

    nccl = nccl_module()
    out["nccl"] = None
    if nccl is None:
        out["nccl_error"] = "CuPy cannot load NCCL"
    else:
        try:
            out["nccl"] = format_version(int(nccl.get_version()))
        except Exception as exc:
            out["nccl_error"] = f"{type(exc).__name__}: {exc}"
    return out


def _mpi(with_library: bool) -> dict:
    from distprop import launcher

    out: dict = {"mpi4py": _dist_version("mpi4py")}
    exe = launcher.find_mpiexec()
    out["mpiexec"] = exe
    if exe:
        out["mpiexec_implementation"] = launcher.parse_version_output(
            launcher.version_output(exe)) or "unknown"
    out["slurm_allocation"] = launcher.in_slurm_allocation()
    if with_library and out["mpi4py"] is not None:
        try:
            from mpi4py import MPI

            out["library"] = MPI.Get_library_version().strip().splitlines()[0]
            out["library_full"] = MPI.Get_library_version().strip()
            out["standard"] = "{}.{}".format(*MPI.Get_version())
        except Exception as exc:
            out["library"] = f"<cannot initialise MPI: {exc}>"
        else:
            from distprop.distributed.gpucomm import mpi_cuda_support

            try:
                out["cuda_aware"], out["cuda_aware_source"] = mpi_cuda_support()
            except Exception as exc:
                out["cuda_aware"], out["cuda_aware_source"] = None, f"query failed: {exc}"
    return out


def report(with_mpi_library: bool = True) -> dict:
    """Collect the environment report as a JSON-able dict (``ranks`` only under MPI)."""
    import numpy

    from distprop import __version__

    out = {
        "distprop": __version__,
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "cpu_cores": os.cpu_count(),
        "numpy": numpy.__version__,
        "click": _dist_version("click"),
        "mpi": _mpi(with_mpi_library),
        "gpu": _gpu(),
        "blas": _blas(),
        "thread_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS",
                                                     "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
        "heap": heap.state,
        "distprop_env": _distprop_env(),
        "optional": {name: _dist_version(name) for name in ("scikit-learn", "mnist1d",
                                                            "matplotlib", "tqdm", "torch")},
    }
    if under_mpi() and with_mpi_library:
        out["ranks"] = _ranks()
    return out


COMMANDS = ("train", "launch", "info", "bench", "evaluate", "predict", "export")


def _distprop_env() -> dict:
    """The ``DISTPROP_*`` variables set here: value and meaning (None: distprop does not read
    it, a typo?), from :data:`distprop.registry.ENV_VARS`."""
    from distprop.registry import env_entry

    out = {}
    for name in sorted(k for k in os.environ if k.startswith("DISTPROP_")):
        entry = env_entry(name, COMMANDS)
        out[name] = {"value": os.environ[name],
                     "meaning": entry.description if entry is not None else None}
    return out


def _ranks() -> list[dict]:
    """Every rank's host, local rank and BLAS threads, gathered on rank 0."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    threads = [p.get("num_threads") for p in _blas() if "num_threads" in p]
    mine = {"rank": comm.Get_rank(), "size": comm.Get_size(), "host": MPI.Get_processor_name(),
            "local_rank": local.Get_rank(), "local_size": local.Get_size(), "pid": os.getpid(),
            "blas_threads": threads[0] if threads else None}
    local.Free()
    everyone = comm.gather(mine, root=0)
    return everyone if comm.Get_rank() == 0 else []


def format_gpu_lines(gpu: dict, mpi: dict) -> list[str]:
    """The GPU part of the report: CuPy, GPUs, CUDA runtime/driver, NCCL, CUDA-aware MPI; each
    line says 'not available' (and why) when its piece is missing."""
    na = "not available"
    if not gpu.get("cupy"):
        reason = gpu.get("reason") or "CuPy is not installed"
        lines = [f"CuPy          {na} ({reason})", f"GPUs          {na} (needs CuPy)",
                 f"CUDA          runtime {na}, driver {na} (needs CuPy)",
                 f"NCCL          {na} (needs CuPy)"]
    else:
        lines = [f"CuPy          {gpu['cupy']}"]
        gpus = gpu.get("gpus") or []
        if not gpus:
            lines.append(f"GPUs          {na} (CuPy sees no CUDA device)")
        for g in gpus:
            desc = g.get("error") or (f"{g.get('name')}, {g.get('memory_gib')} GiB, compute "
                                      f"capability {g.get('compute_capability')}")
            lines.append(f"GPU {g['index']:<10d}{desc}")
        runtime, driver = gpu.get("cuda_runtime") or na, gpu.get("cuda_driver") or na
        extra = f" ({gpu['cuda_error']})" if gpu.get("cuda_error") else ""
        lines.append(f"CUDA          runtime {runtime}, driver {driver}{extra}")
        nccl = gpu.get("nccl")
        lines.append(f"NCCL          {nccl}" if nccl else
                     f"NCCL          {na} ({gpu.get('nccl_error', 'unknown reason')})")
    aware = mpi.get("cuda_aware", "not queried")
    if aware == "not queried":
        text = "not queried (MPI not initialised)"
    elif aware is None:
        text = f"unknown ({mpi.get('cuda_aware_source')})"
    else:
        text = f"{'yes' if aware else 'no'} ({mpi.get('cuda_aware_source')})"
    lines.append(f"CUDA-aware MPI {text}")
    return lines


def format_report(info: dict) -> str:
    """A human-readable rendering of :func:`report`."""
    mpi, gpu = info["mpi"], info["gpu"]
    lines = [
        f"distprop      {info['distprop']}",
        f"Python        {info['python']} ({info['python_executable']})",
        f"platform      {info['platform']}, {info['cpu_cores']} CPU cores",
        f"NumPy         {info['numpy']}",
        f"mpi4py        {mpi['mpi4py'] or 'not installed'}",
        f"MPI library   {mpi.get('library', 'not queried')}",
        f"mpiexec       {mpi['mpiexec'] or 'not found'}"
        + (f" ({mpi.get('mpiexec_implementation')})" if mpi["mpiexec"] else ""),
        f"Slurm         {'inside an allocation (srun)' if mpi['slurm_allocation'] else 'no'}",
    ]
    lines += format_gpu_lines(gpu, mpi)
    if info["blas"]:
        for pool in info["blas"]:
            if "error" in pool:
                lines.append(f"BLAS          {pool['error']}")
                continue
            lines.append(f"BLAS          {pool.get('internal_api')} {pool.get('version')} "
                         f"({pool.get('user_api')}), {pool.get('num_threads')} threads"
                         + (f", {pool['threading_layer']}" if pool.get("threading_layer") else ""))
    else:
        lines.append("BLAS          no thread pool found")
    env = ", ".join(f"{k}={v}" for k, v in info["thread_env"].items() if v is not None)
    lines.append(f"thread env    {env or 'unset'}")
    lines.append(f"heap          {info['heap']}")
    for name, var in info.get("distprop_env", {}).items():
        meaning = var["meaning"] or "not read by distprop (a typo?)"
        lines.append(f"env           {name}={var['value']}: {meaning}")
    opt = ", ".join(f"{k} {v}" if v else f"{k} -" for k, v in info["optional"].items())
    lines.append(f"optional      {opt}")
    for r in info.get("ranks", []):
        lines.append(f"rank {r['rank']}/{r['size']}    host {r['host']}, local rank "
                     f"{r['local_rank']}/{r['local_size']}, pid {r['pid']}, BLAS threads "
                     f"{r['blas_threads']}")
    return "\n".join(lines)
