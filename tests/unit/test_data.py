import pytest
import torch

from jobs.pretrain import batch_at
from rayloop.config import DataSection, TaskSection
from rayloop.data import load_documents, pack_blocks
from rayloop.models import train_tokenizer


def test_text_folder_documents_split_by_seed(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(f"line {i}" for i in range(50)) + "\n\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("more text\nand more\n")
    data = DataSection(source="text", path=str(tmp_path), eval_fraction=0.1)
    train, held_out = load_documents(data, TaskSection())
    assert len(train) + len(held_out) == 52 and 1 <= len(held_out) <= 12
    assert not set(train) & set(held_out)
    assert load_documents(data, TaskSection()) == (train, held_out)
    other = load_documents(data.model_copy(update={"seed": 1}), TaskSection())[1]
    assert other != held_out  # the seed chooses


def test_hf_dataset_folder(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"body": [f"doc {i}" for i in range(40)]}).save_to_disk(str(tmp_path / "ds"))
    train, held_out = load_documents(DataSection(source="hf", path=str(tmp_path / "ds"), text_field="body"),
                                     TaskSection())
    assert len(train) + len(held_out) == 40 and len(held_out) <= 8


def test_packing_keeps_document_boundaries():
    tok = train_tokenizer(["1+2=3", "10+20=30"], vocab_size=300)
    blocks = pack_blocks(["1+2=3"] * 10, tok, 8)
    flat = blocks.flatten().tolist()
    assert flat[0] == tok.bos_token_id and tok.eos_token_id in flat
    assert blocks.shape[1] == 8


def test_batch_position_is_deterministic_and_covers_an_epoch():
    blocks = torch.arange(12).view(12, 1)
    epoch = torch.cat([batch_at(blocks, i, 3, seed=1) for i in range(4)]).flatten().tolist()
    assert sorted(epoch) == list(range(12))
    assert torch.equal(batch_at(blocks, 5, 3, seed=1), batch_at(blocks, 5, 3, seed=1))
    next_epoch = torch.cat([batch_at(blocks, i, 3, seed=1) for i in range(4, 8)]).flatten().tolist()
    assert next_epoch != epoch and sorted(next_epoch) == list(range(12))
    with pytest.raises(ValueError):
        batch_at(blocks[:2], 0, 3, seed=1)
