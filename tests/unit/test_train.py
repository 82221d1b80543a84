import pytest
import torch

from rayloop.config import DeepSpeedSection, OptimSection
from rayloop.train import deepspeed_config, shard_blocks


def _config(ds=DeepSpeedSection(), **kw):
    args = dict(micro_batch_size=4, grad_accum=2, world_size=2, total_steps=100, use_gpu=False,
                precision="fp32") | kw
    return deepspeed_config(ds, OptimSection(lr=1e-3, warmup_steps=5), **args)


def test_deepspeed_keys_from_sections():
    cfg = _config()
    assert cfg["train_batch_size"] == 16
    assert cfg["zero_optimization"] == {"stage": 2}
    assert cfg["optimizer"]["params"]["torch_adam"] is True  # CPU: no FusedAdam
    assert "fused" not in cfg["optimizer"]["params"]  # torch's fused CPU kernel is an override (rayloop/train.py)
    assert cfg["scheduler"]["params"]["warmup_num_steps"] == 5
    assert cfg["bf16"]["enabled"] is False and "torch_autocast" not in cfg


def test_constant_schedule_holds_the_peak_after_warm_up():
    import deepspeed.runtime.lr_schedules as schedules

    cfg = deepspeed_config(DeepSpeedSection(), OptimSection(lr=1e-3, warmup_steps=0, schedule="constant"),
                           micro_batch_size=4, grad_accum=1, world_size=1, total_steps=100, use_gpu=False,
                           precision="fp32")
    assert cfg["scheduler"]["type"] == "WarmupLR"
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = getattr(schedules, cfg["scheduler"]["type"])(optimizer, **cfg["scheduler"]["params"])
    for _ in range(50):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_lr() == [pytest.approx(1e-3)]


def test_zero3_offload_and_passthrough_overrides():
    ds = DeepSpeedSection(zero_stage=3, offload_optimizer=True, offload_param=True,
                          overrides={"zero_optimization": {"stage3_max_live_parameters": 1000}, "prescale_gradients": True})
    zero = _config(ds)["zero_optimization"]
    assert zero["offload_param"]["device"] == "cpu" and zero["offload_optimizer"]["device"] == "cpu"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["stage3_max_live_parameters"] == 1000 and zero["stage"] == 3
    assert _config(ds)["prescale_gradients"] is True


def test_zero_buffers_are_sized_by_the_model_when_its_width_is_known():
    assert "reduce_bucket_size" not in _config()["zero_optimization"]  # DeepSpeed's own default
    assert _config(hidden_size=1024)["zero_optimization"]["reduce_bucket_size"] == 1024**2
    zero3 = _config(DeepSpeedSection(zero_stage=3), hidden_size=1024)["zero_optimization"]
    assert zero3["stage3_prefetch_bucket_size"] == int(0.9 * 1024**2)
    assert zero3["stage3_param_persistence_threshold"] == 10240
    assert "reduce_bucket_size" not in _config(DeepSpeedSection(zero_stage=0), hidden_size=1024)["zero_optimization"]
    big = DeepSpeedSection(zero_stage=3, overrides={"zero_optimization": {"reduce_bucket_size": 5e8}})
    assert _config(big, hidden_size=1024)["zero_optimization"]["reduce_bucket_size"] == 5e8  # an override wins


