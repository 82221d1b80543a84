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


class _Rows:
    """What `get_dataset_shard` hands a worker, reduced to the call BlockStream makes: blocks 0..n-1 in order."""

    def __init__(self, n):
        self.n = n

    def iter_batches(self, **_):
        import numpy as np

        for i in range(0, self.n, 5):
            yield {"input_ids": np.arange(i, min(i + 5, self.n))[:, None].repeat(2, axis=1)}


def test_block_stream_resumes_from_a_position_anywhere_even_past_its_epoch():
    from rayloop.data import BlockStream

    def stream(rank, position=None):
        return BlockStream(_Rows(23), rank=rank, world=2, micro=2, seed=3, shuffle_blocks=6, position=position)

    straight = {rank: [next(s).tolist() for s in [stream(rank)] for _ in range(17)] for rank in (0, 1)}
    first = straight[0][:5]  # 23 blocks make 5 groups of 2 x 2 per epoch
    assert len({b[0] for batch in first + straight[1][:5] for b in batch}) == 20
    for rank in (0, 1):
        s = stream(rank)
        for _ in range(7):
            next(s)
        assert s.position == {"epoch": 1, "batch": 2}
        assert [next(stream(rank, s.position)).tolist() for _ in range(1)] == [straight[rank][7]]
        counted = stream(rank, {"epoch": 0, "batch": 13})  # a checkpoint that counted steps alone
        assert [next(counted).tolist() for _ in range(4)] == straight[rank][13:17]
    with pytest.raises(ValueError, match="does not fill one micro batch"):
        next(BlockStream(_Rows(3), rank=0, world=2, micro=2, seed=0, shuffle_blocks=4))
