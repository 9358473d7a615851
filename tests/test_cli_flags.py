"""The less common `distprop train` flags, together in one short 2-rank run."""

from __future__ import annotations

import json

import numpy as np
from test_cli import distprop


def test_zero_scale_lr_warmup_accumulation_clipping_early_stopping(tmp_path):
    out = tmp_path / "run"
    done = distprop("train", "-n", 2, "--model", "mlp", "--dataset", "digits", "--epochs", 4,
                    "--optimizer", "adam", "--lr", "1e-3", "--zero", "--scale-lr",
                    "--warmup-epochs", 1, "--grad-accum", 2, "--clip-grad-norm", 1.0,
                    "--early-stopping", 1, "--log-every", 2, "--out", out, timeout=240)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["zero"] and summary["world_size"] == 2
    # 2 ranks x 32 per micro-batch x 2 accumulation = 128 samples per optimizer step
    assert "= 128 per step" in done.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    lrs = [r["lr"] for r in train if r["epoch"] == 1]  # epochs counted from 1, as on the console
    # linear warm-up over the first epoch towards lr x ranks (scaled), then cosine decay
    assert lrs == sorted(lrs) and lrs[0] < lrs[-1] <= 2e-3 + 1e-12
    assert max(r["lr"] for r in train) <= 2e-3 + 1e-12
    assert summary["test"]["accuracy"] > 0.85
    assert np.isfinite(summary["final"]["loss"])


def test_diverging_run_is_one_error_message_not_a_traceback(tmp_path):
    done = distprop("train", "-n", 2, "--model", "mlp", "--dataset", "digits", "--epochs", 1,
                    "--lr", "1e6", "--out", tmp_path / "run", timeout=120)
    assert done.returncode == 1
    assert done.stderr.count("distprop train: error:") == 1
    assert "non-finite gradient" in done.stderr and "Traceback" not in done.stderr
