"""Stream ordering, pinned-buffer lifetime and device placement of the GPU staging code, checked
on the CPU: the calls it makes to CuPy are recorded by the stand-in of tests/cupy_standin.py
(no GPU, no CuPy needed), and the CUDA-aware communicator runs under a real ``mpiexec``.

Also the device-mixing message of tests/test_gpu.py, built here on the CPU.
"""

from __future__ import annotations

import re

import cupy_standin
import numpy as np
import pytest

import distprop as dp
from distprop import backend
from distprop.distributed.comm import SingleProcessCommunicator
from distprop.distributed.gpucomm import HostStagedCommunicator
from distprop.placement import BatchStager

from helpers import run_mpi

CUDA0 = backend.Device("cuda", 0)


def _calls(kinds):
    return [c for c in cupy_standin.CALLS if c[0] in kinds]


def test_batch_stager_copy_waits_for_the_current_stream_and_the_consumer_for_the_copy(
        monkeypatch):
    with cupy_standin.installed(monkeypatch):
        stager = BatchStager(CUDA0)
        cupy_standin.CALLS.clear()
        out, event = stager.stage(np.arange(6, dtype=np.float32).reshape(2, 3))
        stager.ready(event, sync_host=False)
        calls = _calls({"record", "wait_event", "set"})
    copy = stager.stream.name
    # the copy stream waits on an event of the current (null) stream recorded after the
    # allocation, then copies, then records the event the consumer's stream waits on
    assert [c[0] for c in calls] == ["record", "wait_event", "set", "record", "wait_event"]
    (_, allocated, on), (_, waiter, waited) = calls[0], calls[1]
    assert on == "null" and waiter == copy and waited == allocated
    assert calls[2][2] == copy
    assert calls[3][1:] == (event.name, copy)
    assert calls[4][1:] == ("null", event.name)
    np.testing.assert_array_equal(out, np.arange(6).reshape(2, 3))


def test_host_staged_buffer_is_released_only_after_its_async_copy_completed(monkeypatch):
    with cupy_standin.installed(monkeypatch) as cp:
        comm = HostStagedCommunicator(SingleProcessCommunicator(), CUDA0, max_buffers=1)
        a = cp.ones(5, dtype=np.float32)
        b = cp.ones(7, dtype=np.float32)
        comm.allreduce(a)
        (set_a,) = _calls({"set"})
        (record_a,) = _calls({"record"})
        comm.allreduce(b)  # evicts a's buffer, which a's set() may still be reading
        calls = cupy_standin.CALLS
    assert record_a[2] == set_a[2]  # the event is on the stream the copy was queued on
    assert ("event_synchronize", record_a[1]) in calls, "evicted without waiting for its copy"
    evict = calls.index(("event_synchronize", record_a[1]))
    pinned_b = [i for i, c in enumerate(calls) if c[0] == "empty_pinned"][-1]
    assert pinned_b < evict, "the buffer was dropped before its copy was known to be done"
    assert len(comm._buffers) == 1


def test_host_staged_buffer_is_overwritten_only_after_its_async_copy_completed(monkeypatch):
    with cupy_standin.installed(monkeypatch) as cp:
        comm = HostStagedCommunicator(SingleProcessCommunicator(), CUDA0)
        a = cp.ones(5, dtype=np.float32)
        comm.allreduce(a)
        (record,) = _calls({"record"})
        cupy_standin.CALLS.clear()
        comm.allreduce(a)  # the same cached buffer: written again by get() and MPI
        calls = list(cupy_standin.CALLS)
    assert calls.index(("event_synchronize", record[1])) < calls.index(_calls({"get"})[0])


