"""Pretraining corpora: documents from the task, text, JSON, Parquet or an HF dataset folder, packed into blocks.

Two loaders share one definition of the data (the same documents, the same held-out choice):
- Ray Data (`data.loader: ray_data`, the default): `document_datasets` reads with `read_text`/`read_json`/
  `read_parquet`, `packed` tokenizes and packs in `map_batches`, the TorchTrainer gets the datasets and each worker
  reads them with `get_dataset_shard` through a `BlockStream`: memory per worker does not grow with the corpus.
- in memory (`load_documents` + `pack_blocks`): each worker holds the whole corpus; the baseline.
"""

from __future__ import annotations

import functools
from pathlib import Path

from rayloop.config import DataSection, TaskSection

TEXT_SUFFIXES = {"text": (".txt",), "json": (".json", ".jsonl"), "parquet": (".parquet",)}


def _text_schema():
    import pyarrow as pa

    return pa.schema([("text", pa.string())])


def load_documents(data: DataSection, task: TaskSection) -> tuple[list[str], list[str]]:
    """(train, eval) documents, the same for the same config on every worker, the whole corpus in memory."""
    if data.source == "task":
        from rayloop.tasks import ArithmeticTask

        arithmetic = ArithmeticTask(task)
        return arithmetic.pretrain_corpus(), [p.text for p in arithmetic.eval_problems]
    from rayloop.storage import local_copy

    path = Path(local_copy(data.path))  # on each worker: from storage, through this node's cache
    if data.source == "hf":
        from datasets import load_from_disk

        dataset = load_from_disk(str(path))
        if hasattr(dataset, "keys"):  # a DatasetDict: its train split, else its first
            dataset = dataset["train"] if "train" in dataset else dataset[next(iter(dataset))]
        texts = dataset[data.text_field]
    else:
        files = sorted(f for f in path.rglob("*") if f.suffix in TEXT_SUFFIXES[data.source]) if path.is_dir() \
            else [path]
        texts = [t for f in files for t in _file_texts(f, data)]
    docs = [t.strip() for t in texts if t and t.strip()]
    if len(docs) < 2:
        raise ValueError(f"data.path {data.path!r} holds {len(docs)} documents; at least 2 are needed")
    held = [is_held_out(d, data.seed, data.eval_fraction) for d in docs]
    return [d for d, h in zip(docs, held) if not h], [d for d, h in zip(docs, held) if h]


def _file_texts(file: Path, data: DataSection) -> list[str]:
    if data.source == "text":
        return file.read_text().splitlines()
    if data.source == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(file, columns=[data.text_field]).column(data.text_field).to_pylist()
    import json

    text = file.read_text()  # a JSON array, or JSON lines
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(r) for r in text.splitlines() if r.strip()]
    return [row.get(data.text_field) for row in rows]


def check_source(data: DataSection) -> None:
    """ValueError naming the field when `data.path` holds no file of its source, or its first file no `text_field`
    column: read from the first file's head alone, before Ray starts."""
    from rayloop import storage

    if data.source in ("task", "hf"):
        return
    import pyarrow.fs

    filesystem, path = storage.filesystem(storage.normalize(data.path))
    info = filesystem.get_file_info(path)
    if info.type == pyarrow.fs.FileType.Directory:
        found = sorted(i.path for i in filesystem.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
                       if i.type == pyarrow.fs.FileType.File and i.path.endswith(TEXT_SUFFIXES[data.source]))
        if not found:
            raise ValueError(f"data.path: {data.path!r} holds no {'/'.join(TEXT_SUFFIXES[data.source])} file for "
                             f"data.source={data.source}")
        first = found[0]
    else:
        first = path
    if data.source == "parquet":
        import pyarrow.parquet as pq

        columns = pq.read_schema(first, filesystem=filesystem).names
    elif data.source == "json":
        import json

        with filesystem.open_input_stream(first) as stream:
            head = stream.read(1 << 20).decode(errors="replace").lstrip()
        row = json.loads(head.splitlines()[0]) if head and not head.startswith("[") else None
        columns = list(row) if isinstance(row, dict) else [data.text_field]  # a JSON array: checked when read
    else:
        return
    if data.text_field not in columns:
        raise ValueError(f"data.text_field: no column {data.text_field!r} in {first} (it has {columns})")


