import pytest

from rayloop.config import GenerateSection


class _EngineCore:
    def __init__(self):
        self.shutdowns = 0

    def shutdown(self):
        self.shutdowns += 1


class _FakeLLM:
    """vllm.LLM's surface that vllm_generate_each uses; `generate` fails when told to."""
    made: list = []

    def __init__(self, *, fail: bool = False, **kwargs):
        self.llm_engine = type("Engine", (), {})()
        self.llm_engine.engine_core = _EngineCore()
        self.fail = fail
        _FakeLLM.made.append(self)

    def generate(self, prompts, params, use_tqdm, lora_request):
        if self.fail:
            raise RuntimeError("the engine died mid-batch")
        sample = type("Sample", (), {"text": "3", "token_ids": [7]})()
        return [type("Out", (), {"outputs": [sample]})() for _ in prompts]


@pytest.mark.parametrize("fail", [False, True], ids=["generated", "generate_raised"])
def test_the_engine_is_shut_down_before_the_task_goes_on(fail, tmp_path, monkeypatch):
    """Whatever the task runs after generating (a reward model scoring the completions) gets the engine's memory:
    the engine shuts down when generation ends, and when it fails."""
    import vllm

    from rayloop.generate import vllm_generate_each

    _FakeLLM.made = []
    monkeypatch.setattr(vllm, "LLM", lambda **kwargs: _FakeLLM(fail=fail, **kwargs))
    if fail:
        with pytest.raises(RuntimeError, match="mid-batch"):
            vllm_generate_each(str(tmp_path), ["1+2="], [GenerateSection()])
    else:
        assert vllm_generate_each(str(tmp_path), ["1+2="], [GenerateSection()])[0][0]["text"] == "3"
    assert [llm.llm_engine.engine_core.shutdowns for llm in _FakeLLM.made] == [1]
