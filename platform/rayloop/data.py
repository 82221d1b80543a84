"""Documents for causal-LM training (the task, text files, or an HF dataset folder), packed into fixed blocks."""

from __future__ import annotations

import random
from pathlib import Path

from rayloop.config import DataSection, TaskSection


def load_documents(data: DataSection, task: TaskSection) -> tuple[list[str], list[str]]:
    """(train, eval) documents, the same for the same config on every worker."""
    if data.source == "task":
        from rayloop.tasks import ArithmeticTask

        arithmetic = ArithmeticTask(task)
        return arithmetic.pretrain_corpus(), [p.text for p in arithmetic.eval_problems]
    from rayloop.storage import local_copy

    path = Path(local_copy(data.path))  # on each worker: from storage, through this node's cache
    if data.source == "text":
        files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
        docs = [line.strip() for f in files for line in f.read_text().splitlines() if line.strip()]
    else:
        from datasets import load_from_disk

        dataset = load_from_disk(str(path))
        if hasattr(dataset, "keys"):  # a DatasetDict: its train split, else its first
            dataset = dataset["train"] if "train" in dataset else dataset[next(iter(dataset))]
        docs = [d for d in dataset[data.text_field] if d]
    if len(docs) < 2:
        raise ValueError(f"data.path {data.path!r} holds {len(docs)} documents; at least 2 are needed")
    order = list(range(len(docs)))
    random.Random(data.seed).shuffle(order)
    n_eval = max(1, int(len(docs) * data.eval_fraction))
    return [docs[i] for i in order[n_eval:]], [docs[i] for i in order[:n_eval]]


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
