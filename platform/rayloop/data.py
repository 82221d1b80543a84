"""Tokenize documents and pack them into fixed-length blocks for causal-LM training."""

from __future__ import annotations


def pack_blocks(texts: list[str], tokenizer, block_size: int):
    """A LongTensor [n, block_size]: the documents, each as BOS text EOS, concatenated and cut into blocks.

    Packing wastes no compute on padding; the tail shorter than a block is dropped.
    """
    import torch

    ids: list[int] = []
    for encoded in tokenizer(texts)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // block_size
    if n == 0:
        raise ValueError(f"{len(ids)} tokens make no block of {block_size}")
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)
