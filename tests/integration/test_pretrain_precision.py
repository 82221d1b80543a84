"""The two precisions of rayloop's DeepSpeed engine on a CPU, for real: the same tiny model, seed and batches in
fp32 and in bf16 (autocast), in a process of their own (DeepSpeed keeps global state)."""

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

TRAIN = textwrap.dedent("""
    import json, os, sys
    sys.path[:0] = [{root!r}, {root!r} + "/platform"]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed, torch
    from jobs.pretrain import batch_at
    from rayloop.config import DeepSpeedSection, OptimSection
    from rayloop.data import pack_blocks
    from rayloop.models import create_model_folder, load_model
    from rayloop.precision import logits_in_fp32
    from rayloop.tasks import ArithmeticTask
    from rayloop.train import deepspeed_config, restore_adamw_kernel

    torch.distributed.init_process_group("gloo")
    task = ArithmeticTask()
    folder = create_model_folder("tiny", task.pretrain_corpus(), sys.argv[3], seed=0)
    torch.manual_seed(0)
    model, tokenizer = load_model(str(folder))
    blocks = pack_blocks(task.pretrain_corpus(), tokenizer, 64)
    matmul_dtypes, logits_dtypes = set(), set()
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, out: matmul_dtypes.add(str(out.dtype)))
    model.lm_head.register_forward_hook(lambda m, i, out: logits_dtypes.add(str(out.dtype)))
    if sys.argv[1] == "bf16":
        logits_in_fp32(model)  # as the jobs do under CPU autocast
    # torch's fused AdamW kernel is chosen by an override; the default config steps torch's per-tensor loop.
    overrides = {{"optimizer": {{"params": {{"fused": True}}}}}} if sys.argv[4] == "fused" else {{}}
    config = deepspeed_config(DeepSpeedSection(zero_stage=2, overrides=overrides), OptimSection(lr=5e-3, warmup_steps=5),
                              micro_batch_size=16, grad_accum=1, world_size=1, total_steps=30, use_gpu=False,
                              precision=sys.argv[1])
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    losses = []
    for i in range(30):
        batch = batch_at(blocks, i, 16, 0)
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    # A checkpoint written by the other kernel, loaded into this engine as a resume does.
    adamw = engine.optimizer.optimizer  # ZeRO-2's torch optimizer
    fused_while_training = [group["fused"] for group in adamw.param_groups]
    for group in adamw.param_groups:
        group["fused"] = None if group["fused"] else True
    engine.save_checkpoint(sys.argv[3] + "-checkpoint", tag="state")
    for group, fused in zip(adamw.param_groups, fused_while_training):
        group["fused"] = fused
    engine.load_checkpoint(sys.argv[3] + "-checkpoint", tag="state")
    fused_as_loaded = [group["fused"] for group in adamw.param_groups]
    restore_adamw_kernel(engine.optimizer)
    print(json.dumps({{"losses": losses, "matmul_dtypes": sorted(matmul_dtypes),
                      "fused": [fused_while_training, fused_as_loaded, [g["fused"] for g in adamw.param_groups]],
                      "logits_dtypes": sorted(logits_dtypes),
                      "zero_stage": engine.zero_optimization_stage(),
                      "loss_dtype": str(loss.dtype),
                      "param_dtypes": sorted({{str(p.dtype) for p in engine.module.parameters()}})}}))
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(precision: str, tmp_path, adamw: str = "default") -> dict:
    port = free_port()
    done = subprocess.run([sys.executable, "-c", TRAIN.format(root=str(ROOT)), precision, str(port),
                           str(tmp_path / f"model-{precision}-{adamw}"), adamw],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_bf16_on_a_cpu_multiplies_in_bf16_keeps_fp32_weights_and_learns_as_fp32_does(tmp_path):
    fp32, bf16 = train("fp32", tmp_path), train("bf16", tmp_path)
    # ZeRO-2, the jobs' default, whose gradient reduction under autocast (bf16 for the linear layers) runs here.
    assert fp32["zero_stage"] == bf16["zero_stage"] == 2
    assert fp32["matmul_dtypes"] == ["torch.float32"] and bf16["matmul_dtypes"] == ["torch.bfloat16"]
    assert bf16["logits_dtypes"] == ["torch.float32"]  # the output layer runs outside autocast
    # Autocast, not bf16 weights: master weights, gradients and optimizer state stay fp32; the loss too.
    assert bf16["param_dtypes"] == ["torch.float32"] and bf16["loss_dtype"] == "torch.float32"
    first, last = bf16["losses"][0], sum(bf16["losses"][-5:]) / 5
    assert last < 0.7 * first, bf16["losses"]
    fp32_last = sum(fp32["losses"][-5:]) / 5
    assert abs(last - fp32_last) < 0.05 * fp32_last, (fp32["losses"][-5:], bf16["losses"][-5:])
    # Each run steps the AdamW kernel its own config chose, and still does after a resume from a checkpoint written
    # by the other: torch's per-tensor loop by default, the fused kernel with the override.
    assert fp32["fused"] == bf16["fused"] == [[None], [True], [None]]
    fused = train("bf16", tmp_path, adamw="fused")
    assert fused["fused"] == [[True], [None], [True]]
    assert sum(fused["losses"][-5:]) / 5 < 0.7 * fused["losses"][0], fused["losses"]
