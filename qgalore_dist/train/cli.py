"""Command lines of ``launch/pretrain.py`` and ``launch/finetune.py`` (one parser, built from :class:`TrainArgs`;
the fine-tuning command adds its own flags and defaults): flags, ``--config FILE`` merging, validation, one-line errors.

Precedence: built-in defaults < ``--config`` JSON file (keys are the flag names with underscores) < flags given
on the command line. Every user mistake — unknown model, missing data, malformed config file, bad flag value,
corrupted or mismatched checkpoint — ends the run with exactly one ``error: ...`` line on stderr and exit code 2,
before anything is written (so existing checkpoints are never touched by a failing run).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn, Sequence

from ..errors import DistributedError, DivergenceError, UsageError, UserError
from .args import FINETUNE_DEFAULTS, OPTIMIZERS, TrainArgs, cli_fields, flag_name, load_config_file, validate
from .loop import train

__all__ = ["OPTIMIZERS", "TrainArgs", "build_parser", "console", "fail", "finetune_console", "main", "parse_args"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <message>`` on stderr, exit 2, no usage dump."""

    def error(self, message: str) -> NoReturn:
        fail(message)


def fail(message: str, status: int = 2) -> NoReturn:
    """Print one ``error:`` line (newlines folded) on stderr and exit with ``status`` (2: a user error).

    In a launched job (torchrun, mpirun, deepspeed) every rank meets the same bad setting, but the job prints the
    line once: rank 0 prints it and leaves a note for the job; the other ranks wait for that note (up to
    :data:`PEER_WAIT_S`, so rank 0 has printed before any of them exits — a launcher stops the remaining workers
    when the first one ends) and exit with the same status silently. Errors met after the process group formed are
    agreed first (:meth:`~qgalore_dist.train.engines.base.Engine._agree`): every rank raises the failing rank's
    message, ``rank K: ...``, so rank 0 prints it. A rank whose error rank 0 did not print (an error before the
    group formed, or no temp directory shared with rank 0) prints its own line, naming its rank.
    """
    line = " ".join(str(message).split())
    rank, key = _job_rank_and_key()
    if rank > 0 and key is not None and _wait_for_rank0(key, line):
        raise SystemExit(status)
    named = rank <= 0 or key is None or line.startswith(f"rank {rank}: ")  # an agreed message names it already
    print(f"error: {line}" if named else f"error: rank {rank}: {line}", file=sys.stderr, flush=True)
    if rank == 0 and key is not None:
        _leave_note(key, line)
    raise SystemExit(status)


PEER_WAIT_S = 5.0  # how long a rank > 0 waits for rank 0's error line before printing its own


def _job_rank_and_key() -> tuple[int, str | None]:
    """This process's rank and an id every process of the same launched job shares (None: not launched)."""
    import os

    from ..parallel.launch_env import discover_launch

    try:
        info = discover_launch()
    except ValueError:
        return -1, None
    if info.world_size == 1:
        return info.rank, None
    env = os.environ
    for var in ("PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid"):  # MPI: unique per job
        if env.get(var):
            return info.rank, f"{var}={env[var]}"
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        # torchrun / the deepspeed launcher: its workers on this host share their parent (the launcher agent), a
        # new launch has a new one — so a note left by an earlier run with the same port is never taken for this
        # run's (torchrun's default run id is "none" and its default port 29500 every time)
        return info.rank, f"{os.getppid()}-{env['MASTER_ADDR']}-{env['MASTER_PORT']}"
    return info.rank, None


def _note_path(key: str):
    import hashlib
    import tempfile
    from pathlib import Path

    return Path(tempfile.gettempdir()) / f"qgalore_dist-error-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _leave_note(key: str, line: str) -> None:
    import os

    path = _note_path(key)
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    try:
        tmp.write_text(line)
        os.replace(tmp, path)
    except OSError:
        pass  # no shared temp directory: the other ranks print their own line after waiting


def _wait_for_rank0(key: str, line: str) -> bool:
    """True once rank 0 has printed this same line (a note younger than this wait, with the same text)."""
    import time

    path = _note_path(key)
    start = time.time()
    while time.time() - start < PEER_WAIT_S:
        try:
            if path.stat().st_mtime >= start - 60 and path.read_text() == line:
                return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


