"""Pretraining data through Ray Data: every source reads the same documents, the held-out choice is the in-memory
loader's, and each worker's stream of micro batches is fixed by the seed, covers an epoch, and resumes exactly."""

import json

import numpy as np
import pytest

from rayloop.config import DataSection, TaskSection
from rayloop.data import BlockStream, document_datasets, load_documents, packed


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = [f"{i} + {i % 7} = {i + i % 7}, said document {i}" for i in range(600)]
    (root / "text").mkdir()
    (root / "text" / "a.txt").write_text("\n".join(docs[:300]) + "\n\n")
    (root / "text" / "b.txt").write_text("\n".join(docs[300:]) + "\n")
    (root / "json").mkdir()
    (root / "json" / "docs.jsonl").write_text("\n".join(json.dumps({"body": d, "n": 1}) for d in docs) + "\n")
    (root / "parquet").mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": docs}), root / "parquet" / "docs.parquet")
    from rayloop.models import create_model_folder

    model = create_model_folder("tiny", docs, root / "model")
    return root, docs, str(model)


def test_every_source_reads_the_documents_and_holds_out_what_the_in_memory_loader_does(ray_cluster, corpus):
    root, docs, _ = corpus
    for source, field in (("text", "text"), ("json", "body"), ("parquet", "body")):
        data = DataSection(source=source, path=str(root / source), text_field=field, eval_fraction=0.1, seed=4)
        train, held_out = document_datasets(data, TaskSection())
        streamed = ([r["text"] for r in train.take_all()], [r["text"] for r in held_out.take_all()])
        assert sorted(streamed[0] + streamed[1]) == sorted(docs), source
        assert 30 <= len(streamed[1]) <= 90 and not set(streamed[0]) & set(streamed[1])
        in_memory = load_documents(data, TaskSection())
        assert (sorted(streamed[0]), sorted(streamed[1])) == (sorted(in_memory[0]), sorted(in_memory[1])), source


def _take(stream, n):
    return [next(stream).numpy() for _ in range(n)]


def test_block_stream_is_fixed_by_the_seed_covers_each_epoch_and_resumes_exactly(ray_cluster, corpus):
    root, _, model = corpus
    train, _ = document_datasets(DataSection(source="text", path=str(root / "text")), TaskSection())
    blocks = packed(train, model, 16)
    every_block = sorted(tuple(r["input_ids"].tolist()) for r in blocks.take_all())
    world, micro = 2, 3
    per_epoch = len(every_block) // (world * micro)

    def stream(rank, position=None, seed=7):
        return BlockStream(blocks.iterator(), rank=rank, world=world, micro=micro, seed=seed, shuffle_blocks=20,
                           position=position)

    straight = {rank: _take(stream(rank), per_epoch + 5) for rank in range(world)}
    # One epoch of both workers: every block at most once, all but the last partial group.
    first_epoch = [tuple(b.tolist()) for rank in range(world) for batch in straight[rank][:per_epoch] for b in batch]
    assert len(set(first_epoch)) == len(first_epoch) == per_epoch * world * micro
    assert set(first_epoch) <= set(every_block)
    # The next epoch draws another order.
    assert not np.array_equal(straight[0][per_epoch], straight[0][0])
    # The same seed gives the same stream; another seed another one.
    assert all(np.array_equal(a, b) for a, b in zip(_take(stream(0), 4), straight[0]))
    assert not all(np.array_equal(a, b) for a, b in zip(_take(stream(0, seed=8), 4), straight[0]))
    # Stopped in the middle of the first epoch, or across the epoch boundary, and resumed from the saved position.
    for stop in (2, per_epoch + 1):
        for rank in range(world):
            first = stream(rank)
            before = _take(first, stop)
            after = _take(stream(rank, position=first.position), per_epoch + 5 - stop)
            assert all(np.array_equal(a, b) for a, b in zip(before + after, straight[rank])), (stop, rank)


def test_a_resumed_run_trains_on_the_blocks_the_uninterrupted_run_does(ray_cluster, corpus, tmp_path):
    """The job end to end: stopped at step 3 and run again to 6, against 6 steps straight (a constant learning rate,
    so the schedule does not depend on the run's length): the same losses at steps 4 to 6."""
    from pathlib import Path

    from jobs import pretrain
    from rayloop.config import load_config

    root, _, _ = corpus

    def run(name, steps):
        return pretrain.main(load_config(pretrain.PretrainConfig, [
            "--config", "jobs/configs/pretrain_tiny.yaml", f"--storage.path={tmp_path}", f"--storage.name={name}",
            "--data.source=text", f"--data.path={root / 'text'}", "--data.loader=ray_data", f"--train.steps={steps}",
            "--train.checkpoint_every=3", "--train.log_every=1", "--train.global_batch_size=8", "--train.seq_len=16",
            "--optim.schedule=constant", "--optim.warmup_steps=0", "--registry.enabled=false",
            "--data.shuffle_buffer_bytes=4KiB"]))

    def losses(summary):
        state = json.loads((Path(summary["checkpoint"]) / "trainer_state.json").read_text())
        return {int(step): loss for step, loss in state["history"]["loss"]}

    run("resumed", 3)
    resumed = run("resumed", 6)
    straight = run("straight", 6)
    assert resumed["resumed_from_step"] == 3
    assert [round(losses(resumed)[s], 5) for s in (4, 5, 6)] == [round(losses(straight)[s], 5) for s in (4, 5, 6)]
    assert losses(resumed)[4] != losses(resumed)[5]  # steps of different blocks: the comparison sees the data
