"""Training data without a hub: embedded Shakespeare corpus, offline byte-level BPE, cached token streams,
deterministic data-parallel batches.

Typical use::

    tok = get_tokenizer()                                   # trains once (~2 s), then cached
    batcher = TokenBatcher.from_source(None, tok, seq_len=256, micro_batch=8, world_size=W, rank=r, seed=0)
    input_ids, labels = batcher.next_batch()                # [8, 256] each, labels already shifted

Fine-tuning data (instruction / chat records, chat templates, loss masks, packing)::

    data = SFTDataset.build("train.jsonl", tok, seq_len=512, options=SFTOptions())
    batcher = SFTBatcher(data, 512, micro_batch=4, world_size=W, rank=r, seed=0)
    micro_batches, n_loss_tokens = batcher.step_batches(grad_accum)   # (input_ids, labels, position_ids) each
"""

from qgalore_dist.data.corpus import (
    DataError,
    cache_root,
    default_corpus_files,
    iter_documents,
    strip_gutenberg,
)
from qgalore_dist.data.loader import (
    TokenBatcher,
    TokenStream,
    load_tokens,
    read_token_shard,
    split_point,
    write_token_shard,
)
from qgalore_dist.data.sft import (
    FORMATS,
    PACKING_UNSUPPORTED,
    TRUNCATION,
    Example,
    SFTBatcher,
    SFTDataset,
    SFTOptions,
    TokenizedExample,
    extract_answer,
    read_examples,
)
from qgalore_dist.data.tokenizer import EOT_TOKEN, get_tokenizer, tokenizer_fingerprint, train_bpe

__all__ = [
    "DataError",
    "EOT_TOKEN",
    "FORMATS",
    "PACKING_UNSUPPORTED",
    "TRUNCATION",
    "Example",
    "SFTBatcher",
    "SFTDataset",
    "SFTOptions",
    "TokenBatcher",
    "TokenStream",
    "TokenizedExample",
    "cache_root",
    "default_corpus_files",
    "extract_answer",
    "get_tokenizer",
    "iter_documents",
    "load_tokens",
    "read_examples",
    "read_token_shard",
    "split_point",
    "strip_gutenberg",
    "tokenizer_fingerprint",
    "train_bpe",
    "write_token_shard",
]
