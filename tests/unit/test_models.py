import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rayloop.models import PRESETS, build_model, count_parameters, create_model_folder, save_hf_folder, train_tokenizer
from rayloop.tasks import ArithmeticTask

CORPUS = ArithmeticTask().pretrain_corpus()


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS + ["plain words, too."], vocab_size=400)


def test_tokenizer_round_trips_and_splits_digits(tokenizer):
    text = "123+45=168 and ünïcode"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    digits = [tokenizer.decode([t]) for t in tokenizer("9876", add_special_tokens=False)["input_ids"]]
    assert digits == ["9", "8", "7", "6"]


def test_chat_template_marks_roles_and_generation_prompt(tokenizer):
    messages = [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "<|user|>2+2=</s><|assistant|>4</s>"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>2+2=</s><|assistant|>"
    assert len(tokenizer("<|assistant|>", add_special_tokens=False)["input_ids"]) == 1


def test_tiny_preset_is_well_under_5m_and_small_is_larger(tokenizer):
    tiny = count_parameters(build_model("tiny", tokenizer))
    assert 200_000 < tiny < 5_000_000, tiny
    assert set(PRESETS) >= {"tiny", "small", "125m"}
    assert PRESETS["small"]["hidden_size"] > PRESETS["tiny"]["hidden_size"]


def test_same_seed_same_weights(tokenizer):
    a, b = build_model("tiny", tokenizer, seed=1), build_model("tiny", tokenizer, seed=1)
    assert torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)


def test_folder_loads_unchanged_in_transformers(tmp_path):
    folder = create_model_folder("tiny", CORPUS, tmp_path / "m", vocab_size=400)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = tok("12+3=", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    assert tok.chat_template is not None and model.config.model_type == "llama"


def test_save_replaces_a_folder_atomically(tmp_path, tokenizer):
    model = build_model("tiny", tokenizer)
    out = save_hf_folder(model, tokenizer, tmp_path / "m")
    save_hf_folder(model, tokenizer, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary or old folder left beside it


@pytest.mark.parametrize("in_ray, gpu_ids, cuda, device", [
    (True, [0], True, "cuda:0"),  # a Ray task that holds a GPU: its device 0, whatever LOCAL_RANK says
    (True, [0], False, "cpu"),    # a GPU granted, but a torch without CUDA
    (True, [], True, "cpu"),      # a CPU task on a GPU node: Ray leaves CUDA_VISIBLE_DEVICES open to it
    (False, [], True, "cuda"),    # no Ray: any GPU the process sees
    (False, [], False, "cpu"),
], ids=["gpu_task", "gpu_task_cpu_torch", "cpu_task_on_a_gpu_node", "outside_ray_with_a_gpu", "no_gpu"])
def test_evaluation_device_is_the_gpu_ray_gave_the_task(in_ray, gpu_ids, cuda, device, monkeypatch):
    import ray

    from rayloop.models import evaluation_device

    cuda_asked: list[bool] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: in_ray)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: gpu_ids)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_asked.append(True) or cuda)
    assert evaluation_device() == device
    if in_ray and not gpu_ids:
        assert not cuda_asked, "a CPU task touched CUDA"


def test_safetensors_read_tensor_by_tensor_equal_safetensors_own_and_stay_unmapped(tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from rayloop.models import SafetensorsFolder

    tensors = {"w": torch.randn(64, 32), "h": torch.randn(7, 3).to(torch.bfloat16), "i": torch.arange(5),
               "flag": torch.tensor([True, False]), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    save_file(dict(list(tensors.items())[:3]), tmp_path / "model-00001-of-00002.safetensors")
    save_file(dict(list(tensors.items())[3:]), tmp_path / "model-00002-of-00002.safetensors")
    folder = SafetensorsFolder(tmp_path)
    read = {name: folder.get_tensor(name) for name in tensors}
    assert str(tmp_path) not in open("/proc/self/maps").read()  # nothing of the files stays mapped
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name
        path = tmp_path / f"model-0000{1 if name in ('w', 'h', 'i') else 2}-of-00002.safetensors"
        with safe_open(str(path), framework="pt") as theirs:
            assert torch.equal(read[name], theirs.get_tensor(name)), name
