import pytest

from rayloop.evaluate import paired_difference


def test_paired_difference_of_a_clear_gain():
    before = [0.0] * 100
    after = [1.0] * 30 + [0.0] * 70
    result = paired_difference(before, after)
    assert result["before"] == 0.0 and result["after"] == pytest.approx(0.3)
    assert result["difference"] == pytest.approx(0.3)
    assert 0.2 < result["ci_low"] < 0.3 < result["ci_high"] < 0.4


def test_paired_difference_of_no_change_straddles_zero():
    scores = [1.0, 0.0] * 50
    result = paired_difference(scores, list(reversed(scores)))
    assert result["ci_low"] < 0 < result["ci_high"]


def test_paired_difference_needs_pairs():
    with pytest.raises(ValueError, match="equal, non-zero"):
        paired_difference([1.0], [1.0, 0.0])


class _FakeTask:
    """A Ray remote function's surface: .options(memory=...).remote(...) -> a ref naming the call."""

    def __init__(self):
        self.calls = []

    def options(self, **options):
        outer = self

        class _Bound:
            def remote(self, model_dir, *args):
                outer.calls.append((model_dir, options))
                return f"ref:{model_dir}"

        return _Bound()


def test_side_by_side_submits_every_folder_before_waiting_and_asks_for_memory_on_a_cpu(monkeypatch):
    import ray

    from rayloop import evaluate

    monkeypatch.setattr(evaluate, "_weights_bytes", lambda d: {"start": 100, "trained": 40}[d])
    waited = []
    monkeypatch.setattr(ray, "get", lambda refs: waited.append(list(refs)) or [r.upper() for r in refs])
    task = _FakeTask()
    assert evaluate.side_by_side(task, ["start", "trained"], "rows", extra_bytes=7) == ["REF:START", "REF:TRAINED"]
    assert waited == [["ref:start", "ref:trained"]]  # one wait for both: they run at once
    assert task.calls == [("start", {"memory": 207}), ("trained", {"memory": 87})]
    gpu = _FakeTask()
    evaluate.side_by_side(gpu, ["start", "trained"], use_gpu=True, extra_bytes=7)
    assert [options for _, options in gpu.calls] == [{"memory": 0}, {"memory": 0}]


def test_side_by_side_cancels_the_others_when_one_fails(monkeypatch):
    import ray

    from rayloop import evaluate

    monkeypatch.setattr(evaluate, "_weights_bytes", lambda d: 1)

    def get(refs):
        raise RuntimeError("the reward failed on a held-out row")

    cancelled = []
    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray, "cancel", lambda ref, force: cancelled.append((ref, force)))
    with pytest.raises(RuntimeError, match="held-out row"):
        evaluate.side_by_side(_FakeTask(), ["start", "trained"])
    assert cancelled == [("ref:start", True), ("ref:trained", True)]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from rayloop.models import create_model_folder
    from rayloop.tasks import ArithmeticTask

    return str(create_model_folder("tiny", ArithmeticTask().pretrain_corpus()[:200],
                                   tmp_path_factory.mktemp("tiny") / "model"))


@pytest.mark.parametrize("gpu_ids, device", [([0], "cuda:0"), ([], "cpu")], ids=["task_holds_a_gpu", "cpu_task"])
@pytest.mark.parametrize("score_fn", ["exact_match_scores", "loss_scores", "preference_margins", "reward_margins",
                                      "_reward_model_scores"])
def test_a_scoring_task_puts_its_model_on_the_gpu_it_holds(score_fn, gpu_ids, device, tiny_folder, monkeypatch):
    """A task that holds a GPU scores there, not only claims it; a CPU task on a GPU node scores on the CPU, though
    Ray leaves CUDA_VISIBLE_DEVICES open to it. (No GPU here: `from_pretrained` records its `device_map` and loads
    on the CPU, and `Module.to` records where it was sent and stays put.)"""
    import ray
    import torch
    from transformers import PreTrainedModel

    from rayloop import evaluate

    sent_to: list[str] = []
    load = PreTrainedModel.from_pretrained.__func__

    def load_recording(cls, *args, device_map=None, **kwargs):
        sent_to.append(str(device_map))
        return load(cls, *args, **kwargs)

    def to_recording(module, *args, **kwargs):
        sent_to.append(str(args[0] if args else kwargs.get("device")))
        return module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: gpu_ids)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(load_recording))
    monkeypatch.setattr(torch.nn.Module, "to", to_recording)
    rows = ([{"prompt": "1+2=", "answer": "3"}] if score_fn == "exact_match_scores"
            else [{"prompt": "1+2=", "completion": "3"}] if score_fn == "loss_scores"
            else [{"prompt": "1+2=", "chosen": "3", "rejected": "4"}])
    if score_fn == "_reward_model_scores":  # a reward model folder among GRPO's rewards
        evaluate._reward_model_scores(tiny_folder, ["1+2="], ["3"])
    else:
        getattr(evaluate, score_fn)(tiny_folder, rows)
    assert sent_to[-1:] == [device], sent_to
