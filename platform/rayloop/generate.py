"""Offline generation with vLLM, run as a Ray task so it lands on a GPU node when there is one."""

from __future__ import annotations

from rayloop.config import GenerateSection


def vllm_generate(model_dir: str, prompts: list[str], gen: GenerateSection) -> list[dict]:
    """Completions of `prompts` from the HF folder `model_dir`, in order, as {"text", "token_ids"} of the first
    completion and "texts" and "all_token_ids" of all `gen.samples_per_prompt`.

    Call under a `__main__` guard or in a Ray task: vLLM's engine spawns processes (STACK.md trap 3)."""
    return vllm_generate_each(model_dir, prompts, [gen])[0]


def vllm_generate_each(model_dir: str, prompts: list[str], gens: list[GenerateSection]) -> list[list[dict]]:
    """`vllm_generate` once per sampling setting in `gens`, from one engine (its settings are the first's; each
    setting's `lora_path` adapter is applied to its own requests)."""
    import json
    from pathlib import Path

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from rayloop.storage import local_copy, training_state

    gen, engine_lora, requests = gens[0], {}, {}
    adapters = sorted({each.lora_path for each in gens if each.lora_path is not None})
    if adapters:
        folders = [local_copy(path, exclude=training_state) for path in adapters]
        rank = max(json.loads(Path(folder, "adapter_config.json").read_text())["r"] for folder in folders)
        # vLLM sizes its LoRA buffers for one of a fixed set of ranks: the smallest that holds these adapters.
        from typing import get_args

        from vllm.config.lora import MaxLoRARanks

        fits = [r for r in get_args(MaxLoRARanks) if r >= rank]
        if not fits:
            raise ValueError(f"LoRA rank {rank} is above vLLM's largest, {max(get_args(MaxLoRARanks))}")
        engine_lora = dict(enable_lora=True, max_loras=len(adapters), max_lora_rank=min(fits))
        requests = {path: LoRARequest(f"adapter-{i}", i + 1, folder)
                    for i, (path, folder) in enumerate(zip(adapters, folders))}
    llm = LLM(
        model=local_copy(model_dir, exclude=training_state),
        dtype=gen.dtype,
        max_model_len=gen.max_model_len,
        kv_cache_memory_bytes=int(gen.kv_cache_memory_bytes),
        enforce_eager=gen.enforce_eager,
        seed=0,
        **engine_lora,
    )
    results = []
    try:
        for each in gens:
            params = SamplingParams(max_tokens=each.max_tokens, temperature=each.temperature,
                                    n=each.samples_per_prompt, seed=0)
            outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=requests.get(each.lora_path))
            results.append([{"text": out.outputs[0].text, "token_ids": list(out.outputs[0].token_ids),
                             "texts": [sample.text for sample in out.outputs],
                             "all_token_ids": [list(sample.token_ids) for sample in out.outputs]} for out in outputs])
    finally:
        # Now, not when the garbage collector gets to `llm`: what the caller runs next in this task (a reward model
        # scoring the completions) needs the memory the engine holds, on the GPU or on the node. Shutdown stops the
        # engine's process; with vLLM's in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0) the weights go with `llm`.
        llm.llm_engine.engine_core.shutdown()
        del llm
    return results


def generate_on_ray(model_dir: str, prompts: list[str], gen: GenerateSection | list[GenerateSection], *,
                    use_gpu: bool = False) -> list[dict] | list[list[dict]]:
    """vllm_generate (vllm_generate_each for a list of settings) in a Ray task holding one GPU (use_gpu) or one
    CPU. Ray must be initialised."""
    if isinstance(gen, list):
        return run_with_vllm(vllm_generate_each, model_dir, prompts, gen, use_gpu=use_gpu)
    return run_with_vllm(vllm_generate, model_dir, prompts, gen, use_gpu=use_gpu)


def vllm_task(fn, use_gpu: bool = False):
    """`fn` as a Ray task that starts a vLLM engine, holding one GPU (use_gpu) or one CPU."""
    import ray

    # max_calls=1: the worker exits after the task, so the engine's memory is freed now, not when Ray reaps an
    # idle worker: a later vLLM engine on the node needs that memory for its KV cache.
    return ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0, max_retries=0, max_calls=1,
                      runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": "WARNING"}})(fn)


def run_with_vllm(fn, *args, use_gpu: bool = False):
    """`fn(*args)`, which starts a vLLM engine, in a Ray task of its own holding one GPU (use_gpu) or one CPU."""
    import ray

    return ray.get(vllm_task(fn, use_gpu).remote(*args))
