"""The GPU path's CPU-testable parts: device-per-rank mapping, communicator selection, clear
errors without CuPy, ``distprop info`` degrading gracefully, and flat models staying flat across
``Module.to()``. (The GPU itself is exercised by tests/test_gpu.py, marked ``gpu``.)"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import distprop as dp
from distprop import backend, info
from distprop.cli import cli
from distprop.distributed import device as device_mod
from distprop.distributed.comm import SingleProcessCommunicator
from distprop.distributed.gpucomm import (
    CudaAwareMPICommunicator,
    HostStagedCommunicator,
    mpi_cuda_support,
)
from distprop.distributed.nccl import format_version, nccl_status
from distprop.distributed.selection import (
    CommFacts,
    CommSelectionError,
    choose_comm,
    comm_kind,
    make_comm,
)
from distprop.flat import contiguous_range, slot_of

from helpers import run_mpi


@pytest.fixture
def _cupy_missing(monkeypatch):
    """Run as on a machine without CuPy, even where it is installed (the gpu-check extra):
    DISTPROP_NO_CUPY makes the backend (and subprocesses) treat it as missing."""
    monkeypatch.setenv("DISTPROP_NO_CUPY", "1")
    monkeypatch.setattr(backend, "_cupy", None)
    monkeypatch.setattr(backend, "_cupy_error", None)
    monkeypatch.setattr(backend, "_cupy_checked", False)


no_cupy = pytest.mark.usefixtures("_cupy_missing")


# --- device per rank ---------------------------------------------------------------------------

# local_rank, local_size, CUDA_VISIBLE_DEVICES (None: unset), GPUs CUDA reports,
# expected (ordinal, physical, shared)
MAPPING = [
    (0, 1, None, 1, (0, "0", False)),
    (1, 2, None, 2, (1, "1", False)),
    (3, 4, None, 2, (1, "1", True)),
    (2, 4, None, 2, (0, "0", True)),
    (1, 2, "2,3", 2, (1, "3", False)),
    (0, 2, "2,3", 2, (0, "2", False)),
    (1, 4, "5", 1, (0, "5", True)),           # srun --gpus-per-task=1: each rank sees one GPU
    (1, 2, "GPU-aaaa, GPU-bbbb", 2, (1, "GPU-bbbb", False)),
    (2, 3, "4,5,6,7", 2, (0, "4", True)),     # CUDA shows fewer devices than listed
    (0, 2, "", 0, (None, None, False)),       # set but empty: no GPU, the CPU
    (1, 2, None, 0, (None, None, False)),
]


@pytest.mark.parametrize("local_rank,local_size,env,count,expected", MAPPING)
def test_select_device_round_robin_respects_visible_devices(local_rank, local_size, env, count,
                                                            expected):
    # env=None stands for "unset": not read from this process's environment
    visible = ([str(i) for i in range(count)] if env is None
               else device_mod.visible_devices(count, env))
    choice = device_mod.select_device(local_rank, local_size, visible)
    assert (choice.ordinal, choice.physical, choice.shared) == expected
    assert choice.device == ("cpu" if expected[0] is None else f"cuda:{expected[0]}")


def test_visible_devices_reads_the_environment(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert device_mod.visible_devices(2) == ["3", "1"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert device_mod.visible_devices(3) == ["0", "1", "2"]


def test_select_device_rejects_impossible_local_ranks():
    with pytest.raises(ValueError, match="local rank 2 is not a rank of a node with 2"):
        device_mod.select_device(2, 2, ["0"])
    with pytest.raises(ValueError, match="local rank -1"):
        device_mod.select_device(-1, 2, ["0"])


def test_planned_mapping_text():
    text = device_mod.planned_mapping(3, ["0", "1"])
    assert text.startswith("local rank 0 -> cuda:0; local rank 1 -> cuda:1; local rank 2 -> "
                           "cuda:0")
    assert "3 ranks share 2 GPU(s)" in text
    text = device_mod.planned_mapping(2, ["6", "7"])
    assert "local rank 1 -> cuda:1 (CUDA_VISIBLE_DEVICES entry 7)" in text
    assert "no GPU visible" in device_mod.planned_mapping(2, [])


def test_shared_gpus_and_mapping_description():
    entries = [
        {"rank": 0, "host": "a", "local_rank": 0, "local_size": 2, "device": "cuda:0",
         "physical": "0", "pci": "0000:01:00.0", "name": "H100"},
        {"rank": 1, "host": "a", "local_rank": 1, "local_size": 2, "device": "cuda:0",
         "physical": "0", "pci": "0000:01:00.0", "name": "H100"},
        {"rank": 2, "host": "b", "local_rank": 0, "local_size": 2, "device": "cuda:0",
         "physical": "0", "pci": "0000:01:00.0", "name": "H100"},
        {"rank": 3, "host": "b", "local_rank": 1, "local_size": 2, "device": "cuda:1",
         "physical": "1", "pci": "0000:02:00.0", "name": "H100"},
    ]
    assert device_mod.shared_gpus(entries) == [[0, 1]]  # same bus id on another host is fine
    text = device_mod.describe_mapping(entries)
    assert "rank 3 on b (local rank 1/2) -> cuda:1 (H100, PCI 0000:02:00.0)" in text
    assert "note: ranks 0, 1 share one GPU" in text
    cpu = [{"rank": 0, "host": "a", "local_rank": 0, "local_size": 1, "device": "cpu"}]
    assert device_mod.shared_gpus(cpu) == []
    assert device_mod.describe_mapping(cpu) == "rank 0 on a (local rank 0/1) -> cpu"


def test_assign_device_on_the_cpu_and_local_entry():
    comm = SingleProcessCommunicator()
    assert device_mod.assign_device(comm, "cpu") == backend.CPU
    entry = device_mod.local_entry(comm, backend.CPU)
    assert entry["device"] == "cpu" and entry["pci"] is None and entry["name"] == "cpu"
    assert device_mod.gather_mapping(comm, backend.CPU) == [entry]


@no_cupy
def test_assign_device_without_cupy_says_cupy_is_missing():
    with pytest.raises(RuntimeError, match="needs CuPy, which is missing"):
        device_mod.assign_device(SingleProcessCommunicator(), "cuda")
    assert device_mod.launch_note(2) is None  # a CPU launch prints nothing extra


# --- asking for CUDA without CuPy or without a GPU ---------------------------------------------


@no_cupy
@pytest.mark.parametrize("make", [
    lambda: dp.tensor([1.0, 2.0], device="cuda"),
    lambda: dp.zeros(3, device="cuda:0"),
    lambda: dp.randn(2, device="cuda"),
    lambda: dp.tensor([1.0]).to("cuda"),
    lambda: dp.tensor([1.0]).cuda(),
    lambda: dp.nn.Linear(2, 3).to("cuda"),
    lambda: dp.nn.Linear(2, 3, device="cuda"),
    lambda: next(iter(dp.data.DataLoader(dp.data.TensorDataset(np.zeros((4, 2))), batch_size=2,
                                         device="cuda"))),
], ids=["tensor", "zeros", "randn", "Tensor.to", "Tensor.cuda", "Module.to", "layer_device",
        "DataLoader"])
def test_cuda_without_cupy_names_what_is_missing(make):
    with pytest.raises(RuntimeError, match=r"device 'cuda(:0)?' needs CuPy, which is missing"):
        make()


def test_cuda_without_a_gpu_names_what_is_missing(monkeypatch):
    """CuPy importable but no device: the message says the GPU is missing, not CuPy."""
    monkeypatch.setattr(backend, "_cupy_checked", True)
    monkeypatch.setattr(backend, "_cupy", object())
    monkeypatch.setattr(backend, "gpu_count", lambda: 0)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU, but CuPy sees none"):
        backend.device("cuda:0")


# --- communicator selection --------------------------------------------------------------


def facts(**kw) -> CommFacts:
    base = dict(device_is_cuda=True, world_size=2, cupy=True, nccl=True, nccl_info="NCCL 2.21.5",
                mpi_cuda_aware=False, mpi_cuda_info="MPIX_Query_cuda_support() = 0")
    base.update(kw)
    return CommFacts(**base)


# choice, facts, expected kind, substring of the note ("" = no note)
SELECT = [
    ("auto", facts(), "nccl", ""),
    ("auto", facts(shared_gpus=[[0, 1]]), "mpi-host", "NCCL refuses two ranks on one GPU"),
    ("auto", facts(shared_gpus=[[0, 1]], mpi_cuda_aware=True), "mpi-cuda",
     "using CUDA-aware MPI"),
    ("auto", facts(nccl=False, nccl_info="CuPy cannot load NCCL", mpi_cuda_aware=True),
     "mpi-cuda", "NCCL is not available (CuPy cannot load NCCL)"),
    ("auto", facts(nccl=False, mpi_cuda_aware=None), "mpi-host", "pinned host buffers"),
    ("auto", facts(world_size=1), "host", ""),  # one process: nothing to reduce
    ("auto", facts(world_size=1, nccl=False), "host", ""),
    ("auto", facts(device_is_cuda=False, cupy=False), "host", ""),
    ("mpi-host", facts(), "mpi-host", ""),
    ("mpi-host", facts(world_size=1), "host", ""),
    ("mpi-host", facts(device_is_cuda=False), "host", ""),
    ("nccl", facts(), "nccl", ""),
    ("nccl", facts(world_size=1), "nccl", ""),
    ("nccl", facts(shared_gpus=[[0, 1], [2, 3]]), "mpi-host",
     "ranks 0, 1; ranks 2, 3 share one); falling back to mpi-host"),
    ("mpi-cuda", facts(mpi_cuda_aware=True), "mpi-cuda", ""),
    ("mpi-cuda", facts(mpi_cuda_aware=None, mpi_cuda_info="no query"), "mpi-cuda",
     "cannot tell whether MPI is CUDA-aware (no query)"),
    ("mpi-cuda", facts(world_size=1), "host", ""),
    ("MPI-HOST", facts(), "mpi-host", ""),
]


@pytest.mark.parametrize("choice,fx,kind,note", SELECT,
                         ids=[f"{c}-{i}" for i, (c, *_rest) in enumerate(SELECT)])
def test_choose_comm(choice, fx, kind, note):
    got_kind, got_note = choose_comm(choice, fx)
    assert got_kind == kind
    if note:
        assert note in got_note
    else:
        assert got_note == ""


# choice, facts, error substring
SELECT_ERRORS = [
    ("nccl", facts(device_is_cuda=False, cupy=False, cupy_error="No module named 'cupy'"),
     "--comm nccl needs GPU arrays, but CuPy is missing (No module named 'cupy')"),
    ("mpi-cuda", facts(device_is_cuda=False, cupy=False), "--comm mpi-cuda needs GPU arrays, "
                                                          "but CuPy is missing"),
    ("nccl", facts(device_is_cuda=False), "train with --device cuda"),
    ("nccl", facts(nccl=False, nccl_info="CuPy cannot load NCCL"),
     "--comm nccl: CuPy cannot load NCCL; use --comm mpi-host"),
    ("mpi-cuda", facts(mpi_cuda_aware=False), "the MPI library does not accept CUDA buffers "
                                              "(MPIX_Query_cuda_support() = 0)"),
]


@pytest.mark.parametrize("choice,fx,message", SELECT_ERRORS,
                         ids=[f"{c}-{i}" for i, (c, *_rest) in enumerate(SELECT_ERRORS)])
def test_choose_comm_errors_say_what_is_missing(choice, fx, message):
    with pytest.raises(CommSelectionError) as err:
        choose_comm(choice, fx)
    assert message in str(err.value)


def test_unknown_comm_choice():
    with pytest.raises(ValueError, match="unknown comm 'gloo': choose one of auto, nccl, "
                                         "mpi-cuda, mpi-host"):
        choose_comm("gloo", facts())
    with pytest.raises(ValueError, match="unknown comm"):
        make_comm("gloo", host=SingleProcessCommunicator())


@pytest.mark.parametrize("choice", ["auto", "mpi-host"])
def test_make_comm_on_the_cpu_is_the_world_communicator(choice):
    host = SingleProcessCommunicator()
    comm = make_comm(choice, host=host, device="cpu")
    assert comm is host and comm_kind(comm) == "single"


@no_cupy
@pytest.mark.parametrize("choice", ["nccl", "mpi-cuda"])
def test_make_comm_gpu_choices_without_cupy_fail_clearly(choice):
    with pytest.raises(CommSelectionError, match=f"--comm {choice} needs GPU arrays, but CuPy "
                                                 "is missing"):
        make_comm(choice, host=SingleProcessCommunicator(), device="cpu")


@no_cupy
def test_ddp_and_trainer_take_a_comm_choice():
    model = dp.nn.Linear(3, 2)
    ddp = dp.distributed.DistributedDataParallel(model, comm="auto")
    assert comm_kind(ddp.comm) == "single"
    with pytest.raises(CommSelectionError, match="CuPy is missing"):
        dp.distributed.DistributedDataParallel(dp.nn.Linear(3, 2), comm="nccl")
    from distprop.train.trainer import Trainer

    trainer = Trainer(dp.nn.Linear(3, 2), dp.nn.MSELoss(), None, comm="mpi-host")
    assert comm_kind(trainer.comm) == "single"


def test_nccl_status_and_version_format():
    ok, text = nccl_status()
    if not backend.cupy_available():
        assert not ok and text.startswith("CuPy is missing")
    assert format_version(21903) == "2.19.3"
    assert format_version(2708) == "2.7.8"


def test_mpi_cuda_support_query(monkeypatch):
    answer, source = mpi_cuda_support()
    assert answer in (True, False, None) and source
    monkeypatch.setenv("DISTPROP_MPI_CUDA_AWARE", "1")
    assert mpi_cuda_support() == (True, "DISTPROP_MPI_CUDA_AWARE")
    monkeypatch.setenv("DISTPROP_MPI_CUDA_AWARE", "0")
    assert mpi_cuda_support() == (False, "DISTPROP_MPI_CUDA_AWARE")


def test_device_communicators_need_a_cuda_device():
    for cls in (HostStagedCommunicator, CudaAwareMPICommunicator):
        with pytest.raises(ValueError, match="needs a CUDA device, got cpu"):
            cls(SingleProcessCommunicator(), backend.CPU)
    with pytest.raises(TypeError, match="needs an MPI communicator underneath"):
        CudaAwareMPICommunicator(SingleProcessCommunicator(), backend.Device("cuda", 0))


def test_device_communicators_pass_host_arrays_to_mpi():
    """Two ranks: NumPy arrays and objects through the device communicators go to MPI unchanged
    (the device paths need a GPU), and DDP trains through them as through MPI itself."""
    body = """
