"""A post-training dataset of the user's, in one of TRL's standard formats, read from storage.

    dataset:
      path: s3://bucket/data/train.jsonl   # or a local file, a folder of files, a `save_to_disk` folder
      eval_path: s3://bucket/data/eval.jsonl  # else `eval_fraction` of `path`, chosen by `seed`

TRL's formats, by their columns (each value a string, or a list of {role, content} messages: conversational, which
the trainers render through the tokenizer's chat template):
- language modeling: `text` (or `messages`);
- prompt-completion: `prompt`, `completion`;
- preference: `chosen`, `rejected`, with `prompt` (explicit) or without it (implicit: the shared start);
- prompt-only: `prompt`.
Every other column rides along: TRL hands it to reward functions as a keyword argument (e.g. `answer`).

The columns are checked on the driver when the config is loaded, before Ray starts. Workers read the same files:
from storage through their node's cache (`storage.local_copy`), or a path relative to the job's working dir, which
Ray ships to every node; an absolute local path must be a mount every node has (an error names the node that lacks
it).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from rayloop.config import Section

# What a job can train on: (format, its required columns); the first format whose columns are present wins.
LANGUAGE_MODELING = ("language modeling", ("text",))
CONVERSATIONAL_LM = ("conversational language modeling", ("messages",))
PROMPT_COMPLETION = ("prompt-completion", ("prompt", "completion"))
PREFERENCE = ("preference", ("chosen", "rejected"))
PROMPT_ONLY = ("prompt-only", ("prompt",))

JOB_FORMATS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "sft": (PROMPT_COMPLETION, LANGUAGE_MODELING, CONVERSATIONAL_LM),
    "dpo": (PREFERENCE,),
    "reward": (PREFERENCE,),
    "grpo": (PROMPT_ONLY,),
}

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DatasetSection(Section):
    path: str | None = None
    """The training data: a `.jsonl`/`.json`/`.parquet`/`.csv` file, a folder of such files, or a
    `datasets.save_to_disk` folder; local, or in storage (`s3://...`). Unset: the built-in arithmetic task."""
    eval_path: str | None = None
    """Held-out data in the same format; unset: `eval_fraction` of `path` is held out."""
    eval_fraction: float = Field(default=0.1, gt=0, lt=1)
    """Share of `path` held out for evaluation when `eval_path` is unset, chosen by `seed` by prompt: every row
    of a held-out prompt is held out, so no prompt is on both sides."""
    max_eval: int | None = Field(default=500, ge=1)
    """At most this many held-out examples are evaluated (before and after training); None: all."""
    split: str = "train"
    """Split to read from a `save_to_disk` folder of `path` that holds several."""
    eval_split: str = "test"
    """Split to read from a `save_to_disk` folder of `eval_path` that holds several."""
    seed: int = 0
    """Seed of the held-out choice."""

    @model_validator(mode="after")
    def _eval_path_needs_path(self):
        if self.eval_path is not None and self.path is None:
            raise ValueError("dataset.eval_path needs dataset.path (the task's data has its own held-out split)")
        if self.eval_path == self.path and self.eval_split == self.split:
            raise ValueError(f"dataset.eval_path is dataset.path and eval_split is split ({self.split!r}): the "
                             f"held-out rows would be the training rows")
        return self


class DatasetError(ValueError):
    """A dataset that the job cannot train on; the message names the file, the problem and what was expected."""


def read(path: str, split: str = "train"):
    """A `datasets.Dataset` from a file, a folder of files or a `save_to_disk` folder (local or in storage)."""
    import datasets

    from rayloop import storage

    if not storage.exists(storage.normalize(path)):
        raise DatasetError(f"{path}: no such file or folder")
    local = Path(storage.local_copy(path))  # on a worker: from storage, through this node's cache
    if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()):
        dataset = datasets.load_from_disk(str(local))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise DatasetError(f"{path}: no split {split!r} (it has {sorted(dataset)}); set dataset.split")
            dataset = dataset[split]
        return dataset
    files = sorted(f for f in local.rglob("*") if f.suffix in _FILE_BUILDERS) if local.is_dir() else [local]
    builders = {_FILE_BUILDERS.get(f.suffix) for f in files}
    if not files or None in builders or len(builders) > 1:
        raise DatasetError(f"{path}: expected .jsonl, .json, .parquet or .csv files of one kind, or a "
                           f"datasets.save_to_disk folder; found {[f.name for f in files][:5] or 'no data files'}")
    if all(f.stat().st_size == 0 for f in files):
        raise DatasetError(f"{path}: the dataset is empty")
    try:
        return datasets.load_dataset(builders.pop(), data_files=[str(f) for f in files], split="train")
    except Exception as exc:  # noqa: BLE001 - a parse error deep in pyarrow: say which file, in one line
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise DatasetError(f"{path}: cannot be read as {files[0].suffix}: {reason}") from None


def data_format(columns: list[str], job: str) -> str:
    """The TRL format a job reads from these columns; a DatasetError naming what is missing otherwise."""
    for name, required in JOB_FORMATS[job]:
        if all(column in columns for column in required):
            return name
    expected = " or ".join(f"{name} ({', '.join(repr(c) for c in required)})" for name, required in JOB_FORMATS[job])
    closest = min(JOB_FORMATS[job], key=lambda f: sum(c not in columns for c in f[1]))
    missing = [c for c in closest[1] if c not in columns]
    raise DatasetError(f"missing column {missing[0]!r}: the {job} job reads {expected}; the dataset has {columns}")


def load_splits(section: DatasetSection, job: str):
    """(train, eval) `datasets.Dataset`s of the user's data for `job`, checked; the same on every worker."""
    train = read(section.path, section.split)
    if len(train) == 0:
        raise DatasetError(f"{section.path}: the dataset is empty")
    fmt = data_format(train.column_names, job)
    if section.eval_path is not None:
        held_out = read(section.eval_path, section.eval_split)
        if len(held_out) == 0:
            raise DatasetError(f"dataset.eval_path {section.eval_path}: the dataset is empty")
        try:
            eval_fmt = data_format(held_out.column_names, job)
        except DatasetError as exc:
            raise DatasetError(f"dataset.eval_path {section.eval_path}: {exc}") from None
        if eval_fmt != fmt:
            raise DatasetError(f"dataset.eval_path is {eval_fmt}, dataset.path is {fmt}")
    else:
        train, held_out = _hold_out_by_prompt(train, section)
    _check_values(train, fmt)
    _check_values(held_out, fmt, "dataset.eval_path, " if section.eval_path else "")
    if section.max_eval is not None and len(held_out) > section.max_eval:
        held_out = held_out.select(range(section.max_eval))
    return train, held_out


