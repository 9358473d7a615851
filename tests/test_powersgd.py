"""PowerSGD as a DDP communication hook: PyTorch's powerSGD_hook is the oracle (world size 1,
gloo, same weights, gradients and initial Q), then real 2-rank training and resume."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import distprop as dp
from distprop.distributed import DistributedDataParallel as DDP
from distprop.distributed.powersgd import PowerSGDState, powerSGD_hook
from distprop.flat import slot_of

from helpers import REPO, run_mpi

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

STEPS = 5
SIZES = [(32, 24), (24, 24), (24, 24), (24, 3)]  # two same-shape layers: PyTorch groups them


def _torch_q_init(seed, shapes, dtype):
    """PyTorch's draw of the initial Qs of one bucket (torch.randn after manual_seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [torch.randn(1, *shape, dtype=torch.float32).numpy()[0] for shape in shapes]


def _torch_model():
    layers = []
    for i, (a, b) in enumerate(SIZES):
        layers.append(torch.nn.Linear(a, b))
        if i + 1 < len(SIZES):
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def _dp_model():
    layers = []
    for i, (a, b) in enumerate(SIZES):
        layers.append(dp.nn.Linear(a, b))
        if i + 1 < len(SIZES):
            layers.append(dp.nn.Tanh())
    return dp.nn.Sequential(*layers)


def _run_torch(tmp_path, options, xs, ys):
    """PyTorch DDP + powerSGD_hook on a 1-rank gloo group: per step, the parameters, the
    error memory per parameter name and the P/Q memories."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_psgd

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        torch.manual_seed(0)
        model = _torch_model()
        initial = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        names = {id(p): n for n, p in model.named_parameters()}
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        state = torch_psgd.PowerSGDState(None, **options)
        records = []

        def hook(st, bucket):
            params = [names[id(p)] for p in bucket.parameters()]
            compressed = st.iter >= st.start_powerSGD_iter
            fut = torch_psgd.powerSGD_hook(st, bucket)

            def record(f):
                if compressed:
                    entry = {}
                    if st.warm_start:  # (without, the memories are dropped after each step)
                        entry = {"p": st.p_memory_dict[0].numpy().copy(),
                                 "q": st.q_memory_dict[0].numpy().copy()}
                    if st.use_error_feedback:
                        err, at = st.error_dict[0].numpy(), 0
                        sizes = [p.numel() for p in bucket.parameters()]
                        entry["error"] = {}
                        for name, n in zip(params, sizes):
                            entry["error"][name] = err[at:at + n].copy()
                            at += n
                    records.append(entry)
                return f.value()

            return fut.then(record)

        ddp.register_comm_hook(state, hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        params = []
        for x, y in zip(xs, ys):
            opt.zero_grad()
            torch.nn.functional.mse_loss(ddp(torch.from_numpy(x)), torch.from_numpy(y)).backward()
            opt.step()
            params.append({k: v.detach().numpy().copy() for k, v in model.state_dict().items()})
        return initial, params, records
    finally:
        dist.destroy_process_group()


def _run_torch_in_child(tmp_path, options, xs, ys):
    """:func:`_run_torch` in a fresh interpreter: gloo's threads and a second
    ``init_process_group`` in one long-lived process can hang (seen in the full suite)."""
    args, out = tmp_path / "args.pkl", tmp_path / "torch.pkl"
    args.write_bytes(pickle.dumps((options, xs, ys)))
    code = textwrap.dedent(f"""
        import pickle, sys
        from pathlib import Path
        sys.path.insert(0, {str(REPO / "tests")!r})
        import test_powersgd as t
        options, xs, ys = pickle.loads(Path({str(args)!r}).read_bytes())
        result = t._run_torch(Path({str(tmp_path)!r}), options, xs, ys)
        Path({str(out)!r}).write_bytes(pickle.dumps(result))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=180, cwd=str(REPO))
    assert done.returncode == 0, done.stdout + done.stderr
    return pickle.loads(out.read_bytes())


