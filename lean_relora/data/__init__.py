"""Documents to token blocks: everything between a corpus on disk or a hub and the integer tensors a step reads.

    corpus        documents from text files, JSONL, Parquet, a hub dataset or CPython's docs
    tokenizer     the tokenizer of a run: a cached byte-level BPE, a pretrained one, copied into the run
    token_files   prepared token files: memory-mapped uint16/uint32 arrays and their manifest
    prepare       `lean-relora prepare`: tokenize a corpus once into token files, resumable
    packing       documents packed into blocks of seq_len tokens, in one deterministic order (PackedData)
    prefetch      micro-batches made ahead by a thread while the step runs (BatchLoader)
"""

from lean_relora.data.corpus import DataError
from lean_relora.data.packing import PackedData, build_data

__all__ = ["DataError", "PackedData", "build_data"]
