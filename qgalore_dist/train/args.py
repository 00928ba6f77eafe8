"""Every setting of a training run (:class:`TrainArgs`), the ``--config`` file reader and the validation that
needs no model or data.

Library modules (the loop, the engines, the optimizer factory) read settings from here; only
:mod:`qgalore_dist.train.cli` parses command lines. Errors are :class:`qgalore_dist.errors.UsageError`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

from ..data.sft import FORMATS, TRUNCATION
from ..errors import UsageError
from ..nn.convert import DEFAULT_TARGET_MODULES

__all__ = ["COMM_MODES", "DTYPES", "ENGINES", "FINETUNE_DEFAULTS", "INT8_OPTIMIZERS", "LOWRANK_OPTIMIZERS", "METHODS",
           "OPTIMIZERS", "TASKS", "TrainArgs", "cli_fields", "flag_name", "load_config_file", "validate"]


ENGINES = ("local", "ddp", "fsdp", "deepspeed")  # qgalore_dist.train.engines.ENGINES maps them to classes
COMM_MODES = ("lowrank", "full")
OPTIMIZERS = ("qgalore", "projfactor", "galore", "adamw", "adamw8bit")
# optimizers whose targeted matrices hold INT8 weights and go through the projected (low-rank) rules
INT8_OPTIMIZERS = ("qgalore", "projfactor")
LOWRANK_OPTIMIZERS = ("qgalore", "projfactor", "galore")
DTYPES = ("float32", "bfloat16", "float64")
TASKS = ("pretrain", "finetune")
METHODS = ("full", "lora")


def _opt(default: Any, help: str, *, type: Callable[[str], Any] | None = None, aliases: tuple[str, ...] = (),
         choices: Sequence[str] | None = None, flag: bool = False, metavar: str | None = None,
         finetune: bool = False) -> Any:
    """A :class:`TrainArgs` field that is also a command-line flag (``metadata`` drives the parser); ``aliases``
    are extra option strings (launchers' spellings such as ``--deepspeed_config``); ``finetune``: a flag of the
    fine-tuning command only."""
    return field(default=default, metadata={"help": help, "type": type, "choices": choices, "flag": flag,
                                            "metavar": metavar, "aliases": aliases, "finetune": finetune,
                                            "cli": True})


@dataclass
class TrainArgs:
    """Every setting of a training run; one field per flag (``--update-proj-gap`` is ``update_proj_gap``)."""

    # what to train on what
    engine: str = _opt("local", "local (one process, one device, layer-wise updates), ddp (replicated model, "
                       "sharded optimizer), fsdp (torch FSDP2), deepspeed (ZeRO 1/2/3; implied by --ds_config)",
                       type=str, choices=ENGINES)
    model: str = _opt("llama_20m", "shipped config name (llama_tiny, llama_20m ... llama_7b), a config JSON path, "
                      "or a local model directory", type=str)
    tokenizer: str | None = _opt(None, "tokenizer directory or tokenizer.json (default: the model directory's "
                                 "tokenizer, else a byte-level BPE of 8192 tokens trained once on the embedded "
                                 "corpus)", type=str)
    data: str | None = _opt(None, "text/JSONL file, folder, or token shards (.bin + sidecar, .safetensors); "
                            "default: the embedded Shakespeare corpus", type=str)
    optimizer: str = _opt("qgalore", "qgalore (INT8 weights, low-rank AdamW), projfactor (INT8 weights, VLoRP's "
                          "ProjFactor), galore (float reference), adamw (torch), adamw8bit (dense AdamW, 8-bit "
                          "state)", type=str, choices=OPTIMIZERS)
    # Q-GaLore / GaLore
    rank: int = _opt(128, "projection rank (qgalore/galore)", type=int)
    update_proj_gap: int = _opt(200, "initial steps between subspace refreshes (qgalore/galore)", type=int)
    scale: float = _opt(0.25, "scale of the low-rank update (qgalore/galore)", type=float)
    projection: str = _opt("svd", "subspace from exact SVD, randomized SVD, or a seeded random Gaussian / "
                           "Rademacher basis regenerated every --update-proj-gap steps", type=str,
                           choices=("svd", "rsvd", "gaussian", "rademacher"))
    granularity: float = _opt(1.0, "VLoRP granularity c: cut the projected dimension into c pieces (a power of "
                              "two; 1 = GaLore; memory budget M = c·rank)", type=float)
    no_gate: bool = _opt(False, "refresh at a fixed interval instead of lengthening it as subspaces converge",
                         flag=True)
    proj_gap_cap: int | None = _opt(None, "upper bound of the adaptive refresh interval (default: "
                                    "max(5000, --update-proj-gap))", type=int)
    target_modules: str = _opt(",".join(DEFAULT_TARGET_MODULES), "comma list of projected linear layers "
                               "(last name component or full module name)", type=str)
    # AdamW and schedule
    lr: float = _opt(0.01, "peak learning rate", type=float)
    weight_decay: float = _opt(0.0, "decoupled weight decay", type=float)
    beta1: float = _opt(0.9, "Adam beta1", type=float)
    beta2: float = _opt(0.999, "Adam beta2", type=float)
    grad_clip: float = _opt(1.0, "max global gradient norm, 0 = off (qgalore/galore: norm of the dense and "
                            "low-rank gradients the optimizer consumes)", type=float)
    warmup_steps: int = _opt(20, "linear warm-up steps", type=int)
    lr_schedule: str = _opt("cosine", "decay after warm-up", type=str, choices=("cosine", "linear", "constant"))
    min_lr_ratio: float = _opt(0.1, "final lr as a fraction of --lr (cosine/linear)", type=float)
    # batch and length
    max_steps: int = _opt(200, "optimizer steps to train (total, counting resumed ones)", type=int)
    batch_size: int = _opt(8, "micro-batch size (sequences per forward/backward)", type=int)
    grad_accum: int = _opt(1, "micro-batches per optimizer step", type=int)
    seq_len: int = _opt(128, "tokens per sequence", type=int)
    seed: int = _opt(0, "seed of model init, data order and stochastic rounding", type=int)
    # evaluation, checkpoints, telemetry
    eval_every: int = _opt(50, "evaluate on the held-out split every N steps (0: only at the end)", type=int)
    eval_batches: int = _opt(8, "held-out batches per evaluation: global batches of --batch-size × world size "
                             "sequences, each rank evaluating its --batch-size slice", type=int)
    save_dir: str | None = _opt(None, "checkpoint root; checkpoints go to <save-dir>/step_NNNNNN/", type=str)
    save_every: int = _opt(0, "checkpoint every N steps (0: only at the end); needs --save-dir", type=int)
    resume: str | None = _opt(None, "a checkpoint directory to resume from, a save root (its newest intact "
                              "checkpoint), or 'auto' (the same in --save-dir; starts fresh when there is none); a "
                              "damaged newest checkpoint of a root is skipped with a warning; settings come from "
                              "this command line / --config, not from the checkpoint, so pass the original ones",
                              type=str)
    keep_last: int = _opt(0, "keep only the newest K checkpoints in --save-dir, deleting older ones after each "
                          "save (0: keep all)", type=int, metavar="K")
    metrics_jsonl: str | None = _opt(None, "write one JSON object per step / evaluation to this file", type=str,
                                     metavar="PATH")
    max_skipped_steps: int = _opt(3, "stop the run (exit status 3) after this many steps in a row skipped for a "
                                  "non-finite loss or gradient; the last checkpoint is kept", type=int, metavar="K")
    overwrite: bool = _opt(False, "let a fresh run replace an existing --metrics-jsonl file (a resumed run appends "
                           "to it instead)", flag=True)
    dry_run: bool = _opt(False, "check every setting, file and path (data read and tokenized, model config "
                         "resolved, checkpoint verified), print what would run, and exit without training",
                         flag=True)
    log_every: int = _opt(10, "plain log line every N steps (when stderr is not a terminal)", type=int)
    export: str | None = _opt(None, "after training, write a plain dequantised transformers model + tokenizer "
                              "here (sharded safetensors, at most 2 GB each): a new or empty directory or an "
                              "earlier export, never a checkpoint directory", type=str, metavar="DIR")
    export_dtype: str = _opt("bfloat16", "dtype of the --export weights", type=str,
                             choices=("bfloat16", "float16", "float32", "float64"))
    # hardware
    device: str | None = _opt(None, "cpu, cuda, cuda:N (default: cuda when available, else cpu)", type=str)
    dtype: str | None = _opt(None, "compute dtype (default: float32 on CPU, bfloat16 on CUDA)", type=str,
                             choices=DTYPES)
    dense_dtype: str | None = _opt(None, "--optimizer qgalore/projfactor, --engine local: storage dtype of the dense "
                                   "parameters "
                                   "(embeddings, norms, lm_head, biases); default the compute dtype. bfloat16 under a "
                                   "float32 compute dtype keeps them in bf16 and upcasts them where they are used "
                                   "(half their memory; updates rounded stochastically)", type=str, choices=DTYPES)
    activation_checkpointing: bool = _opt(False, "recompute each decoder layer in backward (less activation "
                                          "memory, ~30%% more compute)", flag=True)
    # distributed engines (ddp, fsdp, deepspeed)
    comm_mode: str = _opt("lowrank", "projected-matrix traffic: lowrank (replicated INT4 projectors, low-rank "
                          "gradients to the owner, low-rank update broadcast) or full (full gradient to the owner, "
                          "INT8 codes broadcast)", type=str, choices=COMM_MODES)
    full_reduce: str = _opt("boundary", "--comm-mode full under --grad-accum: boundary (keep the full local "
                            "gradient of every projected matrix, reduce once per step: memory) or micro_batch "
                            "(reduce each micro-batch's gradient to its owner in backward: grad-accum times the "
                            "gradient bytes, ~1/N of the gradient memory)", type=str,
                            choices=("boundary", "micro_batch"))
    update_dtype: str = _opt("auto", "--engine ddp --comm-mode lowrank: dtype the owners broadcast the normalised "
                             "low-rank update in: auto (its own: float32, float64 in float64 runs) or bfloat16 "
                             "(half the float32 bytes; every rank, owner included, applies the same rounded update)",
                             type=str, choices=("auto", "bfloat16"))
    fsdp_grad_sync: str = _opt("micro_batch", "--engine fsdp under --grad-accum: micro_batch (reduce-scatter every "
                               "micro-batch's gradients: grad-accum times the gradient bytes, 1/N of the gradient "
                               "memory) or boundary (set_requires_gradient_sync(False) before the last micro-batch: "
                               "each rank keeps the unsharded gradient of every parameter, the whole model's, until "
                               "the step)", type=str, choices=("micro_batch", "boundary"))
    strict_replicas: bool = _opt(False, "abort when a replica's INT8 weights differ from the owner's instead of "
                                 "re-broadcasting them with a warning", flag=True)
    replica_check_every: int = _opt(50, "checksum the replicated weights every N steps (0: only at start-up)",
                                    type=int)
    dist_timeout: float = _opt(300.0, "seconds a rank waits in a collective before giving up (a dead peer "
                               "ends the job with an error instead of a hang)", type=float)
    ds_config: str | None = _opt(None, "DeepSpeed config JSON (with a \"qgalore\" block), or the name of a shipped "
                                 "one: qgalore (ZeRO-2), qgalore_zero1, qgalore_zero3; selects --engine deepspeed",
                                 type=str, metavar="FILE",
                                 aliases=("--ds_config", "--deepspeed_config", "--deepspeed-config"))
    local_rank: int | None = _opt(None, "set by launchers (deepspeed, torch.distributed.launch); the rank is "
                                  "read from the environment", type=int, aliases=("--local_rank",))
    # fine-tuning (qgalore-finetune / launch/finetune.py only; the pre-training command has none of these flags)
    format: str = _opt("auto", "fine-tuning data format: prompt_completion ({prompt, completion}), alpaca "
                       "({instruction, input, output}), chat ({messages: [{role, content}]}), sharegpt "
                       "({conversations: [{from, value}]}), or auto (detected from the first record)", type=str,
                       choices=FORMATS, finetune=True)
    val_data: str | None = _opt(None, "held-out fine-tuning data (same formats); default: a seeded --val-fraction "
                                "of --data", type=str, metavar="PATH", finetune=True)
    val_fraction: float = _opt(0.05, "fraction of --data held out for validation when --val-data is not given",
                               type=float, finetune=True)
    train_on_prompt: bool = _opt(False, "compute the loss on prompt / user / system tokens too (default: only on "
                                 "completion / assistant tokens)", flag=True, finetune=True)
    truncation: str = _opt("truncate", "examples longer than --seq-len tokens: truncate (keep the first --seq-len "
                           "tokens; dropped if no completion token is left) or skip; both counted in the log",
                           type=str, choices=TRUNCATION, finetune=True)
    no_packing: bool = _opt(False, "one example per sequence, right-padded (default: pack several examples per "
                            "sequence, each attending only to itself)", flag=True, finetune=True)
    chat_template: str | None = _opt(None, "jinja chat template file for chat / sharegpt / alpaca data (default: "
                                     "the tokenizer's own, else a shipped ChatML-style template)", type=str,
                                     metavar="FILE", finetune=True)
    epochs: float | None = _opt(None, "train for this many passes over --data (sets --max-steps from the packed "
                                "size of the data; give one of the two)", type=float, finetune=True)
    eval_generate: int = _opt(0, "at each evaluation, greedily generate answers for the first N held-out prompts "
                              "and report exact match of the final answer (after '####', or the record's "
                              "'answer' field)", type=int, metavar="N", finetune=True)
    max_new_tokens: int = _opt(64, "--eval-generate: tokens generated per prompt at most", type=int,
                               finetune=True)
    method: str = _opt("full", "full (train the model with --optimizer) or lora (peft adapters on "
                       "--target-modules, AdamW on the adapters, the base frozen in --dtype)", type=str,
                       choices=METHODS, finetune=True)
    lora_r: int = _opt(8, "--method lora: adapter rank", type=int, finetune=True)
    lora_alpha: float | None = _opt(None, "--method lora: scaling alpha (default 2 × --lora-r)", type=float,
                                    finetune=True)
    lora_dropout: float = _opt(0.0, "--method lora: dropout on the adapter input", type=float, finetune=True)
    # set by the entry point, not a flag: which command this run is (the fine-tuning flags apply to "finetune")
    task: str = field(default="pretrain", metadata={"cli": False})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def target_module_list(self) -> list[str]:
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]


_FIELDS = {f.name: f for f in fields(TrainArgs)}

# the fine-tuning command's own defaults (a pretrained model adapts with a far smaller step than pre-training takes,
# and instruction examples are longer than the pre-training demo's windows); --config and flags override them
FINETUNE_DEFAULTS: dict[str, Any] = {"lr": 1e-4, "warmup_steps": 10, "seq_len": 512, "eval_every": 50,
                                     "update_proj_gap": 100, "grad_clip": 1.0}


def cli_fields(task: str = "pretrain") -> list[dataclasses.Field]:
    """The :class:`TrainArgs` fields that are flags of ``task``'s command (pre-training has no fine-tuning flags)."""
    return [f for f in fields(TrainArgs) if f.metadata.get("cli", True)
            and (task == "finetune" or not f.metadata.get("finetune"))]


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _coerce_file_value(name: str, value: Any, source: str) -> Any:
    """Check a config-file value against the field's type (JSON types, no string parsing)."""
    f = _FIELDS[name]
    md = f.metadata
    where = f"config file {source}: {name}"
    if md["flag"]:
        if not isinstance(value, bool):
            raise UsageError(f"{where} must be true or false, got {value!r}")
        return value
    if value is None:
        if f.default is not None:
            raise UsageError(f"{where} must not be null")
        return None
    kind = md["type"]
    if name == "target_modules" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = ",".join(value)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UsageError(f"{where} must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{where} must be a number, got {value!r}")
        value = float(value)
    if kind is str and not isinstance(value, str):
        raise UsageError(f"{where} must be a string, got {value!r}")
    if md["choices"] and value not in md["choices"]:
        raise UsageError(f"{where}={value!r} is invalid: allowed: {', '.join(md['choices'])}")
    return value


def _read_json(p: Path, what: str) -> Any:
    """The JSON value in file ``p`` (``what`` names it in the one-line error: unreadable, not UTF-8, malformed, or
    nested too deeply for the parser)."""
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} {p}: not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise UsageError(f"{what} {p}: cannot read it ({exc.strerror or exc})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} {p}: malformed JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from exc
    except RecursionError as exc:
        raise UsageError(f"{what} {p}: JSON nested too deeply to read") from exc


def load_config_file(path: str, task: str = "pretrain") -> dict[str, Any]:
    """Read ``--config``: a JSON object whose keys are :class:`TrainArgs` fields (flags of ``task``'s command)."""
    p = Path(path).expanduser()
    data = _read_json(p, "config file")
    if not isinstance(data, dict):
        raise UsageError(f"config file {p}: expected a JSON object, got a {type(data).__name__}")
    known = {f.name for f in cli_fields(task)}
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        hint = " (use underscores, e.g. max_steps)" if any("-" in k for k in unknown) else ""
        if task == "pretrain" and any(_FIELDS[k].metadata.get("finetune") for k in unknown if k in _FIELDS):
            hint = " (fine-tuning settings: use qgalore-finetune / launch/finetune.py)"
        raise UsageError(f"config file {p}: unknown setting(s) {', '.join(unknown)}{hint}")
    return {k: _coerce_file_value(k, v, str(p)) for k, v in data.items()}


# flags the engine (and, under ddp, the optimizer) named first never reads: a non-default value would do nothing
_NO_COMM = ("comm_mode", "strict_replicas", "replica_check_every", "dist_timeout")
_REPLICAS = ("strict_replicas", "replica_check_every")
_UNUSED_DIST_FLAGS: dict[str, tuple[tuple[str, ...], str]] = {
    "local": (_NO_COMM, "--engine local runs one process: nothing is communicated or replicated"),
    "fsdp": (("comm_mode", *_REPLICAS), "--engine fsdp shards the weights by rows (FSDP2 all-gathers them, "
                                         "reduce-scatters the gradients): it has no comm modes and no replicas"),
    "ddp_dense": (("comm_mode", "full_reduce", "update_dtype", *_REPLICAS),
                  "under --engine ddp the dense baselines run torch DistributedDataParallel (one all-reduce of the "
                  "gradients): comm modes and replica checks belong to the Q-GaLore/GaLore sharded optimizer"),
}


def _refuse_unused_dist_flags(args: TrainArgs) -> None:
    """A distributed flag set to a non-default value that the chosen engine / optimizer does not use is an error
    (it would silently do nothing). Defaults cannot be told from explicit values here, and need not be."""
    key = args.engine
    if key == "ddp" and args.optimizer not in LOWRANK_OPTIMIZERS:
        key = "ddp_dense"
    names, why = _UNUSED_DIST_FLAGS.get(key, ((), ""))
    for name in names:
        value = getattr(args, name)
        if value != _FIELDS[name].default:
            shown = flag_name(name) if _FIELDS[name].metadata["flag"] else f"{flag_name(name)} {value}"
            raise UsageError(f"{shown} does nothing with --engine {args.engine} --optimizer {args.optimizer}: "
                             f"{why}; drop it")


def shipped_ds_config(name: str) -> str | None:
    """The ds_config shipped as package data in ``qgalore_dist/ds_configs/`` that a bare name such as ``qgalore``
    or ``qgalore_zero3.json`` stands for (its path), else None; anything with a directory part is a path, never
    reinterpreted."""
    if not name or Path(name).name != name:
        return None
    path = resources.files("qgalore_dist").joinpath("ds_configs").joinpath(
        name if name.endswith(".json") else f"{name}.json")
    return str(path) if path.is_file() else None


_SEED_MAX = 2**63 - 1  # torch generators take 64-bit seeds; data order multiplies the seed in int64 arithmetic


def _check_finite(args: TrainArgs) -> None:
    """Every number of a float setting is finite (``--lr inf`` would train to NaN and exit 0)."""
    for f in fields(TrainArgs):
        value = getattr(args, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{flag_name(f.name)} must be a finite number, got {value}")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(flag: str, value: str, *, file: bool) -> None:
    """``value`` can be created or written: the path (or, for one not there yet, its nearest existing ancestor)
    is a directory we may write into; a file target must not be a directory."""
    path = Path(value).expanduser()
    if file and path.is_dir():
        raise UsageError(f"{flag} {value}: is a directory")
    if file and path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {value}: file is not writable")
    parent = _nearest_existing(path if not file else path.parent)
    if not parent.is_dir():
        raise UsageError(f"{flag} {value}: {parent} is not a directory")
    # a real probe, not os.access: root passes every access check, and some file systems (/proc, read-only
    # mounts) refuse files whatever the mode bits say; the probe file is removed at once
    try:
        fd, probe = tempfile.mkstemp(prefix=".qgalore-write-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"{flag} {value}: cannot write into {parent} ({exc.strerror or exc})") from exc


# settings naming a file or folder: an empty string would silently mean the current directory
_PATH_SETTINGS = ("model", "tokenizer", "data", "save_dir", "resume", "metrics_jsonl", "export", "ds_config",
                  "val_data", "chat_template")


def _check_nonempty_paths(args: TrainArgs) -> None:
    for name in _PATH_SETTINGS:
        value = getattr(args, name)
        if isinstance(value, str) and not value.strip():
            raise UsageError(f"{flag_name(name)} is empty: give a path" + (
                " or a shipped config name" if name == "model" else ""))


def validate(args: TrainArgs) -> None:
    """Range and combination checks that need no model or data (those fail later, still before any write)."""
    _check_finite(args)
    if args.engine not in ENGINES:
        raise UsageError(f"--engine {args.engine!r} is unknown; allowed: {', '.join(ENGINES)}")
    if args.ds_config is not None and args.engine not in ("local", "deepspeed"):
        raise UsageError(f"--ds_config selects the deepspeed engine; it cannot be combined with --engine "
                         f"{args.engine}")
    _check_nonempty_paths(args)
    if args.ds_config is not None:
        args.engine = "deepspeed"
        if not Path(args.ds_config).expanduser().is_file():
            shipped = shipped_ds_config(args.ds_config)
            if shipped is None:
                raise UsageError(f"--ds_config {args.ds_config}: file does not exist")
            args.ds_config = shipped
        _read_json(Path(args.ds_config).expanduser(), "--ds_config")  # readable JSON (the engine checks the rest)
    if args.full_reduce != "boundary" and (args.engine != "ddp" or args.comm_mode != "full"):
        raise UsageError(f"--full-reduce {args.full_reduce} applies to --engine ddp --comm-mode full only")
    if args.update_dtype != "auto" and (args.engine != "ddp" or args.comm_mode != "lowrank"):
        raise UsageError(f"--update-dtype {args.update_dtype} applies to --engine ddp --comm-mode lowrank only")
    if args.fsdp_grad_sync != "micro_batch" and args.engine != "fsdp":
        raise UsageError(f"--fsdp-grad-sync {args.fsdp_grad_sync} applies to --engine fsdp only")
    if args.dense_dtype is not None and (args.optimizer not in INT8_OPTIMIZERS or args.engine != "local"):
        raise UsageError(f"--dense-dtype {args.dense_dtype} applies to --optimizer qgalore or projfactor with "
                         "--engine local only")
    _refuse_unused_dist_flags(args)
    if args.replica_check_every < 0:
        raise UsageError(f"--replica-check-every must be >= 0, got {args.replica_check_every}")
    if not args.dist_timeout > 0:
        raise UsageError(f"--dist-timeout must be > 0 seconds, got {args.dist_timeout}")
    for name in ("rank", "update_proj_gap", "max_steps", "batch_size", "grad_accum", "seq_len", "eval_batches",
                 "log_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"{flag_name(name)} must be a positive integer, got {getattr(args, name)}")
    for name in ("warmup_steps", "eval_every", "save_every", "keep_last"):
        if getattr(args, name) < 0:
            raise UsageError(f"{flag_name(name)} must be >= 0, got {getattr(args, name)}")
    if not 0 <= args.seed <= _SEED_MAX:
        raise UsageError(f"--seed must lie in [0, 2**63 - 1], got {args.seed}")
    if args.max_skipped_steps < 1:
        raise UsageError(f"--max-skipped-steps must be a positive integer, got {args.max_skipped_steps}")
    if not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise UsageError(f"{flag_name(name)} must lie in [0, 1), got {getattr(args, name)}")
    if not args.weight_decay >= 0:
        raise UsageError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if not args.grad_clip >= 0:
        raise UsageError(f"--grad-clip must be >= 0 (0 = off), got {args.grad_clip}")
    if not 0.0 <= args.min_lr_ratio <= 1.0:
        raise UsageError(f"--min-lr-ratio must lie in [0, 1], got {args.min_lr_ratio}")
    if args.proj_gap_cap is not None and args.proj_gap_cap < args.update_proj_gap:
        raise UsageError(f"--proj-gap-cap ({args.proj_gap_cap}) must be >= --update-proj-gap "
                         f"({args.update_proj_gap})")
    if not args.target_module_list:
        raise UsageError("--target-modules is empty")
    if args.save_every and not args.save_dir:
        raise UsageError("--save-every needs --save-dir")
    if args.keep_last and not args.save_dir:
        raise UsageError("--keep-last needs --save-dir")
    if args.resume == "auto" and not args.save_dir:
        raise UsageError("--resume auto needs --save-dir (the latest checkpoint there is resumed)")
    named_corpus = args.data is None or args.data in ("default", "shakespeare")
    if not named_corpus and not Path(args.data).expanduser().exists():
        raise UsageError(f"--data {args.data}: path does not exist")
    if args.tokenizer is not None and not Path(args.tokenizer).expanduser().exists():
        raise UsageError(f"--tokenizer {args.tokenizer}: path does not exist")
    for name in ("save_dir", "export"):
        value = getattr(args, name)
        if value is not None and Path(value).expanduser().exists() and not Path(value).expanduser().is_dir():
            raise UsageError(f"{flag_name(name)} {value}: exists and is not a directory")
    if args.export is None and args.export_dtype != "bfloat16":
        raise UsageError(f"--export-dtype {args.export_dtype} needs --export")
    if args.export is not None:
        from ..checkpoint.export import check_export_target

        check_export_target(args.export, save_dir=args.save_dir)
    if args.metrics_jsonl is not None:
        _check_writable("--metrics-jsonl", args.metrics_jsonl, file=True)
        existing = Path(args.metrics_jsonl).expanduser()
        if existing.is_file() and existing.stat().st_size > 0 and args.resume is None and not args.overwrite:
            raise UsageError(f"--metrics-jsonl {args.metrics_jsonl} already exists: a fresh run would replace it; "
                             "pass --overwrite, --resume to continue that run, or another path")
    for name in ("save_dir", "export"):
        if getattr(args, name) is not None:
            _check_writable(flag_name(name), getattr(args, name), file=False)
    if args.resume not in (None, "auto") and not Path(args.resume).expanduser().is_dir():
        raise UsageError(f"--resume {args.resume}: checkpoint directory does not exist")
    if args.task == "finetune":
        _validate_finetune(args)


def _validate_finetune(args: TrainArgs) -> None:
    """The fine-tuning flags' ranges and combinations (the data itself is validated when it is read)."""
    if args.data is None or args.data in ("default", "shakespeare"):
        raise UsageError("fine-tuning needs --data FILE|DIR: JSON / JSONL records in one of the --format layouts")
    if args.val_data is not None and not Path(args.val_data).expanduser().exists():
        raise UsageError(f"--val-data {args.val_data}: path does not exist")
    if args.chat_template is not None and not Path(args.chat_template).expanduser().is_file():
        raise UsageError(f"--chat-template {args.chat_template}: file does not exist")
    if not 0.0 < args.val_fraction < 1.0:
        raise UsageError(f"--val-fraction must lie in (0, 1), got {args.val_fraction}")
    if args.epochs is not None and not (args.epochs > 0 and args.epochs < 1e6):
        raise UsageError(f"--epochs must be a positive number, got {args.epochs}")
    for name in ("eval_generate",):
        if getattr(args, name) < 0:
            raise UsageError(f"{flag_name(name)} must be >= 0, got {getattr(args, name)}")
    for name in ("max_new_tokens", "lora_r"):
        if getattr(args, name) < 1:
            raise UsageError(f"{flag_name(name)} must be a positive integer, got {getattr(args, name)}")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise UsageError(f"--lora-dropout must lie in [0, 1), got {args.lora_dropout}")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        raise UsageError(f"--lora-alpha must be > 0, got {args.lora_alpha}")
    if args.method == "lora":
        if args.optimizer not in ("adamw", "adamw8bit"):
            raise UsageError(f"--method lora trains small dense adapters with AdamW; --optimizer {args.optimizer} "
                             "projects the model's own matrices (use --method full for it, or --optimizer adamw / "
                             "adamw8bit with lora)")
    elif (args.lora_r, args.lora_alpha, args.lora_dropout) != (8, None, 0.0):
        raise UsageError("--lora-r / --lora-alpha / --lora-dropout apply to --method lora only")