def _run_ours(initial, options, xs, ys):
    model = _dp_model()
    model.load_state_dict(initial)
    ddp = DDP(model)
    state = PowerSGDState(None, q_init=_torch_q_init, **options)
    records = []
    names = dict(zip(map(id, model.parameters()), dict(model.named_parameters())))
    by_name = dict(model.named_parameters())

    def hook(st, bucket):
        compressed = st.iter >= st.start_powerSGD_iter
        fut = powerSGD_hook(st, bucket)

        def record(f):
            if compressed:
                entry = {}
                if st.warm_start:
                    entry = {"p": st.p_memory_dict[0].copy(), "q": st.q_memory_dict[0].copy()}
                if st.use_error_feedback:
                    err = st.error_dict[0]
                    entry["error"] = {}
                    for p in bucket.parameters():
                        at = slot_of(p).offset - bucket.start
                        entry["error"][names[id(p)]] = err[at:at + p.numel()].copy()
                records.append(entry)
            return f.value()

        return fut.then(record)

    ddp.register_comm_hook(state, hook)
    opt = dp.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = dp.nn.MSELoss()
    params = []
    for x, y in zip(xs, ys):
        opt.zero_grad()
        loss_fn(ddp(dp.tensor(x)), dp.tensor(y)).backward()
        opt.step()
        params.append({k: by_name[k].numpy().copy() for k in by_name})
    return params, records


@pytest.mark.parametrize("options", [
    {"matrix_approximation_rank": 1, "start_powerSGD_iter": 2},  # Gram-Schmidt
    {"matrix_approximation_rank": 4, "start_powerSGD_iter": 2},  # QR
    {"matrix_approximation_rank": 2, "start_powerSGD_iter": 1, "warm_start": False,
     "use_error_feedback": False, "orthogonalization_epsilon": 1e-8, "random_seed": 7},
], ids=["rank1", "rank4-qr", "cold-no-feedback"])
def test_matches_pytorch_powersgd_hook(tmp_path, options):
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((16, 32)).astype(np.float32) for _ in range(STEPS)]
    ys = [rng.standard_normal((16, 3)).astype(np.float32) for _ in range(STEPS)]
    initial, want_params, want = _run_torch_in_child(tmp_path, options, xs, ys)
    got_params, got = _run_ours(initial, options, xs, ys)
    assert len(got) == len(want) == STEPS - options["start_powerSGD_iter"]
    for step, (w, g) in enumerate(zip(want, got)):
        assert g.keys() == w.keys()
        for key in ("p", "q"):
            if key in w:
                np.testing.assert_allclose(g[key], w[key], rtol=1e-4, atol=2e-5,
                                           err_msg=f"{key.upper()} memory at step {step}")
        for name, err in w.get("error", {}).items():
            np.testing.assert_allclose(g["error"][name], err, rtol=1e-4, atol=2e-5,
                                       err_msg=f"error feedback {name} {step}")
    for step, (w, g) in enumerate(zip(want_params, got_params)):
        for name, value in w.items():
            np.testing.assert_allclose(g[name], value, rtol=1e-4, atol=2e-5,
                                       err_msg=f"{name} after step {step + 1}")
    if "error" in got[-1]:  # a real approximation happened: something was left over
        assert not np.allclose(got[-1]["error"]["2.weight"], 0)


def test_state_refuses_what_pytorch_refuses():
    with pytest.raises(ValueError, match="start_powerSGD_iter` > 1"):
        PowerSGDState(None, start_powerSGD_iter=1)
    with pytest.raises(ValueError, match="matrix_approximation_rank must be >= 1"):
        PowerSGDState(None, matrix_approximation_rank=0)


def test_a_non_finite_step_does_not_poison_the_next_ones():
    dp.manual_seed(0)
    model = dp.nn.Sequential(dp.nn.Linear(16, 16), dp.nn.Tanh(), dp.nn.Linear(16, 16))
    ddp = DDP(model, nonfinite="skip")
    state = PowerSGDState(None, matrix_approximation_rank=2, start_powerSGD_iter=2)
    ddp.register_comm_hook(state, powerSGD_hook)
    rng = np.random.default_rng(0)
    verdicts = []
    for step in range(6):
        x = rng.standard_normal((4, 16)).astype(np.float32)
        if step == 3:
            x[0, 0] = np.nan
        model.zero_grad()
        ddp(dp.tensor(x)).pow(2).sum().backward()
        verdicts.append(ddp.step_ok)
    assert verdicts == [True, True, True, False, True, True]
    assert all(np.isfinite(e).all() for e in state.error_dict.values())


