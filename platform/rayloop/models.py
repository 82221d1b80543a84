"""Model factory: a locally trained byte-level BPE tokenizer and Llama-family causal LMs from named presets.

Nothing is downloaded: presets are built from a config and random weights; any local HF folder works in their place.
Every folder this module writes is a plain `save_pretrained` folder that transformers and vLLM load unchanged.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

# Llama-family shapes. `tiny` is for tests (~1M parameters), `small` the CPU benchmark size (~28M, as in STACK.md),
# `125m` the GPU benchmark size, `350m` bench/memory.py's (large enough that a whole copy of it shows). A real 7B
# model is a local HF folder, not a preset.
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=512),
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, max_position_embeddings=1024),
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, max_position_embeddings=2048),
    "350m": dict(hidden_size=1024, intermediate_size=3328, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=16, max_position_embeddings=2048),
}

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# Chat template: role marker, content, EOS. The `{% generation %}` block marks what the assistant writes, so TRL can
# train on assistant tokens only (assistant_only_loss).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|assistant|>' }}{% generation %}{{ message['content'] + '</s>' }}"
    "{% endgeneration %}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '</s>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on `texts`; digits are split one by one so numbers tokenize uniformly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # BOS first, as Llama tokenizers do: a prompt then starts the way every training document started.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
        model_max_length=max(p["max_position_embeddings"] for p in PRESETS.values()),
    )


def build_model(preset: str, tokenizer, seed: int = 0):
    """A randomly initialised LlamaForCausalLM of the preset's shape, sized to the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = -(-len(tokenizer) // 64) * 64  # round up: friendlier matmul shapes, spare ids cost nothing
    config = LlamaConfig(
        vocab_size=vocab,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="float32",
        **PRESETS[preset],
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def save_hf_folder(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """`save_pretrained` model and tokenizer into out_dir atomically: written beside it, then renamed into place.

    A crash half-way leaves either the previous folder or none, never a half-written one.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def create_model_folder(preset: str, texts: Iterable[str], out_dir: str | os.PathLike, *, vocab_size: int = 512,
                        seed: int = 0) -> Path:
    """Train a tokenizer on `texts`, build the preset, save both as one HF folder."""
    tokenizer = train_tokenizer(texts, vocab_size)
    model = build_model(preset, tokenizer, seed)
    return save_hf_folder(model, tokenizer, out_dir)


def load_model(path: str | os.PathLike, dtype=None, device=None):
    """Model and tokenizer from an HF folder, local or in storage (copied to this node's cache); no hub access.
    `device`: where the model is put (`evaluation_device()` for a scoring task); None leaves it on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayloop.storage import local_copy, training_state

    path = local_copy(str(path), exclude=training_state)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    # device_map: the weights load onto `device` directly, never whole in host memory first.
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype, device_map=device)
    return model, tokenizer


def evaluation_device() -> str:
    """Where Ray is initialised, "cuda:0" when Ray gave this task or actor a GPU (device 0 as it sees its GPUs), else
    "cpu" (a driver holds no GPU); without Ray, "cuda" where the process sees a GPU. Ray leaves CUDA_VISIBLE_DEVICES
    alone for a task that asked for no GPU, so CUDA alone would put a CPU task's model on GPU 0 of its node; Ray is
    asked first, so that a CPU task never initialises CUDA. The index is explicit because transformers reads a bare
    "cuda" device map as the GPU of LOCAL_RANK, which need not be one this task holds."""
    import ray

    if ray.is_initialized():
        return "cuda:0" if ray.get_gpu_ids() and _cuda_available() else "cpu"
    return "cuda" if _cuda_available() else "cpu"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def latest_registered_checkpoint(run_dir: str) -> str | None:
    """The newest checkpoint that Ray Train registered in a run folder (local or a URI), from Ray Train's own record
    of the run (`Result.from_path`); None when `run_dir` is no Ray Train run or holds no checkpoint yet.

    A `checkpoint_*` folder that a crash left half-written is in storage but not in that record, so it never wins."""
    from rayloop import storage

    if not storage.is_file(storage.join(run_dir, "checkpoint_manager_snapshot.json")):
        return None
    import logging

    from ray.train import Result

    # Reading the record logs, at INFO, advice for a trainer about to resume the run, which this is not.
    ray_train_log = logging.getLogger("ray.train")
    level = ray_train_log.level
    ray_train_log.setLevel(logging.WARNING)
    try:
        result = Result.from_path(run_dir)
    finally:
        ray_train_log.setLevel(level)
    if result.checkpoint is None:
        return None
    return storage.join(run_dir, result.checkpoint.path.rstrip("/").rsplit("/", 1)[-1])


def resolve_model_folder(path: str | os.PathLike) -> str:
    """The HF folder behind `path`, a local path or a URI (`s3://...`): the folder itself, a Ray Train checkpoint of
    a rayloop job (its `hf/`, a LoRA run's `merged/` or TRL's `checkpoint/`), or a run folder (its newest registered
    checkpoint). Raises ValueError saying what was looked for."""
    from rayloop import storage

    root = storage.normalize(path)
    for checkpoint in (root, latest_registered_checkpoint(root)):
        if checkpoint is None:
            continue
        # merged/: a LoRA run's final model, its adapter merged in (adapter/ holds the adapter alone).
        for candidate in (checkpoint, storage.join(checkpoint, "hf"), storage.join(checkpoint, "merged"),
                          storage.join(checkpoint, "checkpoint")):
            if storage.is_file(storage.join(candidate, "config.json")):
                return candidate
    raise ValueError(f"no model at {str(path)!r}: expected an HF folder (config.json), a checkpoint holding hf/ or "
                     f"checkpoint/, or a Ray Train run folder with a registered checkpoint")


class SafetensorsFolder:
    """The tensors of a folder's `*.safetensors` files, each read on request by plain file reads into a new tensor.

    safetensors' `safe_open` memory-maps the whole file: every page a read touches stays in the process's resident
    set until the map closes, so reading a model tensor by tensor through it ends holding the whole file. Here only
    the tensor asked for is resident, and only while its caller keeps it."""

    DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}

    def __init__(self, folder: str | os.PathLike):
        import json

        self.index: dict[str, tuple[Path, str, list[int], int, int]] = {}
        for file in sorted(Path(folder).glob("*.safetensors")):
            with open(file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            for name, info in header.items():
                if name != "__metadata__":
                    start, end = info["data_offsets"]
                    self.index[name] = (file, info["dtype"], info["shape"], 8 + size + start, end - start)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def get_tensor(self, name: str):
        import torch

        file, dtype, shape, offset, size = self.index[name]
        tensor = torch.empty(shape, dtype=getattr(torch, self.DTYPES[dtype]))
        into = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        with open(file, "rb", buffering=0) as f:
            f.seek(offset)
            done = 0
            while done < size:
                read = f.readinto(into[done:])
                if not read:
                    raise ValueError(f"{file}: {name} ends past the end of the file")
                done += read
        return tensor


def model_config(path: str) -> dict:
    """The `config.json` of the model at `path` (a folder, local or in storage, or a run folder), read alone."""
    import json

    from rayloop import storage

    return json.loads(storage.read_text(storage.join(resolve_model_folder(path), "config.json")))


def hidden_size(path: str) -> int | None:
    """The width of the model at `path` (of its text model, for a multimodal one), from its config alone; None
    where the architecture has no such notion."""
    from transformers import AutoConfig

    return getattr(AutoConfig.for_model(**model_config(path)).get_text_config(), "hidden_size", None)


def linear_module_names(path: str) -> set[str]:
    """The names (last component, as peft's `target_modules` matches them) of the linear layers of the model at
    `path`, from its config alone: the model is built on the meta device, no weights read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = model_config(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
