"""Probe: how far the demo's SFT gets in its step budget, per precision and AdamW kernel, from one start.

    .venv/bin/python bench/sft_plateau.py --model ~/rayloop-runs/pipeline-tiny/<checkpoint>/hf
    .venv/bin/python bench/sft_plateau.py --model ... --weight-decay 0.1 --num-train 8000

Not a speed benchmark: it measures the numbers the demo's SFT figure depends on. The demo's held-out exact match
sits on a plateau of variable length followed by a steep climb, so a change of rounding (fp32, bf16 autocast, torch's
fused AdamW) moves where the climb lands at the last step. Each variant trains TRL's SFTTrainer on the task's
prompt/completion pairs from the same pretrained model with the same seed and data order, in one process on every
core (no Ray, no DeepSpeed: the variants then differ only in their arithmetic), and measures greedy exact match on the
1000 held-out problems every `--eval-every` steps and at the last. fp32 is the baseline, from the same start. Figures
go to bench/results/sft_plateau.json (one record per variant and recipe, appended) and are printed.

What it is not: the jobs' numbers. It scores each variant in its own precision (bf16 under autocast, which
accelerate applies to the model's forward) with 5 new tokens, where the jobs score the saved fp32 weights with 8; its
AdamW (the Trainer's) leaves norm weights undecayed, where DeepSpeed's decays every parameter; and it has no ZeRO-2
gradient reduction, which under the jobs' CPU autocast runs in bf16 for the linear layers. TRL's defaults stand
otherwise (gradient checkpointing on, which recomputes the forward). Compare its variants with one another.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "platform")]

VARIANTS = {  # name: (precision, torch's fused AdamW)
    "fp32": ("fp32", False),
    "bf16": ("bf16", False),
    "bf16-fused": ("bf16", True),
}


def run(variant: str, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from rayloop.config import TaskSection
    from rayloop.precision import logits_in_fp32
    from rayloop.tasks import ArithmeticTask, accuracy

    precision, fused = VARIANTS[variant]
    bf16 = precision == "bf16"
    task = ArithmeticTask(TaskSection(max_digits=2, ops=["+"], num_train=args.num_train, num_eval=1000))
    held_out = task.eval_examples()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model)
    if bf16:
        # The held-out eval's logits in fp32, as pretraining computes them; TRL's training loss reads the output
        # layer's weight itself, so this touches the eval only.
        logits_in_fp32(model)
    prompts = tokenizer([e["prompt"] for e in held_out], return_tensors="pt", padding=True)
    curve: list[tuple[int, float]] = []

    def exact_match() -> float:
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model.generate(**prompts, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        model.train()
        completions = tokenizer.batch_decode(out[:, prompts["input_ids"].shape[1]:], skip_special_tokens=True)
        return accuracy(completions, [e["answer"] for e in held_out])

    class Measure(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step % args.eval_every == 0 or state.global_step == state.max_steps:
                curve.append((state.global_step, round(exact_match(), 3)))
                print(f"{variant}: step {state.global_step}, held-out exact match {curve[-1][1]:.3f}", flush=True)

    # The demo's SFT recipe (jobs/configs/sft_tiny.yaml: 2 workers x 32 = 64 per step), but TRL's default
    # `adamw_torch[_fused]` in place of DeepSpeed's AdamW.
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(output_dir=args.scratch, max_steps=args.steps, per_device_train_batch_size=args.batch,
                       learning_rate=args.lr, weight_decay=args.weight_decay, warmup_steps=10,
                       lr_scheduler_type="cosine", max_grad_norm=1.0, logging_steps=50, save_strategy="no",
                       report_to=[], use_cpu=True, bf16=bf16, seed=args.seed, data_seed=args.seed, disable_tqdm=True,
                       optim="adamw_torch_fused" if fused else "adamw_torch"),
        train_dataset=Dataset.from_list(task.sft_examples()),
        processing_class=tokenizer,
        callbacks=[Measure()],
    )
    started = time.perf_counter()
    trainer.train()
    return {"variant": variant, "model": args.model, "lr": args.lr, "weight_decay": args.weight_decay, "num_train": args.num_train,
            "steps": args.steps, "seed": args.seed, "exact_match_curve": curve,
            "seconds": round(time.perf_counter() - started)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="a pretrained HF folder: the demo's pretrain checkpoint/hf")
    parser.add_argument("--variants", default="fp32,bf16,bf16-fused")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--scratch", default="/tmp/rayloop-sft-plateau")
    parser.add_argument("--out", default=str(ROOT / "bench/results/sft_plateau.json"))
    args = parser.parse_args()
    args.model = os.path.expanduser(args.model)

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    results = [run(v, args) for v in args.variants.split(",")]
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(previous + results, indent=1) + "\n")
    print(f"\nheld-out exact match at the last step (lr {args.lr}, weight decay {args.weight_decay}, "
          f"{args.num_train} training problems, {args.steps} steps):")
    for r in results:
        print(f"  {r['variant']:<11} {r['exact_match_curve'][-1][1]:.3f}   curve {r['exact_match_curve']}")
    print(f"figures appended to {out}")


if __name__ == "__main__":
    main()