import sys
sys.path.insert(0, 'tests')
from ddp_common import *
from distprop.backend import Device
from distprop.distributed.gpucomm import CudaAwareMPICommunicator, HostStagedCommunicator
for cls in (HostStagedCommunicator, CudaAwareMPICommunicator):
    c = cls(comm, Device("cuda", 0))
    a = np.arange(6, dtype=np.float64) + rank
    c.allreduce(a, "mean")
    assert np.allclose(a, np.arange(6) + 0.5), a
    b = np.full(4, float(rank)); c.iallreduce(b, "sum").wait()
    assert np.allclose(b, 1.0), b
    g = c.allgather(np.array([rank, rank], dtype=np.int64))
    assert g.tolist() == [[0, 0], [1, 1]], g
    r = c.reduce_scatter(np.ones(4) * (rank + 1), "sum")
    assert np.allclose(r, [3, 3]), r
    z = np.array([7.0 + rank]); c.broadcast(z, 1)
    assert z[0] == 8.0
    assert c.allgather_obj(rank) == [0, 1] and c.allreduce_obj(rank + 1) == 3
    c.barrier()
    x, y = make_data()
    ref = reference()
    net, _ = train(mlp(seed=rank), x, y, ddp_kwargs=dict(comm=c, bucket_cap_mb=1e-4))
    err = max_diff(net.parameters(), ref)
    assert err < 1e-10, err
    say(cls.kind, "err", err)