def test_bf16_is_deepspeeds_bf16_mode_on_gpus_and_autocast_on_cpus():
    from rayloop.train import hf_deepspeed_config

    gpu, cpu = _config(use_gpu=True, precision="bf16"), _config(precision="bf16")
    assert gpu["bf16"] == {"enabled": True} and "torch_autocast" not in gpu
    assert cpu["bf16"] == {"enabled": False} and cpu["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    # The Trainer fills DeepSpeed's bf16 mode from its own `bf16` argument; the CPU's autocast is passed through.
    trainer_cpu = hf_deepspeed_config(DeepSpeedSection(), use_gpu=False, precision="bf16")
    assert trainer_cpu["bf16"] == {"enabled": "auto"} and trainer_cpu["torch_autocast"]["enabled"] is True
    assert trainer_cpu["optimizer"]["params"]["torch_adam"] is True and "fused" not in trainer_cpu["optimizer"]["params"]
    assert "torch_autocast" not in hf_deepspeed_config(DeepSpeedSection(), use_gpu=True, precision="bf16")


def test_an_override_of_the_optimizer_drops_the_keys_it_would_refuse():
    def params(overrides):
        return _config(DeepSpeedSection(zero_stage=2, offload_optimizer=True,
                                        overrides=overrides))["optimizer"]["params"]

    fused = {"optimizer": {"params": {"fused": True}}}
    assert params(fused)["fused"] is True and params(fused)["torch_adam"] is True
    # DeepSpeed's CPUAdam (offload) takes no `fused`; another optimizer type takes neither key.
    assert "fused" not in params({"optimizer": {"params": {"torch_adam": False, "fused": True}}})
    assert params({"optimizer": {"type": "adamw", "params": {"fused": True}}})["fused"] is True
    lamb = params({"optimizer": {"type": "Lamb", "params": {"fused": True}}})
    assert "fused" not in lamb and "torch_adam" not in lamb and lamb["lr"] == 1e-3
    # DeepSpeed's Muon hands `torch_adam` to its auxiliary Adam (FusedAdam, which needs CUDA, otherwise).
    muon = params({"optimizer": {"type": "Muon", "params": {"fused": True}}})
    assert muon["torch_adam"] is True and "fused" not in muon
    assert "fused" not in _config(use_gpu=True)["optimizer"]["params"]  # DeepSpeed's FusedAdam


def test_a_loaded_checkpoint_keeps_the_kernel_this_run_chose():
    from types import SimpleNamespace

    from rayloop.train import restore_adamw_kernel

    weight = torch.nn.Parameter(torch.ones(3))
    per_tensor = torch.optim.AdamW([weight], lr=0.1)  # what a checkpoint from torch's default AdamW holds
    weight.grad = torch.ones(3)
    per_tensor.step()
    fused = torch.optim.AdamW([weight], lr=0.1, fused=True)
    fused.load_state_dict(per_tensor.state_dict())
    assert fused.param_groups[0]["fused"] is None  # torch replaced the group with the saved one
    restore_adamw_kernel(SimpleNamespace(optimizer=SimpleNamespace(optimizer=fused)))  # as DeepSpeed wraps it
    assert fused.param_groups[0]["fused"] is True
    before = weight.detach().clone()
    fused.step()
    assert not torch.equal(weight.detach(), before)
    # And back: a run without the override resumed from a checkpoint written with it steps the default kernel.
    per_tensor.load_state_dict(fused.state_dict())
    assert per_tensor.param_groups[0]["fused"] is True
    restore_adamw_kernel(per_tensor)
    assert per_tensor.param_groups[0]["fused"] is None
    # The multi-tensor choice travels in the group the same way.
    foreach = torch.optim.AdamW([weight], lr=0.1, foreach=True)
    foreach.load_state_dict(per_tensor.state_dict())
    assert foreach.param_groups[0]["foreach"] is None
    restore_adamw_kernel(foreach)
    assert foreach.param_groups[0]["foreach"] is True
    per_tensor.step()


def test_shards_are_disjoint_equal_and_cover():
    blocks = torch.arange(11).view(11, 1)
    shards = [shard_blocks(blocks, r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    flat = torch.cat(shards).flatten().tolist()
    assert len(set(flat)) == 9
    with pytest.raises(ValueError):
        shard_blocks(blocks[:2], 0, 3)


def test_rerunning_a_run_name_says_it_continues_that_run(tmp_path):
    from rayloop.train import resume_notice

    run = tmp_path / "sft-tiny"
    run.mkdir()
    assert resume_notice(str(run)) is None  # a new run: nothing to say
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    notice = resume_notice(str(run))
    assert notice.startswith(f"sft-tiny: continuing the existing run at {run}") and "--storage.name" in notice


def test_final_checkpoint_keeps_the_scheme_that_ray_trains_checkpoint_path_drops(tmp_path):
    from types import SimpleNamespace

    from rayloop.config import StorageSection
    from rayloop.train import final_checkpoint

    # Ray Train's Checkpoint.path for s3:// storage is "bucket/prefix/...", without the scheme.
    result = SimpleNamespace(checkpoint=SimpleNamespace(path="bucket/runs/sft/checkpoint_2026-01-01_00-00-00.0/"))
    s3 = StorageSection(path="s3://bucket/runs", name="sft")
    assert final_checkpoint(result, s3) == "s3://bucket/runs/sft/checkpoint_2026-01-01_00-00-00.0"
    local = StorageSection(path=str(tmp_path), name="sft")
    (tmp_path / "sft" / "tensorboard").mkdir(parents=True)
    (tmp_path / "sft" / "tensorboard" / "loss.png").write_bytes(b"png")
    result = SimpleNamespace(checkpoint=SimpleNamespace(path=str(tmp_path / "sft" / "checkpoint_1")))
    assert final_checkpoint(result, local, plot="loss.png") == str(tmp_path / "sft" / "checkpoint_1")
    assert (tmp_path / "sft" / "checkpoint_1" / "loss.png").read_bytes() == b"png"  # the curve beside it


def _zero3_rank(rank: int, world: int, port: int, folder: str, out: str) -> None:
    """One rank of a 2-process gloo group: build the model partitioned, wrap it, gather it; recording how many
    parameters each of DeepSpeed's gathers held at once."""
    import os

    import deepspeed
    import torch.distributed as dist

    from rayloop.config import DeepSpeedSection, OptimSection
    from rayloop.models import hidden_size
    from rayloop.train import deepspeed_config, gathered_state_dict, load_partitioned

    gathered_at_once = []

    class Recording(deepspeed.zero.GatheredParameters):
        def __init__(self, params, *args, **kwargs):
            gathered_at_once.append(len(params))
            super().__init__(params, *args, **kwargs)

    deepspeed.zero.GatheredParameters = Recording

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    config = deepspeed_config(DeepSpeedSection(zero_stage=3), OptimSection(lr=1e-3), micro_batch_size=2,
                              grad_accum=1, world_size=world, total_steps=1, use_gpu=False, precision="fp32",
                              hidden_size=hidden_size(folder))
    model, _ = load_partitioned(folder, config, torch.float32)
    loading, gathered_at_once[:] = list(gathered_at_once), []
    # Built partitioned: no rank holds a whole parameter, each holds its share.
    local = {n: (p.numel(), p.ds_tensor.numel(), p.ds_numel) for n, p in model.named_parameters()}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
    state = gathered_state_dict(engine)
    torch.save({"local": local, "state": state, "bucket": engine.optimizer.reduce_bucket_size, "loading": loading,
                "saving": gathered_at_once}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_zero3_builds_partitioned_and_saves_whole_weights_on_rank_0_alone(tmp_path):
    import socket

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from rayloop.models import create_model_folder

    folder = create_model_folder("tiny", ["12+34=046", "5+6=011"] * 50, tmp_path / "model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_zero3_rank, args=(2, port, str(folder), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for name, (numel, share, whole) in ranks[0]["local"].items():
        assert numel == 0 and 0 < share < whole, name  # built under zero.Init, never whole on a rank
        assert share + ranks[1]["local"][name][1] >= whole, name
    assert ranks[1]["state"] is None
    for rank in ranks:  # one parameter at a time, never the whole model, when loading and when saving
        assert len(rank["loading"]) == len(rank["local"]) and set(rank["loading"]) == {1}
        assert len(rank["saving"]) == len(rank["local"]) and set(rank["saving"]) == {1}
    assert ranks[0]["bucket"] == 128 * 128  # DeepSpeed took the bucket sized by the model (tiny: width 128)
    saved = load_file(folder / "model.safetensors")
    state = ranks[0]["state"]
    assert set(saved) <= set(state)  # and the tied output layer besides
    for name, tensor in saved.items():  # the weights read into the partitions come back whole and unchanged
        assert torch.equal(state[name], tensor), name