def is_held_out(text: str, seed: int, fraction: float) -> bool:
    """Whether a document is held out: by a hash of it and the seed, so the choice needs no pass over the corpus
    and both loaders make the same one."""
    import hashlib

    digest = hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def pack_blocks(texts: list[str], tokenizer, block_size: int):
    """A LongTensor [n, block_size]: the documents, each as BOS text EOS, concatenated and cut into blocks.

    Packing wastes no compute on padding; the tail shorter than a block is dropped.
    """
    import torch

    ids, n = _packed_ids(texts, tokenizer, block_size)
    if n == 0:
        raise ValueError(f"{len(ids)} tokens make no block of {block_size}")
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


def _packed_ids(texts: list[str], tokenizer, block_size: int) -> tuple[list[int], int]:
    """The documents' token ids, each document followed by EOS, and how many whole blocks they fill."""
    ids: list[int] = []
    for encoded in tokenizer(texts)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    return ids, len(ids) // block_size


# ---------------------------------------------------------------------------------------------------------------
# Ray Data: the corpus streamed, never whole in a worker
# ---------------------------------------------------------------------------------------------------------------

READ_BLOCKS = 200
"""Blocks every read is cut into, fixed rather than planned from the cluster's size, so that each execution of the
stream cuts (and packs) the documents the same way whatever the cluster: a worker restarted on a smaller cluster
reads the same blocks as before."""
PACK_DOCUMENTS = 1024
"""Documents tokenized and packed together by one `map_batches` call; each batch drops its tail shorter than a
block, under one block per this many documents."""


def document_datasets(data: DataSection, task: TaskSection):
    """(train, held-out) `ray.data.Dataset`s of `{"text": ...}` rows, in a fixed order (`preserve_order`)."""
    import ray.data

    if data.source == "task":
        from rayloop.tasks import ArithmeticTask

        arithmetic = ArithmeticTask(task)
        train = ray.data.from_items([{"text": t} for t in arithmetic.pretrain_corpus()], override_num_blocks=1)
        held_out = ray.data.from_items([{"text": p.text} for p in arithmetic.eval_problems], override_num_blocks=1)
    else:
        split = {"field": "text" if data.source == "text" else data.text_field, "seed": data.seed,
                 "fraction": data.eval_fraction}
        documents = _read(data)
        train = documents.map_batches(_documents, fn_kwargs={**split, "held_out": False}, batch_format="pyarrow")
        held_out = documents.map_batches(_documents, fn_kwargs={**split, "held_out": True}, batch_format="pyarrow")
    for dataset in (train, held_out):
        dataset.context.execution_options.preserve_order = True  # the same order on every read: resumable
    return train, held_out


def _read(data: DataSection):
    import ray.data

    from rayloop import storage

    filesystem, path = storage.filesystem(storage.normalize(data.path))
    if data.source == "text":  # one row per non-empty line, in a column named text
        return ray.data.read_text(path, filesystem=filesystem, file_extensions=["txt"],
                                  override_num_blocks=READ_BLOCKS)
    if data.source == "json":
        return ray.data.read_json(path, filesystem=filesystem, file_extensions=["json", "jsonl"],
                                  override_num_blocks=READ_BLOCKS)
    if data.source == "parquet":
        return ray.data.read_parquet(path, filesystem=filesystem, columns=[data.text_field],
                                     override_num_blocks=READ_BLOCKS)
    from datasets import load_from_disk

    from rayloop.storage import local_copy

    dataset = load_from_disk(local_copy(data.path))
    if hasattr(dataset, "keys"):  # a DatasetDict: its train split, else its first
        dataset = dataset["train"] if "train" in dataset else dataset[next(iter(dataset))]
    return ray.data.from_huggingface(dataset.select_columns([data.text_field]))


def _documents(batch, field: str, seed: int, fraction: float, held_out: bool):
    """The batch's documents as `text`, stripped, empty ones dropped, and those of one side of the held-out split."""
    import pyarrow as pa

    if field not in batch.column_names:
        raise ValueError(f"data.text_field: no column {field!r} (the data has {batch.column_names})")
    texts = (t.strip() for t in batch.column(field).to_pylist() if t and t.strip())
    return pa.table({"text": [t for t in texts if is_held_out(t, seed, fraction) == held_out]}, schema=_text_schema())


def packed(documents, model_dir: str, block_size: int):
    """`documents` tokenized and packed into rows of `input_ids` (block_size tokens), in `map_batches`."""
    return documents.map_batches(_pack, fn_kwargs={"model_dir": model_dir, "block_size": block_size},
                                 batch_size=PACK_DOCUMENTS, batch_format="numpy")