say("DONE")
"""
    result = run_mpi(body, nprocs=2, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("DONE") == 2, result.stdout + result.stderr
    assert result.stdout.count("mpi-host err") == 2 and result.stdout.count("mpi-cuda err") == 2


# --- CLI and info --------------------------------------------------------------------------


@no_cupy
@pytest.mark.parametrize("choice", ["nccl", "mpi-cuda"])
def test_train_comm_gpu_choice_on_cpu_is_a_usage_error(choice, tmp_path):
    result = CliRunner().invoke(cli, ["train", "--comm", choice, "--out", str(tmp_path)],
                                catch_exceptions=False)
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert f"--comm {choice} needs GPU arrays, but CuPy is missing" in flat
    assert "Traceback" not in result.output


def test_train_unknown_comm_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(cli, ["train", "--comm", "gloo", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "gloo" in result.output and "mpi-host" in result.output


def test_info_gpu_lines_degrade_to_not_available():
    gpu = info._gpu()
    lines = info.format_gpu_lines(gpu, {"cuda_aware": False,
                                        "cuda_aware_source": "MPIX_Query_cuda_support()"})
    labels = [line.split()[0] for line in lines]
    assert labels == ["CuPy", "GPUs", "CUDA", "NCCL", "CUDA-aware"]
    assert lines[-1] == "CUDA-aware MPI no (MPIX_Query_cuda_support())"
    if not backend.cupy_available():
        for line in lines[:4]:
            assert "not available" in line, line
        assert gpu["cuda_runtime"] is None and gpu["nccl"] is None and gpu["gpus"] == []
    unknown = info.format_gpu_lines(gpu, {"cuda_aware": None, "cuda_aware_source": "no query"})
    assert unknown[-1] == "CUDA-aware MPI unknown (no query)"
    assert info.format_gpu_lines(gpu, {})[-1] == "CUDA-aware MPI not queried (MPI not initialised)"


def test_info_gpu_lines_with_a_gpu_but_no_nccl():
    gpu = {"cupy": "13.4.0", "devices": 1, "cuda_runtime": "12.4", "cuda_driver": "12.8",
           "gpus": [{"index": 0, "name": "NVIDIA H100", "memory_gib": 79.1,
                     "compute_capability": "9.0"}],
           "nccl": None, "nccl_error": "CuPy cannot load NCCL"}
    text = "\n".join(info.format_gpu_lines(gpu, {"cuda_aware": True, "cuda_aware_source": "x"}))
    assert "GPU 0         NVIDIA H100, 79.1 GiB, compute capability 9.0" in text
    assert "CUDA          runtime 12.4, driver 12.8" in text
    assert "NCCL          not available (CuPy cannot load NCCL)" in text
    assert "CUDA-aware MPI yes (x)" in text


def test_info_command_prints_gpu_lines():
    result = CliRunner().invoke(cli, ["info"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for label in ("CuPy", "GPUs", "CUDA ", "NCCL", "CUDA-aware MPI"):
        assert label in result.output
    if not backend.cupy_available():
        assert "NCCL          not available" in result.output


# --- flat models stay flat across Module.to() ------------------------------------------


def test_module_to_keeps_flat_parameters_and_optimizer_state_together():
    model = dp.nn.Sequential(dp.nn.Linear(3, 4), dp.nn.Tanh(), dp.nn.Linear(4, 2))
    opt = dp.optim.Adam(model.parameters(), lr=0.1)
    x = np.random.default_rng(0).standard_normal((5, 3))
    model(dp.tensor(x, dtype=np.float32)).sum().backward()
    opt.step()
    saved = {k: (v["exp_avg"].copy(), v["exp_avg_sq"].copy()) for k, v in opt.state.items()}
    old = slot_of(next(model.parameters())).buffer
    grads = [p.grad.numpy().copy() for p in model.parameters()]
    model.to(np.float64)
    params = list(model.parameters())
    found = contiguous_range(params)
    assert found is not None and found[0] is not old and not old.valid
    buf = found[0]
    assert buf.dtype == np.float64 and (found[1], found[2]) == (0, len(params))
    for p, g in zip(params, grads):  # gradients moved along, as views of the new flat grad
        assert p.grad.data.dtype == np.float64 and np.shares_memory(p.grad.data, buf.grad)
        np.testing.assert_allclose(p.grad.numpy(), g, rtol=1e-7)
    opt.zero_grad()
    model(dp.tensor(x)).sum().backward()
    opt.step()  # the optimizer follows the parameters into the new buffer
    for p in params:
        m, v = saved[p]
        state = opt.state[p]
        assert state["exp_avg"].dtype == np.float64 and float(state["step"]) == 2.0
        assert not np.allclose(state["exp_avg"], m)  # updated from the moved state, not reset
        expected = 0.9 * m.astype(np.float64) + 0.1 * p.grad.numpy()
        np.testing.assert_allclose(state["exp_avg"], expected, rtol=1e-6, atol=1e-9)
        assert v.shape == state["exp_avg_sq"].shape


def test_module_to_same_place_keeps_the_buffer():
    model = dp.nn.Linear(3, 2)
    dp.optim.SGD(model.parameters(), lr=0.1)
    buf = slot_of(model.weight).buffer
    model.to("cpu").to(np.float32)
    assert slot_of(model.weight).buffer is buf and buf.valid


@no_cupy
def test_gpu_benchmark_refuses_to_run_without_a_gpu():
    import subprocess
    import sys

    from helpers import REPO

    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gpu.py")],
                          capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert done.returncode == 2
    assert "bench_gpu.py needs a CUDA GPU: CuPy is missing" in done.stderr
    assert "Nothing was measured" in done.stderr and done.stdout == ""