SCRIPT = r"""
import json, sys
import numpy as np
import distprop as dp
from distprop.data import TensorDataset
from distprop.train import callbacks as cbs
from distprop.train.trainer import Trainer

out = sys.argv[1]
comm = dp.distributed.init()
rng = np.random.default_rng(0)
X = rng.standard_normal((192, 20)).astype(np.float32)
Y = (X[:, :5].sum(1) > 0).astype(np.int64) + (X[:, 5] > 1).astype(np.int64)
data = TensorDataset(X, Y)

def run(resume=None, directory="a", comm_=None):
    dp.manual_seed(0)
    model = dp.nn.Sequential(dp.nn.Linear(20, 48), dp.nn.ReLU(), dp.nn.Linear(48, 48),
                             dp.nn.ReLU(), dp.nn.Linear(48, 3))
    opt = dp.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ck = cbs.Checkpointer(f"{out}/{directory}", every_steps=4, keep=None)
    trainer = Trainer(model, dp.nn.CrossEntropyLoss(), opt, callbacks=[ck], progress=False,
                      compression="powersgd", comm=comm_, ddp_kwargs={"compression_options": {
                          "matrix_approximation_rank": 2, "start_powerSGD_iter": 3}})
    with dp.no_grad():
        before = float(dp.nn.CrossEntropyLoss()(model(dp.tensor(X)), dp.tensor(Y)).item())
    trainer.fit(data, epochs=2, batch_size=8, resume=resume)
    with dp.no_grad():
        after = float(dp.nn.CrossEntropyLoss()(model(dp.tensor(X)), dp.tensor(Y)).item())
    flat = np.concatenate([p.numpy().ravel() for p in model.parameters()])
    state = trainer.ddp.comm_hook_state
    return flat, before, after, ck, state

flat, before, after, ck, state = run()
every = comm.allgather_obj(flat.tolist())
err = np.concatenate([v.ravel() for v in state.error_dict.values()])
errs = comm.allgather_obj(err.tolist())
resumed, _, _, _, _ = run(resume=ck.manager.path_for(8), directory="b")
if comm.rank == 0:  # the 2-rank checkpoint on 1 rank: memories start fresh, said once
    import logging
    from distprop.distributed.comm import SingleProcessCommunicator
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("distprop").addHandler(handler)
    _, _, _, _, one = run(resume=ck.manager.path_for(8), directory="c",
                          comm_=SingleProcessCommunicator())
    print("RESULT", json.dumps({
        "before": before, "after": after, "iter": state.iter,
        "same_params": all(np.array_equal(np.array(e), flat) for e in every),
        "errors_differ": not np.allclose(np.array(errs[0]), np.array(errs[1])),
        "resume_max_diff": float(np.abs(resumed - flat).max()),
        "other_world_iter": one.iter, "other_world_said": said}))
"""


def test_two_rank_training_learns_keeps_replicas_identical_and_resumes_exactly(tmp_path):
    done = run_mpi(SCRIPT, nprocs=2, timeout=120, args=[str(tmp_path)])
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT"))
    result = json.loads(line.split(" ", 1)[1])
    assert result["iter"] == 24  # 12 steps per epoch, 2 epochs (compressing from step 3 on)
    assert result["after"] < 0.7 * result["before"], result
    assert result["same_params"], "ranks hold different parameters after PowerSGD training"
    assert result["errors_differ"], "error feedback is per rank: it cannot be identical"
    assert result["resume_max_diff"] == 0.0, result  # memories and iter restored per rank
    assert result["other_world_iter"] == 40, result  # 8 counted before + 32 steps of 8 samples
    assert any("communication hook's per-rank memories (PowerSGD error feedback, warm-start "
               "Q) start fresh (written by 2 rank(s), now 1)" in line
               for line in result["other_world_said"]), result
