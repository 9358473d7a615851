"""``distprop evaluate | predict | export``: use the model of a finished (or stopped) run.

Thin click commands over :mod:`distprop.train.after`. Every problem a user can cause (not a run
directory, no valid checkpoint, a dataset or input of another shape) is one line and exit code 2;
under MPI only rank 0 prints it. :func:`register` adds the commands to the ``distprop`` group.
"""

from __future__ import annotations

import json
import sys

import click

from distprop import fileio
from distprop import info as info_mod
from distprop.logconfig import log_level_option

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _usage(exc: Exception, param: str | None = None) -> click.UsageError:
    if param:
        return click.BadParameter(str(exc), param_hint=param)
    return click.UsageError(str(exc))


def _say(message: str) -> None:
    if info_mod.launched_rank() in (0, None):
        click.echo(message, err=True)


def _open(run_dir):
    from distprop.train import after

    try:
        return after.open_run(run_dir)
    except after.RunError as exc:
        raise _usage(exc, "RUN_DIR") from None


# --- evaluate -----------------------------------------------------------------------------------


def _relaunch(nprocs: int, argv: list[str]) -> int:
    """Run this same command on ``nprocs`` ranks under MPI (the launcher's thread policy)."""
    from distprop import launcher

    command = [sys.executable, "-m", "distprop", "evaluate", *argv]
    try:
        plan = launcher.plan(launcher.LaunchConfig(nprocs=nprocs, command=command))
    except launcher.LaunchError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        return launcher.run(plan)
    except launcher.LaunchError as exc:
        raise click.ClickException(str(exc)) from None


@click.command(context_settings=CONTEXT, epilog="""\b
Examples:
  distprop evaluate runs/a                     # newest valid checkpoint, the run's test split
  distprop evaluate runs/a --checkpoint runs/a/checkpoints/checkpoint-000000040.npz --json
  distprop evaluate runs/a -n 2 --split val
  distprop evaluate runs/a --dataset other.npz  # another file with samples of the same shape
""")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint (.npz) or exported .safetensors [default: newest valid in "
                   "RUN_DIR/checkpoints].")
@click.option("--dataset", default=None,
              help="Evaluate on this dataset (name or path) instead of the run's, split with the "
                   "run's seed and fractions.")
@click.option("--split", type=click.Choice(("test", "val", "train")), default="test",
              show_default=True, help="Which part of the dataset.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Samples per rank per forward pass.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-n", "--nprocs", type=click.IntRange(min=1), default=None,
              help="Evaluate on this many ranks (re-runs itself under MPI).")
def evaluate(run_dir, checkpoint, dataset, split, batch_size, as_json, nprocs):
    """Loss and accuracy of RUN_DIR's model on its own test split (or --split/--dataset).

    The model is rebuilt from the run's configuration and the newest checkpoint that verifies;
    the data are split with the run's seed and fractions, so on the last checkpoint the numbers
    are summary.json's test numbers.
    """
    from distprop.train import after

    run = _open(run_dir)
    if nprocs is not None and nprocs > 1:
        try:  # usage errors once, here, before anything is launched
            after.load_data(run, dataset)
            checkpoint = str(after.find_checkpoint(run, checkpoint, log=_say))
        except after.RunError as exc:
            raise _usage(exc) from None
        argv = [run_dir, "--split", split, "--batch-size", str(batch_size),
                "--checkpoint", checkpoint]
        argv += ["--dataset", dataset] if dataset else []
        argv += ["--json"] if as_json else []
        sys.exit(_relaunch(nprocs, argv))
    error, result = None, None
    world = info_mod.launched_size()
    try:
        if world > 1:  # the ranks agree on the checkpoint: rank 0 picks, the others follow
            from distprop import distributed

            comm = distributed.init()
            picked = None
            if comm.rank == 0 and checkpoint is None:
                try:
                    picked = str(after.find_checkpoint(run, None, log=_say))
                except after.RunError:
                    picked = None  # every rank reports it below
            checkpoint = checkpoint or comm.broadcast_obj(picked, 0)
        after.load_data(run, dataset)
        quiet = world > 1  # rank 0 reported skipped checkpoints when it picked one
        checkpoint = str(after.find_checkpoint(run, checkpoint,
                                               log=(lambda m: None) if quiet else _say))
    except after.RunError as exc:
        error = exc
    if world > 1:
        from distprop.cli import _agreed_error
        from distprop.train.config import ConfigError

        agreed = _agreed_error(None if error is None else ConfigError(str(error)))
        error = None if agreed is None else after.RunError(str(agreed))
    if error is not None:
        raise _usage(error)
    try:
        if world > 1:  # past the agreed checks: anything else ends every rank, not one
            from distprop.distributed import guards

            with guards.abort_on_exception(comm):
                result = after.evaluate(run, checkpoint, dataset, split, batch_size, comm=comm)
        else:
            result = after.evaluate(run, checkpoint, dataset, split, batch_size)
    except after.RunError as exc:
        raise _usage(exc) from None
    if info_mod.launched_rank() not in (0, None):
        return
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    from distprop.train.tasks import describe

    click.echo(f"{result['split']}: {describe(result)} ({result['samples']} samples of "
               f"{result['dataset']}); checkpoint {result['checkpoint']}")


