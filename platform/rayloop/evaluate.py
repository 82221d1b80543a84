"""Held-out evaluation of a model folder: exact-match accuracy of greedy answers, preference accuracy on pairs,
and a paired confidence interval for "did training raise it".

Per-example scores (not just means) are returned so before/after comparisons can be paired: the same problems are
scored twice, which removes the between-problem variance from the difference.
"""

from __future__ import annotations

import math


def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64,
                       synced_gpus: bool = False) -> list[str]:
    """Greedy completions with transformers' generate, left-padded batches, special tokens dropped.
    `synced_gpus`: keep every rank stepping together (ZeRO-3 gathers parameters collectively on each forward)."""
    import torch

    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[str] = []
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(prompts), batch_size):
                batch = tokenizer(prompts[i: i + batch_size], return_tensors="pt", padding=True).to(model.device)
                generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id, synced_gpus=synced_gpus)
                out += tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def exact_match_scores(model_dir: str, examples: list[dict], max_new_tokens: int = 8) -> list[float]:
    """1.0/0.0 per held-out {"prompt", "answer"}: the greedy completion is exactly the answer."""
    from rayloop.models import load_model
    from rayloop.tasks import score

    model, tokenizer = load_model(model_dir)
    completions = greedy_completions(model, tokenizer, [e["prompt"] for e in examples], max_new_tokens)
    return [score(c, e["answer"]) for c, e in zip(completions, examples)]


def completion_logprobs(model, tokenizer, prompts: list[str], completions: list[str]) -> list[float]:
    """Sum of log p(completion + EOS | prompt) per pair, under `model`."""
    import torch

    totals = []
    model.eval()
    with torch.no_grad():
        for prompt, completion in zip(prompts, completions):
            prompt_ids = tokenizer(prompt)["input_ids"]
            completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor([prompt_ids + completion_ids], device=model.device)
            logprobs = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            targets = ids[0, len(prompt_ids):]
            totals.append(logprobs[len(prompt_ids) - 1:].gather(-1, targets[:, None]).sum().item())
    return totals


def preference_scores(model_dir: str, pairs: list[dict]) -> list[float]:
    """1.0/0.0 per held-out {"prompt", "chosen", "rejected"}: the model gives the chosen answer more probability."""
    from rayloop.models import load_model

    model, tokenizer = load_model(model_dir)
    prompts = [p["prompt"] for p in pairs]
    chosen = completion_logprobs(model, tokenizer, prompts, [p["chosen"] for p in pairs])
    rejected = completion_logprobs(model, tokenizer, prompts, [p["rejected"] for p in pairs])
    return [float(c > r) for c, r in zip(chosen, rejected)]


def paired_difference(before: list[float], after: list[float], z: float = 1.96) -> dict[str, float]:
    """Means before and after, their difference, and its ~95% normal-approximation confidence interval, treating
    the per-example differences as the sample (a paired comparison on the same held-out examples)."""
    if len(before) != len(after) or not before:
        raise ValueError(f"paired scores need equal, non-zero lengths (got {len(before)} and {len(after)})")
    n = len(before)
    diffs = [a - b for a, b in zip(after, before)]
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / max(n - 1, 1)
    half = z * math.sqrt(var / n)
    return {"before": sum(before) / n, "after": sum(after) / n, "difference": mean,
            "ci_low": mean - half, "ci_high": mean + half, "n": n}


def on_ray(fn, *args, use_gpu: bool = False, **kwargs):
    """Run an evaluation function in a Ray task holding one CPU, or one GPU (the driver may be a small head node)."""
    import ray

    return ray.get(ray.remote(num_cpus=1, num_gpus=int(use_gpu), max_retries=0)(fn).remote(*args, **kwargs))


def compare_exact_match(before_dir: str, after_dir: str, examples: list[dict], *, use_gpu: bool = False) -> dict:
    """Paired held-out exact-match accuracy of two model folders (Ray must be initialised)."""
    before = on_ray(exact_match_scores, before_dir, examples, use_gpu=use_gpu)
    after = on_ray(exact_match_scores, after_dir, examples, use_gpu=use_gpu)
    return paired_difference(before, after)


def sampled_exact_match_scores(model_dir: str, examples: list[dict], gen, *, use_gpu: bool = False) -> list[float]:
    """Per held-out {"prompt", "answer"}: the fraction of `gen.samples_per_prompt` vLLM samples at
    `gen.temperature` that are exactly the answer; their mean is pass@1 at that temperature."""
    from rayloop.generate import generate_on_ray
    from rayloop.tasks import score

    outputs = generate_on_ray(model_dir, [e["prompt"] for e in examples], gen, use_gpu=use_gpu)
    return [sum(score(text, e["answer"]) for text in out["texts"]) / len(out["texts"])
            for out, e in zip(outputs, examples)]


def compare_sampled_exact_match(before_dir: str, after_dir: str, examples: list[dict], gen, *,
                                use_gpu: bool = False) -> dict:
    """Paired held-out sampled exact match (pass@1 at `gen.temperature`) of two model folders (Ray initialised)."""
    before = sampled_exact_match_scores(before_dir, examples, gen, use_gpu=use_gpu)
    after = sampled_exact_match_scores(after_dir, examples, gen, use_gpu=use_gpu)
    return paired_difference(before, after)


def describe(name: str, result: dict) -> str:
    return (f"{name} {result['before']:.1%} -> {result['after']:.1%} (difference {result['difference']:+.1%}, "
            f"95% CI [{result['ci_low']:+.1%}, {result['ci_high']:+.1%}], n={result['n']})")