CUDA_AWARE = r"""
import sys
sys.path.insert(0, "tests")
import numpy as np
import cupy_standin
from distprop import backend
cp = cupy_standin.module()
backend._cupy, backend._cupy_checked = cp, True
from distprop.distributed.comm import MPICommunicator
from distprop.distributed.gpucomm import CudaAwareMPICommunicator

host = MPICommunicator()
comm = CudaAwareMPICommunicator(host, backend.Device("cuda", 1))
r, n = comm.rank, comm.size
x = cp.arange(4, dtype=np.float32) + 10 * r
out = cp.zeros((4, n * 2), dtype=np.float32)[:, ::2]  # non-contiguous: needs a temporary
y = cp.arange(2 * n, dtype=np.float32)
part = cp.zeros(4, dtype=np.float32)[::2]
cupy_standin.CALLS.clear()
comm.allgather(x, out.T)
comm.reduce_scatter(y, "sum", part)
calls = list(cupy_standin.CALLS)
assert np.array_equal(np.asarray(out.T), np.stack([np.arange(4) + 10 * k for k in range(n)]))
assert np.array_equal(np.asarray(part), n * np.arange(2 * n)[2 * r:2 * r + 2])
assert any(c[0] == "alloc" for c in calls) and any(c[0] == "setitem" for c in calls), calls
wrong = [c for c in calls if c[0] in ("alloc", "setitem") and c[-1] != 1]
sys.stdout.write(f"rank {r} off-device {wrong}\n")  # one write: ranks' lines stay whole
"""


@pytest.mark.mpi
def test_cuda_aware_temporaries_and_copies_are_on_the_communicator_device():
    proc = run_mpi(CUDA_AWARE, nprocs=2, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(re.findall(r"rank \d off-device \[[^\]]*\]", proc.stdout)) == [
        "rank 0 off-device []", "rank 1 off-device []"], proc.stdout


@pytest.mark.parametrize("collective", ["allreduce", "broadcast", "allgather",
                                        "reduce_scatter"])
def test_nccl_temporaries_and_copies_back_are_on_the_communicator_device(collective,
                                                                         monkeypatch):
    from distprop.distributed import nccl

    monkeypatch.setattr(nccl, "nccl_module", lambda: cupy_standin.nccl)
    with cupy_standin.installed(monkeypatch) as cp:
        comm = nccl.NCCLCommunicator(SingleProcessCommunicator(), backend.Device("cuda", 1))
        x = cp.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]  # non-contiguous
        out = cp.zeros((3, 4), dtype=np.float32)[:, ::2]
        cupy_standin.CALLS.clear()
        if collective in ("allgather", "reduce_scatter"):
            getattr(comm, collective)(x, out=out)
            result = out
        else:
            result = getattr(comm, collective)(x)
        calls = list(cupy_standin.CALLS)
    np.testing.assert_array_equal(result, np.arange(12).reshape(3, 4)[:, ::2])
    assert [c for c in calls if c[0] == "setitem"], "no copy back from the temporary"
    wrong = [c for c in calls if c[0] in ("alloc", "setitem", "nccl") and c[2 if c[0] == "nccl"
                                                                          else -1] != 1]
    assert not wrong, f"device work outside cuda.Device(1): {wrong}"


def test_mixed_device_message_of_the_gpu_test_matches_what_conv_layers_raise(monkeypatch):
    """tests/test_gpu.py expects this message on a real GPU; build it on the CPU by making the
    weight look like a CUDA array to the device check."""
    import test_gpu  # its module constant, not its (gpu-marked) tests

    from distprop.ops import arith

    conv = dp.nn.Conv2d(1, 2, 3)
    weight = conv.weight.data
    fake = object()  # stands for the cupy module of the weight
    monkeypatch.setattr(arith, "get_array_module",
                        lambda a: fake if a is weight else np)
    monkeypatch.setattr(backend, "device_of",
                        lambda a: CUDA0 if a is weight else backend.CPU)
    with pytest.raises(RuntimeError) as info:
        conv(dp.randn(1, 1, 5, 5))
    assert re.search(test_gpu.MIXED_CONV_MESSAGE, str(info.value)), str(info.value)
