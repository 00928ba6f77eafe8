#!/usr/bin/env python
"""Fine-tune a pretrained causal LM on instruction / chat data — see ``--help``.

    python launch/finetune.py --model ./my-llama --data train.jsonl --max-steps 500 --save-dir runs/ft
    torchrun --nproc_per_node 2 launch/finetune.py --engine fsdp --model ./my-llama --data train.jsonl
    deepspeed launch/finetune.py --ds_config ds_configs/qgalore.json --model ./my-llama --data train.jsonl

The same flags as ``launch/pretrain.py`` plus the fine-tuning ones (``--format``, ``--val-data``, ``--method lora``,
``--eval-generate`` ...). Runs from a source checkout without installation: the repository root is put on
``sys.path``.
"""

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from qgalore_dist.train.cli import main  # noqa: E402  (needs the path set above)

if __name__ == "__main__":
    main(task="finetune")
