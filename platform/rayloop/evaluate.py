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
    from rayloop.models import evaluation_device, load_model
    from rayloop.tasks import score

    model, tokenizer = load_model(model_dir, device=evaluation_device())
    completions = greedy_completions(model, tokenizer, [e["prompt"] for e in examples], max_new_tokens)
    return [score(c, e["answer"]) for c, e in zip(completions, examples)]


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

    return ray.get(_eval_task(fn, use_gpu).remote(*args, **kwargs))


def _eval_task(fn, use_gpu: bool):
    import ray

    return ray.remote(num_cpus=1, num_gpus=int(use_gpu), max_retries=0)(fn)


def on_ray_each(fn, model_dirs: list[str], *args, use_gpu: bool = False) -> list:
    """`fn(model_dir, *args)` for each folder, in tasks as on_ray's, side by side where Ray can (side_by_side)."""
    return side_by_side(_eval_task(fn, use_gpu), model_dirs, *args, use_gpu=use_gpu)


def side_by_side(task, model_dirs: list[str], *args, use_gpu: bool = False, extra_bytes: int = 0) -> list:
    """`task.remote(model_dir, *args)` for each folder, all submitted at once, so that Ray runs them side by side
    where the cluster has a CPU (or GPU) and the memory for each, in turn where it has not. On a CPU each asks for
    its weights as float32 (up to twice their files, which may hold bf16) plus `extra_bytes` (vLLM's KV cache), so
    that two copies of a large model never load on a node without room for both; on a GPU the weights load there.
    One failing cancels the others, whose engines would otherwise hold their GPUs until they finish."""
    import ray

    refs = [task.options(memory=0 if use_gpu else 2 * _weights_bytes(d) + extra_bytes).remote(d, *args)
            for d in model_dirs]
    try:
        return ray.get(refs)
    except BaseException:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise


def _weights_bytes(model_dir: str) -> int:
    from rayloop import storage
    from rayloop.models import resolve_model_folder

    return storage.weights_bytes(resolve_model_folder(model_dir))


def compare_exact_match(before_dir: str, after_dir: str, examples: list[dict], *, use_gpu: bool = False) -> dict:
    """Paired held-out exact-match accuracy of two model folders (Ray must be initialised)."""
    return compare_on_ray(exact_match_scores, before_dir, after_dir, examples, use_gpu=use_gpu)


# ---------------------------------------------------------------------------------------------------------------
# The user's held-out data (rayloop.dataset): rows in one of TRL's formats, rendered as TRL renders them
# ---------------------------------------------------------------------------------------------------------------


def render(rows: list[dict], tokenizer) -> list[dict]:
    """Rows as TRL's trainers see them: an implicit preference prompt split off (the shared start), conversational
    columns rendered to text through the tokenizer's chat template."""
    from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt

    return [maybe_apply_chat_template(maybe_extract_prompt(dict(row)), tokenizer) for row in rows]


def _sequence_logprobs(model, tokenizer, prompt: str, completion: str) -> tuple[float, int]:
    """(sum of log p, tokens) of `completion` + EOS after `prompt` (an empty prompt: every token after the first)."""
    import torch

    prompt_ids = tokenizer(prompt)["input_ids"] if prompt else []
    completion_ids = tokenizer(completion, add_special_tokens=not prompt)["input_ids"]
    if completion_ids[-1:] != [tokenizer.eos_token_id]:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + completion_ids], device=model.device)
    start = max(len(prompt_ids), 1)
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, start:]
    return logprobs[start - 1:].gather(-1, targets[:, None]).sum().item(), len(targets)


def loss_scores(model_dir: str, rows: list[dict]) -> list[float]:
    """Per held-out SFT row: the mean token loss (negative log-likelihood) of its completion (prompt-completion)
    or of the whole text (language modeling, conversational included), as SFTTrainer trains it."""
    from rayloop.models import evaluation_device, load_model

    model, tokenizer = load_model(model_dir, device=evaluation_device())
    model.eval()
    scores = []
    for row in render(rows, tokenizer):
        prompt, completion = (row["prompt"], row["completion"]) if "completion" in row else ("", row["text"])
        total, count = _sequence_logprobs(model, tokenizer, prompt, completion)
        scores.append(-total / count)
    return scores


def preference_margins(model_dir: str, rows: list[dict]) -> list[float]:
    """Per held-out preference row: log p(chosen) - log p(rejected) under the policy (a DPO model ranks the
    pair right when it is positive)."""
    from rayloop.models import evaluation_device, load_model

    model, tokenizer = load_model(model_dir, device=evaluation_device())
    model.eval()
    return [_sequence_logprobs(model, tokenizer, r["prompt"], r["chosen"])[0]
            - _sequence_logprobs(model, tokenizer, r["prompt"], r["rejected"])[0] for r in render(rows, tokenizer)]


