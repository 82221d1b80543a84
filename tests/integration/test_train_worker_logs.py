"""rayloop's Ray Train workers (rayloop/train.py make_trainer), on the local cluster."""

from rayloop.config import ScalingSection, StorageSection
from rayloop.train import make_trainer


def bytecode_lines_logged_by_a_dataset_map(storage_path: str, name: str) -> int:
    """Lines of bytecode that reached a worker's root logger while it mapped a dataset, as TRL's trainers do."""

    def loop(config: dict) -> int:
        import logging

        import datasets

        lines: list[str] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                lines.append(record.getMessage())

        logging.getLogger().addHandler(Keep())
        # datasets fingerprints the map's function with dill, which disassembles it into a buffer in place of stdout.
        datasets.Dataset.from_dict({"x": [1, 2]}).map(lambda row: {"y": row["x"] + 1})
        return sum("LOAD_" in line or "RETURN_" in line for line in lines)

    trainer = make_trainer(loop, {}, scaling=ScalingSection(num_workers=1),
                           storage=StorageSection(path=storage_path, name=name))
    return trainer.fit().return_value


def test_a_workers_log_gets_no_bytecode_from_a_dataset_map(ray_cluster, tmp_path, monkeypatch):
    # Ray Train's own default, print patched in the workers: the disassembly lands in the log.
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PRINT_PATCH", "1")
    assert bytecode_lines_logged_by_a_dataset_map(str(tmp_path), "patched") > 0
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PRINT_PATCH")
    assert bytecode_lines_logged_by_a_dataset_map(str(tmp_path), "rayloop") == 0
