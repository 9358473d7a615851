"""Per-rank random streams: identical initial replicas, different dropout masks on each rank,
reproducible, saved per rank in checkpoints and continued exactly on resume."""

from __future__ import annotations

import json

import numpy as np

from distprop import backend

from helpers import run_mpi


def test_rank_stream_is_the_spawned_child_for_any_world_size():
    for world in (1, 2, 5):
        for rank in range(world):
            backend.seed_rank(7, rank)
            want = np.random.default_rng(np.random.SeedSequence(7).spawn(world)[rank])
            assert np.array_equal(backend.generator().random(6), want.random(6))
    backend.seed_rank(7, 1, 40)  # a resume on another world size: a further, new stream
    other = backend.generator().random(6)
    backend.seed_rank(7, 1)
    assert not np.array_equal(other, backend.generator().random(6))


SCRIPT = r"""
import hashlib, json, sys
import numpy as np
import distprop as dp
from distprop import backend
from distprop.data import TensorDataset
from distprop.distributed.comm import SingleProcessCommunicator
from distprop.train import callbacks as cbs
from distprop.train.trainer import Trainer

out = sys.argv[1]
comm = dp.distributed.init()
rng = np.random.default_rng(0)
X = rng.standard_normal((128, 12)).astype(np.float32)
Y = (X[:, :3].sum(1) > 0).astype(np.int64)
data = TensorDataset(X, Y)

masks = []
_original = backend.bernoulli_mask
def recording(shape, keep, dtype, dev):
    mask = _original(shape, keep, dtype, dev)
    masks.append(mask.copy())
    return mask
backend.bernoulli_mask = recording

def run(directory, resume=None, comm_=None):
    masks.clear()
    dp.manual_seed(0)
    model = dp.nn.Sequential(dp.nn.Linear(12, 32), dp.nn.ReLU(), dp.nn.Dropout(0.5),
                             dp.nn.Linear(32, 2))
    init = np.concatenate([p.numpy().ravel() for p in model.parameters()])
    opt = dp.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ck = cbs.Checkpointer(f"{out}/{directory}", every_steps=4, keep=None)
    trainer = Trainer(model, dp.nn.CrossEntropyLoss(), opt, callbacks=[ck], progress=False,
                      comm=comm_)
    trainer.fit(data, epochs=2, batch_size=8, resume=resume)
    flat = np.concatenate([p.numpy().ravel() for p in model.parameters()])
    digests = [hashlib.sha1(m.tobytes()).hexdigest() for m in masks]
    return init, flat, digests, ck, list(masks)

init, flat, digests, ck, first_masks = run("a")
_, flat2, digests2, _, _ = run("b")
_, resumed, digests3, _, _ = run("c", resume=ck.manager.path_for(8))
world = comm.size
want_first = np.random.default_rng(np.random.SeedSequence(0).spawn(world)[comm.rank]).random(
    size=first_masks[0].shape, dtype=np.float32) < 0.5
inits = comm.allgather_obj(init.tolist())
firsts = comm.allgather_obj(digests[0])
finals = comm.allgather_obj(flat.tolist())
result = {
    "same_init": all(np.array_equal(np.array(i), init) for i in inits),
    "masks_differ": len(set(firsts)) == world,
    "first_is_spawned_child": bool(np.array_equal(first_masks[0] > 0, want_first)),
    "reproducible": digests == digests2 and np.array_equal(flat, flat2),
    "resumed_masks_continue": digests3 == digests[-len(digests3):] and len(digests3) == 8,
    "resume_max_diff": float(np.abs(resumed - flat).max()),
    "replicas_equal": all(np.array_equal(np.array(f), flat) for f in finals),
}
if comm.rank == 0:  # the 2-rank checkpoint resumed on 1 rank: fresh streams from (seed, rank, step)
    import logging
    from distprop.train import checkpoint as ckpt
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("distprop").addHandler(handler)
    run("d", resume=ck.manager.path_for(8), comm_=SingleProcessCommunicator())
    result["said"] = said
    state = ckpt.load(ck.manager.path_for(8))
    fresh = np.random.default_rng(np.random.SeedSequence(0, spawn_key=(0, 8))).random(
        size=first_masks[0].shape, dtype=np.float32) < 0.5
    result["other_world_fresh_stream"] = bool(np.array_equal(masks[0] > 0, fresh))
    result["saved_per_rank"] = len(state["ranks"]) == world and \
        state["ranks"][0]["rng"] != state["ranks"][1]["rng"]
    print("RESULT", json.dumps(result))
"""


def test_two_ranks_draw_their_own_masks_reproducibly_and_resume_them(tmp_path):
    done = run_mpi(SCRIPT, nprocs=2, timeout=120, args=[str(tmp_path)])
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT"))
    r = json.loads(line.split(" ", 1)[1])
    assert r["same_init"], r  # parameters are initialised identically (one seed)
    assert r["masks_differ"], r  # ... but each rank draws its own dropout masks
    assert r["first_is_spawned_child"], r  # from SeedSequence(seed).spawn(world)[rank]
    assert r["reproducible"], r
    assert r["resumed_masks_continue"], r  # the streams come back from the checkpoint
    assert r["resume_max_diff"] == 0.0, r  # exactly the uninterrupted run's parameters
    assert r["replicas_equal"], r
    assert r["saved_per_rank"], r
    assert r["other_world_fresh_stream"], r
    assert any(line.startswith("resuming on 1 rank(s)") and line.endswith(
        "each rank's random stream (dropout) starts afresh from (seed, rank, step 8)")
        for line in r["said"]), r["said"]