def _hold_out_by_prompt(dataset, section: DatasetSection):
    """(train, held-out): `eval_fraction` of the prompts, by `seed`, with every row that shares one (preference
    pairs and completions often come several to a prompt; a row split would put a prompt on both sides)."""
    import json

    from trl.data_utils import maybe_extract_prompt

    keys = []
    for row in dataset:
        row = maybe_extract_prompt(dict(row))  # an implicit prompt: the start chosen and rejected share
        keys.append(json.dumps(row.get("prompt", row.get("text", row.get("messages"))), sort_keys=True))
    prompts = sorted(set(keys))
    random.Random(section.seed).shuffle(prompts)
    n_eval = max(1, int(len(prompts) * section.eval_fraction))
    if len(prompts) - n_eval < 1:
        raise DatasetError(f"{section.path}: {len(prompts)} distinct prompt(s): too few to hold out "
                           f"{section.eval_fraction:.0%} and train on the rest")
    held = set(prompts[:n_eval])
    return (dataset.select([i for i, k in enumerate(keys) if k not in held]),
            dataset.select([i for i, k in enumerate(keys) if k in held]))


def _check_values(dataset, fmt: str, where: str = "") -> None:
    """The format's columns hold text or messages (not numbers, not nulls): a mistake TRL reports from deep inside
    its tokenizer; here it is one line naming the column and the row."""
    required = next(cols for name, cols in (LANGUAGE_MODELING, CONVERSATIONAL_LM, PROMPT_COMPLETION, PREFERENCE,
                                            PROMPT_ONLY) if name == fmt)
    for column in (*required, *(["prompt"] if "prompt" in dataset.column_names else [])):
        for row, value in enumerate(dataset[column][:1000]):
            if not (isinstance(value, str) and value) and not is_messages(value):
                raise DatasetError(f"{where}column {column!r}, row {row}: expected text or a list of "
                                   f"{{role, content}} messages, got {value!r:.80}")


def is_messages(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def check(section: DatasetSection, job: str) -> str:
    """Read and check the dataset on the driver (before Ray starts); returns its format's name."""
    train, _ = load_splits(section, job)
    return data_format(train.column_names, job)
