"""``python -m qgalore_dist``: what this package can be run as."""

from __future__ import annotations

import sys

COMMANDS = [
    ("qgalore-pretrain [flags]", "train (pre-train or continue from --model DIR / a checkpoint); also "
                                 "python launch/pretrain.py, torchrun / deepspeed / mpirun ... launch/pretrain.py"),
    ("qgalore-finetune --model DIR --data FILE [flags]", "fine-tune on prompt/completion, Alpaca, chat or ShareGPT "
                                                        "data (loss on the answers; --method lora for peft LoRA); "
                                                        "also python launch/finetune.py under every launcher"),
    ("qgalore-export CKPT OUT", "a checkpoint as a plain transformers directory (sharded safetensors, bf16); also "
                                "python -m qgalore_dist.checkpoint.export"),
    ("python -m qgalore_dist.plan --model M --world-size N", "which rank owns (and alone refreshes) each matrix"),
]


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    print(f"qgalore_dist {__version__}: sharded Q-GaLore / VLoRP training. Commands:\n")
    width = max(len(c) for c, _ in COMMANDS)
    for cmd, what in COMMANDS:
        print(f"  {cmd.ljust(width)}  {what}")
    print("\nEach takes --help. Documentation: README.md, docs/design.md.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
