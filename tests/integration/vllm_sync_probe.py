"""Probe for test_posttrain: prints, as JSON, vLLM's next-token log-probabilities before and after a weight sync
through rayloop.posttrain.reload_weights_into_vllm, and the trainer-side model's. Usage: vllm_sync_probe.py MODEL_DIR"""

import json
import sys


def _vllm_follows_trainer_weights(model_dir: str) -> dict:
    """In a vLLM-CPU engine living in this process (as TRL's colocated one does), perturb every trainer-side weight
    (the linear layers vLLM-CPU repacks, the norms, and the embedding table that is also the tied output head) and
    sync through rayloop's path: vLLM's next-token log-probabilities must move from the old model's to exactly the
    new model's."""
    import torch
    from types import SimpleNamespace

    from vllm import LLM, SamplingParams

    from rayloop.models import load_model
    from rayloop.posttrain import reload_weights_into_vllm

    model, tokenizer = load_model(model_dir)
    llm = LLM(model=model_dir, enforce_eager=True, dtype="float32", kv_cache_memory_bytes=64 << 20, max_model_len=64)
    ids = tokenizer("12+34=")["input_ids"]

    def vllm_logprobs():
        out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, logprobs=5, temperature=0),
                           use_tqdm=False)
        return {k: v.logprob for k, v in out[0].outputs[0].logprobs[0].items()}

    def trainer_logprobs(keys):
        with torch.no_grad():
            logprobs = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
        return {k: logprobs[k].item() for k in keys}

    before = vllm_logprobs()
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    stale = vllm_logprobs()
    reload_weights_into_vllm(SimpleNamespace(llm=llm, _iter_named_params=model.named_parameters))
    after = vllm_logprobs()
    return {"before": before, "stale": stale, "after": after, "expected": trainer_logprobs(after)}




if __name__ == "__main__":  # vLLM spawns processes (STACK.md trap 3)
    result = _vllm_follows_trainer_weights(sys.argv[1])
    print(json.dumps({k: {str(t): lp for t, lp in v.items()} for k, v in result.items()}))
