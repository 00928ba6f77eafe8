#!/usr/bin/env python
"""Pre-train a causal LM with Q-GaLore (or a baseline optimizer) — see ``--help``.

    python launch/pretrain.py                                  # demo: llama_20m, embedded corpus, 200 steps
    python launch/pretrain.py --model llama_60m --rank 128 --lr 0.015 --max-steps 2000 --save-dir runs/60m

Runs from a source checkout without installation: the repository root is put on ``sys.path``.
"""

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from qgalore_dist.train.cli import main  # noqa: E402  (needs the path set above)

if __name__ == "__main__":
    main()