def reward_margins(model_dir: str, rows: list[dict]) -> list[float]:
    """Per held-out preference row: score(chosen) - score(rejected) of a reward model, each text ending in EOS as
    RewardTrainer trains it (the score is read at the last token). A causal LM start gets a fresh scoring head,
    seeded, so the figure before training is that of a random head (drawn on the scoring device: a GPU draws
    another head than a CPU)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rayloop.models import evaluation_device
    from rayloop.storage import local_copy, training_state

    folder = local_copy(model_dir, exclude=training_state)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1,
                                                               device_map=evaluation_device()).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id

    def score(text: str) -> float:
        if not text.endswith(tokenizer.eos_token):  # a chat template ends each turn with it already
            text += tokenizer.eos_token
        with torch.no_grad():
            return model(**tokenizer(text, return_tensors="pt").to(model.device)).logits[0, 0].item()

    return [score(r["prompt"] + r["chosen"]) - score(r["prompt"] + r["rejected"]) for r in render(rows, tokenizer)]


def compare_on_ray(score_fn, before_dir: str, after_dir: str, rows: list[dict], *, use_gpu: bool = False) -> dict:
    """Paired per-row figures of two model folders, each scored in a Ray task."""
    return paired_difference(*on_ray_each(score_fn, [before_dir, after_dir], rows, use_gpu=use_gpu))


def compare_preferences(score_fn, before_dir: str, after_dir: str, rows: list[dict], *,
                        use_gpu: bool = False) -> tuple[dict, dict]:
    """(margin, preference accuracy) of two folders on held-out pairs: `score_fn` gives each pair's chosen-minus-
    rejected margin; a pair is ranked right where its margin is positive."""
    before, after = on_ray_each(score_fn, [before_dir, after_dir], rows, use_gpu=use_gpu)
    return (paired_difference(before, after),
            paired_difference([float(m > 0) for m in before], [float(m > 0) for m in after]))


def reward_scores(specs: list, rows: list[dict], completions: list[list[str]],
                  completion_ids: list[list[list[int]]] | None = None) -> list[float]:
    """Per held-out prompt: the mean over its sampled completions of the weighted reward sum TRL optimises (a
    reward that answers None for a completion adds nothing, as in TRL). The rewards get TRL's keywords. Runs
    where the reward functions import."""
    from transformers import TrainerState

    from rayloop.rewards import reward_funcs

    funcs, weights = reward_funcs(specs)
    flat_rows = [row for row, outs in zip(rows, completions) for _ in outs]
    flat = [c for outs in completions for c in outs]
    flat_ids = [ids for per_row in completion_ids for ids in per_row] if completion_ids else [[] for _ in flat]
    conversational = bool(rows) and not isinstance(rows[0]["prompt"], str)
    if conversational:
        flat = [[{"role": "assistant", "content": c}] for c in flat]
    columns = {k: [r[k] for r in flat_rows] for k in flat_rows[0] if k not in ("prompt", "completion")}
    totals = [0.0] * len(flat)
    for func, weight in zip(funcs, weights):
        if callable(func):
            import asyncio
            import inspect

            kwargs = dict(prompts=[r["prompt"] for r in flat_rows], completions=flat, completion_ids=flat_ids,
                          trainer_state=TrainerState(), log_extra=lambda *a, **k: None,
                          log_metric=lambda *a, **k: None, **columns)
            values = asyncio.run(func(**kwargs)) if inspect.iscoroutinefunction(func) else func(**kwargs)
        else:  # a reward model folder
            values = _reward_model_scores(func, [r["prompt"] for r in flat_rows], flat)
        totals = [t + weight * v if v is not None and not math.isnan(v) else t for t, v in zip(totals, values)]
    scores, i = [], 0
    for outs in completions:
        scores.append(sum(totals[i: i + len(outs)]) / len(outs))
        i += len(outs)
    return scores


def _reward_model_scores(folder: str, prompts: list, completions: list) -> list[float]:
    """A reward model's scores as GRPOTrainer computes them: prompt + completion without added special tokens, a
    conversation rendered whole through the chat template."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl.data_utils import apply_chat_template

    from rayloop.models import evaluation_device

    model = AutoModelForSequenceClassification.from_pretrained(folder, device_map=evaluation_device()).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if isinstance(prompts[0], str):
        texts = [p + c for p, c in zip(prompts, completions)]
    else:
        texts = [apply_chat_template({"messages": p + c}, tokenizer)["text"] for p, c in zip(prompts, completions)]

    def score(text: str) -> float:
        with torch.no_grad():
            inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
            return model(**inputs).logits[0, 0].item()

    return [score(t) for t in texts]


def compare_rewards(specs: list, before_dir: str, after_dir: str, rows: list[dict], gens: list, *,
                    use_gpu: bool = False) -> list[dict]:
    """Paired held-out mean reward of two model folders' vLLM completions, one figure per sampling setting in
    `gens` (greedy, sampled, ...); each model's completions come from one engine and are scored in its task."""
    from rayloop.generate import vllm_task

    scores = side_by_side(vllm_task(generate_and_score, use_gpu), [before_dir, after_dir], rows, gens, specs,
                          use_gpu=use_gpu, extra_bytes=max(int(g.kv_cache_memory_bytes) for g in gens))
    return [paired_difference(before, after) for before, after in zip(*scores)]


def generate_and_score(model_dir: str, rows: list[dict], gens: list, specs: list) -> list[list[float]]:
    """Per sampling setting, per row: the mean reward of the model's completions of the row's prompt (rendered
    with the model's chat template where it is conversational)."""
    from rayloop.generate import vllm_generate_each

    prompts = [r["prompt"] for r in rows]
    if not isinstance(prompts[0], str):
        from transformers import AutoTokenizer

        from rayloop.storage import local_copy, training_state

        tokenizer = AutoTokenizer.from_pretrained(local_copy(model_dir, exclude=training_state))
        prompts = [r["prompt"] for r in render([{"prompt": p} for p in prompts], tokenizer)]
    outputs = vllm_generate_each(model_dir, prompts, gens)
    return [reward_scores(specs, rows, [o["texts"] for o in each], [o["all_token_ids"] for o in each])
            for each in outputs]


def describe(name: str, result: dict) -> str:
    return (f"{name} {result['before']:.1%} -> {result['after']:.1%} (difference {result['difference']:+.1%}, "
            f"95% CI [{result['ci_low']:+.1%}, {result['ci_high']:+.1%}], n={result['n']})")