@functools.lru_cache(maxsize=2)
def _tokenizer(model_dir: str):
    """The model's tokenizer, once per Ray Data worker process (they are reused from task to task)."""
    from transformers import AutoTokenizer

    from rayloop.storage import local_copy, training_state

    return AutoTokenizer.from_pretrained(local_copy(model_dir, exclude=training_state), local_files_only=True)


def _pack(batch: dict, model_dir: str, block_size: int) -> dict:
    import numpy as np

    ids, n = _packed_ids([str(t) for t in batch["text"]], _tokenizer(model_dir), block_size)
    return {"input_ids": np.asarray(ids[: n * block_size], dtype=np.int64).reshape(n, block_size)}


class BlockStream:
    """This worker's micro batches from a packed Ray Data stream, in an order fixed by the seed, resumable.

    Every worker reads the whole stream in the same order (the TorchTrainer does not split the dataset:
    `DataConfig(datasets_to_split=[])`), shuffles it through the same seeded window, cuts it into groups of
    world x micro blocks and keeps its own micro of each group: the workers agree on every epoch's length with no
    collective, and a run resumed at (epoch, batch) sees exactly the blocks it would have seen. Ray Data's own split
    hands out blocks as workers ask for them, an order no rerun repeats.
    """

    def __init__(self, iterator, *, rank: int, world: int, micro: int, seed: int, shuffle_blocks: int,
                 position: dict | None = None):
        self.iterator, self.rank, self.world, self.micro = iterator, rank, world, micro
        self.seed, self.shuffle_blocks = seed, max(1, shuffle_blocks)
        self.epoch = (position or {}).get("epoch", 0)
        self.batch = (position or {}).get("batch", 0)
        self._groups, self._seen = None, 0

    @property
    def position(self) -> dict:
        """Where the next micro batch comes from: saved with each checkpoint, handed back on resume. A `batch` past
        the end of its epoch carries into the next ones (a position counted in steps alone)."""
        return {"epoch": self.epoch, "batch": self.batch}

    def __iter__(self):
        return self

    def __next__(self):
        import numpy as np
        import torch

        while True:
            if self._groups is None:
                self._groups, self._seen = self._epoch(self.epoch), 0
            try:
                mine = next(self._groups)
            except StopIteration:
                if self._seen == 0:
                    raise ValueError(f"the corpus does not fill one micro batch of {self.micro} blocks on each of "
                                     f"{self.world} workers") from None
                self.batch = self.batch - self._seen if self.batch > self._seen else 0
                self.epoch, self._groups = self.epoch + 1, None
                continue
            self._seen += 1
            if self._seen <= self.batch:
                continue  # trained on before the resume
            self.batch += 1
            return torch.from_numpy(np.stack(mine))

    def _epoch(self, epoch: int):
        """This worker's share of each group of world x micro blocks of the epoch's order."""
        group = self.world * self.micro
        pending = []
        for block in self._shuffled(epoch):
            pending.append(block)
            if len(pending) == group:
                yield pending[self.rank * self.micro: (self.rank + 1) * self.micro]
                pending = []

    def _shuffled(self, epoch: int):
        """The stream's blocks through a window of `shuffle_blocks`, drawn by a generator seeded per epoch."""
        import random

        rng = random.Random(self.seed * 100_003 + epoch)
        window: list = []
        for rows in self.iterator.iter_batches(batch_size=256, batch_format="numpy", prefetch_batches=2):
            for block in rows["input_ids"]:
                if len(window) < self.shuffle_blocks:
                    window.append(block.copy())  # a view would keep its whole batch alive
                    continue
                i = rng.randrange(len(window))
                window[i], block = block.copy(), window[i]
                yield block
        rng.shuffle(window)
        yield from window


def head_blocks(iterator, *, rank: int, world: int, most: int):
    """This worker's share of the first world x `most` blocks of a stream (the held-out blocks): a LongTensor."""
    import numpy as np
    import torch

    mine, seen = [], 0
    for rows in iterator.iter_batches(batch_size=256, batch_format="numpy"):
        for block in rows["input_ids"]:
            if seen % world == rank:
                mine.append(block.copy())
            seen += 1
            if seen == world * most:
                return torch.from_numpy(np.stack(mine))
    usable = (seen // world) * world
    if usable == 0:
        raise ValueError(f"the held-out documents make {seen} blocks, fewer than the {world} workers")
    return torch.from_numpy(np.stack(mine[: usable // world]))
