"""The user's datasets in TRL's formats: read from every kind of file, split, checked against the job's format."""

import json

import pytest

from rayloop.dataset import DatasetError, DatasetSection, data_format, load_splits, read

ROWS = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "save_to_disk", "folder of jsonl"])
def test_every_file_kind_reads_the_same_rows(tmp_path, kind):
    from datasets import Dataset

    dataset = Dataset.from_list(ROWS)
    path = tmp_path / f"data.{kind}"
    if kind == "jsonl":
        write_jsonl(path, ROWS)
    elif kind == "json":
        path.write_text(json.dumps(ROWS))
    elif kind == "parquet":
        dataset.to_parquet(str(path))
    elif kind == "csv":
        dataset.to_csv(str(path), index=False)
    elif kind == "save_to_disk":
        dataset.save_to_disk(str(path))
    else:
        path.mkdir()
        write_jsonl(path / "part-0.jsonl", ROWS[:10])
        write_jsonl(path / "part-1.jsonl", ROWS[10:])
    assert read(str(path)).to_list() == ROWS


def test_split_by_fraction_is_disjoint_and_seeded(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    train, held_out = load_splits(DatasetSection(path=str(path), eval_fraction=0.25), "sft")
    assert len(train) == 15 and len(held_out) == 5
    assert not {r["prompt"] for r in train.to_list()} & {r["prompt"] for r in held_out.to_list()}
    again = load_splits(DatasetSection(path=str(path), eval_fraction=0.25), "sft")[1]
    other = load_splits(DatasetSection(path=str(path), eval_fraction=0.25, seed=1), "sft")[1]
    assert again.to_list() == held_out.to_list() != other.to_list()


def test_separate_eval_file_and_eval_cap(tmp_path):
    train_path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    eval_path = write_jsonl(tmp_path / "eval.jsonl", [{"text": "x"}] * 3)
    with pytest.raises(DatasetError, match="dataset.eval_path is language modeling, dataset.path is prompt-completion"):
        load_splits(DatasetSection(path=str(train_path), eval_path=str(eval_path)), "sft")
    eval_path = write_jsonl(tmp_path / "eval.jsonl", ROWS[:8])
    train, held_out = load_splits(DatasetSection(path=str(train_path), eval_path=str(eval_path), max_eval=6), "sft")
    assert len(train) == 20 and held_out.to_list() == ROWS[:6]


@pytest.mark.parametrize("job, columns, fmt", [
    ("sft", ["prompt", "completion"], "prompt-completion"),
    ("sft", ["text"], "language modeling"),
    ("sft", ["messages"], "conversational language modeling"),
    ("dpo", ["prompt", "chosen", "rejected"], "preference"),
    ("reward", ["chosen", "rejected"], "preference"),  # implicit prompt
    ("grpo", ["prompt", "answer", "difficulty"], "prompt-only"),
])
def test_formats_by_columns(job, columns, fmt):
    assert data_format(columns, job) == fmt


def test_conversational_rows_pass_the_value_check(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
            for i in range(10)]
    train, _ = load_splits(DatasetSection(path=str(write_jsonl(tmp_path / "chat.jsonl", rows))), "sft")
    assert train[0]["messages"][1]["role"] == "assistant"


def test_the_held_out_share_keeps_every_row_of_a_prompt_together(tmp_path):
    # Four pairs per prompt, as preference data often comes: no prompt may be on both sides.
    rows = [{"prompt": f"q{i}", "chosen": f"right{j}", "rejected": f"wrong{j}"} for i in range(10) for j in range(4)]
    train, held_out = load_splits(DatasetSection(path=str(write_jsonl(tmp_path / "p.jsonl", rows)),
                                                 eval_fraction=0.2), "dpo")
    assert len(held_out) == 8 and len(train) == 32
    assert not {r["prompt"] for r in train.to_list()} & {r["prompt"] for r in held_out.to_list()}


def test_eval_rows_are_checked_too(tmp_path):
    train_path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    eval_path = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "q", "completion": None}])
    with pytest.raises(DatasetError, match=r"^dataset.eval_path, column 'completion', row 0"):
        load_splits(DatasetSection(path=str(train_path), eval_path=str(eval_path)), "sft")
    with pytest.raises(ValueError, match="the held-out rows would be the training rows"):
        DatasetSection(path=str(train_path), eval_path=str(train_path), eval_split="train")