_COMMANDS = {
    "pretrain": ("launch/pretrain.py", "Pre-train a causal LM with Q-GaLore (INT8 weights, INT4 projectors, 8-bit "
                 "low-rank state) or a baseline optimizer.",
                 "Defaults run a short demo: llama_20m on the embedded corpus, 200 steps."),
    "finetune": ("launch/finetune.py", "Fine-tune a pretrained causal LM (--model DIR) on prompt/completion, Alpaca, "
                 "chat or ShareGPT records with Q-GaLore, ProjFactor, GaLore, AdamW, 8-bit AdamW or LoRA (--method "
                 "lora); the loss covers completion / assistant tokens.",
                 "Example: qgalore-finetune --model ./my-llama --data train.jsonl --max-steps 500 --save-dir runs/ft"),
}


def build_parser(task: str = "pretrain") -> argparse.ArgumentParser:
    """The parser of ``task``'s command; every option defaults to *absent* so explicit flags can be told apart
    from defaults."""
    prog, description, epilog = _COMMANDS[task]
    p = _Parser(prog=prog, argument_default=argparse.SUPPRESS, description=description, epilog=epilog)
    p.add_argument("--config", metavar="FILE", help="JSON object of settings (flag names with underscores); "
                   "flags given on the command line override it")
    defaults = FINETUNE_DEFAULTS if task == "finetune" else {}
    for f in cli_fields(task):
        md = f.metadata
        default = defaults.get(f.name, f.default)
        help_text = md["help"] if md["flag"] or default is None else f"{md['help']} (default: {default})"
        names = (flag_name(f.name), *md["aliases"])
        if md["flag"]:
            p.add_argument(*names, dest=f.name, action="store_true", help=help_text)
        else:
            p.add_argument(*names, dest=f.name, type=md["type"], choices=md["choices"],
                           metavar=md["metavar"], help=help_text)
    return p


def parse_args(argv: Sequence[str] | None = None, task: str = "pretrain") -> TrainArgs:
    """Defaults (the command's) < ``--config`` file < command line; validated. Raises
    :class:`~qgalore_dist.errors.UsageError` (or exits 2 for a syntax error such as an unknown flag or a non-number
    where a number is expected)."""
    ns = vars(build_parser(task).parse_args(argv))
    merged: dict[str, Any] = dict(FINETUNE_DEFAULTS) if task == "finetune" else {}
    config_path = ns.pop("config", None)
    if config_path is not None:
        merged.update(load_config_file(config_path, task))
    merged.update(ns)
    if merged.get("method") == "lora" and "optimizer" not in merged:
        merged["optimizer"] = "adamw"  # LoRA's adapters train with AdamW unless adamw8bit is asked for
    if task == "finetune" and "epochs" in merged and merged["epochs"] is not None and "max_steps" in merged:
        raise UsageError("give --epochs or --max-steps, not both")
    args = TrainArgs(**merged, task=task)
    validate(args)
    return args


def main(argv: Sequence[str] | None = None, task: str = "pretrain"):
    """Entry point of ``launch/pretrain.py`` (``task="finetune"``: ``launch/finetune.py``): parse, train; returns
    the :class:`~.loop.TrainResult`.

    User errors exit with status 2 after one ``error:`` line; genuine bugs keep their traceback.
    """
    try:
        args = parse_args(argv, task)
        return train(args)
    except UserError as exc:
        fail(str(exc))
    except DistributedError as exc:
        fail(str(exc), status=1)
    except DivergenceError as exc:
        fail(str(exc), status=3)


def console(argv: Sequence[str] | None = None) -> int:
    """The ``qgalore-pretrain`` console script: :func:`main`, exit status 0 after a run (a console-script wrapper
    passes the return value to ``sys.exit``, which would print the :class:`~.loop.TrainResult` and exit 1)."""
    main(argv)
    return 0


def finetune_console(argv: Sequence[str] | None = None) -> int:
    """The ``qgalore-finetune`` console script (see :func:`console`)."""
    main(argv, task="finetune")
    return 0


if __name__ == "__main__":  # python -m qgalore_dist.train.cli
    sys.exit(console())