# --- predict ------------------------------------------------------------------------------------


@click.command(context_settings=CONTEXT, epilog="""\b
Examples:
  distprop predict runs/a --input x.npy --output logits.npy
  distprop predict runs/a --input x.npy --output p.npy --probs
""")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--input", "input_path", type=click.Path(dir_okay=False), required=True,
              help="Samples as .npy, shape (N, *sample shape), as the dataset's features.")
@click.option("--output", "output_path", type=click.Path(dir_okay=False), required=True,
              help="Where to write the (N, classes) float32 .npy.")
@click.option("--probs", is_flag=True, help="Softmax probabilities instead of logits.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint (.npz) or exported .safetensors [default: newest valid].")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Samples per forward pass.")
def predict(run_dir, input_path, output_path, probs, checkpoint, batch_size):
    """Logits (or --probs) of RUN_DIR's model for the samples in --input, written to --output.

    Inputs are cast to float32 as in training; the model reshapes them as it did in training.
    """
    from distprop.train import after

    run = _open(run_dir)
    if probs and run.config.task != "classification":
        raise click.BadParameter(f"{run_dir} is a {run.config.task} run: its outputs are not "
                                 "class scores, so there are no probabilities",
                                 param_hint="--probs")
    try:
        x = after.prepare_inputs(run, after.read_inputs(input_path), input_path)
        model, path = after.load_model(run, checkpoint, log=_say)
    except after.RunError as exc:
        raise _usage(exc) from None
    out = after.predict(model, x, probs=probs, batch_size=batch_size)
    try:
        after.write_array(output_path, out, "predictions")
    except fileio.WriteError as exc:
        raise click.ClickException(str(exc)) from None
    kind = "probabilities" if probs else "logits" if run.config.task == "classification" \
        else "predictions"
    click.echo(f"wrote {kind} {out.shape} float32 to "
               f"{output_path} (checkpoint {path})", err=True)


# --- export -------------------------------------------------------------------------------------


@click.command(context_settings=CONTEXT, epilog="""\b
Examples:
  distprop export runs/a -o model.safetensors
  distprop export runs/a --format npz -o weights.npz

\b
In PyTorch (the equivalent torch.nn model; `architecture` in the file's metadata):
  from safetensors.torch import load_file
  torch_model.load_state_dict(load_file("model.safetensors"))
""")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("-o", "--output", "output_path", type=click.Path(dir_okay=False), required=True,
              help="The file to write.")
@click.option("--format", "fmt", type=click.Choice(("safetensors", "npz")), default=None,
              help="File format [default: from the --output suffix].")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint to export [default: newest valid].")
def export(run_dir, output_path, fmt, checkpoint):
    """Write RUN_DIR's model weights (PyTorch keys and dtypes) as safetensors or .npz."""
    from distprop.train import after

    run = _open(run_dir)
    try:
        written, path = after.export(run, output_path, fmt, checkpoint, log=_say)
    except after.RunError as exc:
        raise _usage(exc) from None
    except ImportError as exc:
        raise click.UsageError(str(exc)) from None
    except fileio.WriteError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote the weights of {path} to {written}", err=True)


def register(group: click.Group) -> None:
    """Add ``evaluate``, ``predict`` and ``export`` to the ``distprop`` command group."""
    for command in (evaluate, predict, export):
        group.add_command(log_level_option(command))
