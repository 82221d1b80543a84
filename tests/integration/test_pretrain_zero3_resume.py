"""ZeRO-3 on 2 workers, with gradient checkpointing (recomputed layers gather their partitioned parameters again):
the final folder is an ordinary HF checkpoint (the gathered weights, exactly the ones DeepSpeed's own zero_to_fp32
reconstructs), and running the same job again resumes from its latest checkpoint."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from jobs import pretrain
from rayloop.config import load_config
from rayloop.models import load_model


def _run(storage, steps):
    return pretrain.main(load_config(pretrain.PretrainConfig, [
        f"--storage.path={storage}", "--storage.name=zero3", "--deepspeed.zero_stage=3", f"--train.steps={steps}",
        "--train.checkpoint_every=10", "--train.log_every=5", "--task.num_train=1000", "--task.num_eval=50",
        "--train.gradient_checkpointing=true",
    ]))


def test_zero3_writes_an_ordinary_hf_folder_and_resumes(ray_cluster, tmp_path):
    first = _run(tmp_path, 10)
    hf = Path(first["model_dir"])
    assert sorted(p.name for p in hf.iterdir() if not p.name.startswith(".")) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    model, _ = load_model(hf)
    weights = load_file(hf / "model.safetensors")
    assert weights["model.embed_tokens.weight"].shape == (model.config.vocab_size, model.config.hidden_size)

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    reference = get_fp32_state_dict_from_zero_checkpoint(str(hf.parent / "deepspeed"), tag="state")
    for name, tensor in weights.items():
        assert torch.equal(tensor, reference[name].to(tensor.dtype)), name

    # Each worker's peak memory per phase, from both workers.
    assert {"build", "first_step", "steady", "save"} <= set(first["memory_peak_bytes"])
    assert all(len(ranks) == 2 and min(ranks) > 0 for ranks in first["memory_peak_bytes"].values())
    assert "resume" not in first["memory_peak_bytes"]

    second = _run(tmp_path, 20)
    assert second["resumed_from_step"] == 10 and second["step"] == 20
    assert "resume" in second["memory_peak_bytes"]
    assert second["eval_loss"] < first["eval_loss"]
    state = json.loads((Path(second["model_dir"]).parent / "trainer_state.json").read_text())
    assert [s for s, _ in state["history"]["eval_loss"]] == [10, 20]  # the history survived the restart
    assert (Path(second["model_dir"]).parent / "loss.png").is_file()
    assert list((tmp_path / "zero3" / "tensorboard").glob("events.out.tfevents.*"))
