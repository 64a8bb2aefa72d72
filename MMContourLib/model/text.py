"""Text encoders: the clinical note -> N context embeddings g (N x D) that steer the U-Net.

* ``CausalLMPromptEncoder``: a frozen decoder-only LLM (Llama-2-7B-chat in production; any
  Llama-family model, from a Hugging Face folder or a GGUF file). N sets of M learnable prompt
  vectors follow BOS, then the note tokens, then a learned ``[SEG]`` embedding; the final-norm
  hidden state at ``[SEG]`` of each set is one context embedding (paper; docs/method.md).
  Under prompt template table5-v2 each side's part of a bilateral note is read on its own and
  gives its own N embeddings (2N for the note); a unilateral note keeps N.
* ``SentenceEncoderPromptEncoder``: the same with a bidirectional text tower (BERT / MiniLM /
  CLIP-text style), mean-pooled: the paper's CLIP baseline on the same code path.
* ``NoTextEncoder``: vision-only.

Only the prompt vectors and the ``[SEG]`` embedding are trainable; the LLM's own weights are
never modified nor saved (a bundle stores a fingerprint of them instead).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Protocol, Sequence

import torch
from torch import nn

from ..note.clinical import PROMPT_TEMPLATE_VERSION, check_prompt_template, prompt_clauses
from .llm import (INT8_NAMES, LLMMismatchError, LLMNotFoundError, display_name, fingerprint,
                  fingerprint_from_files, load_hf_model, parse_dtype)

__all__ = ["KINDS", "TextEncoderSpec", "TextEncoder", "TextEncoderLike", "NoTextEncoder", "CausalLMPromptEncoder",
           "SentenceEncoderPromptEncoder", "build_text_encoder", "stack_context", "LLMMismatchError", "LLMNotFoundError"]

KINDS = ("causal-lm", "encoder", "none")


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


# -- encoders -------------------------------------------------------------------------------------

class TextEncoderLike(Protocol):
    """What the Contourer, training and the benches use of a text encoder."""

    spec: TextEncoderSpec
    dim: int | None
    calls: int

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor | None: ...
    def encode(self, prompts: Sequence[str]) -> torch.Tensor | None: ...
    def is_cached(self, prompts: Sequence[str]) -> bool: ...
    def clear_cache(self) -> None: ...
    def move_llm(self, device: torch.device | str) -> None: ...
    def release_llm(self) -> None: ...
    def set_gradient_checkpointing(self, on: bool) -> None: ...


class TextEncoder(nn.Module):
    """Common interface. ``forward(prompts)`` -> (B, N, D) float32, or None for vision-only."""

    spec: TextEncoderSpec
    dim: int | None = None
    num_tokens: int = 0

    def __init__(self, template: str = PROMPT_TEMPLATE_VERSION):
        super().__init__()
        self.template = check_prompt_template(template)  # how a prompt is read (note.clinical.PROMPT_TEMPLATES)
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

    def _cache_keys(self, prompts: Sequence[str]) -> list[tuple[str, str, str, str]]:
        """(LLM fingerprint, prompt-vector hash, template, prompt text): an embedding is reused only for all four."""
        pv = self.prompt_vector_hash()
        return [(self.fingerprint, pv, self.template, p) for p in prompts]

    def is_cached(self, prompts: Sequence[str]) -> bool:
        """Whether ``encode(prompts)`` can answer without the LLM (always, for vision-only)."""
        return self.dim is None or all(k in self._cache for k in self._cache_keys(prompts))

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor | None:
        """Inference: cached (``_cache_keys``); runs the LLM once for all prompts not cached yet."""
        if self.dim is None:
            return None
        keys = self._cache_keys(prompts)
        missing = list(dict.fromkeys(p for k, p in zip(keys, prompts) if k not in self._cache))
        if missing:
            for k, g in zip(self._cache_keys(missing), self.forward(missing)):
                self._cache[k] = g.detach()
        result = stack_context([self._cache[k] for k in keys])
        for k in keys:
            self._cache.move_to_end(k)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return result

    def clear_cache(self) -> None:
        self._cache.clear()

    def move_llm(self, device: torch.device | str) -> None:
        """Move the frozen LLM (if any) to ``device``, loading it again if it was released."""

    def release_llm(self) -> None:
        """Free the frozen LLM (if any); the next new note loads it again."""

    def set_gradient_checkpointing(self, on: bool) -> None:
        """Recompute the frozen LLM's activations in the backward pass (if it has any)."""


def stack_context(tokens: Sequence[torch.Tensor]) -> torch.Tensor:
    """Notes' context embeddings (each (N_i, D)) -> (B, max N_i, D). A shorter one is repeated to the longest
    (a unilateral note's N beside a bilateral note's 2N): attention over repeated tokens is the same as over
    the originals (each repeated key brings its value as often as its weight), so the network's answer for
    a note does not depend on which notes share its batch."""
    longest = max(t.shape[0] for t in tokens)
    if any(longest % t.shape[0] for t in tokens):
        raise ValueError(f"cannot batch notes with {sorted({t.shape[0] for t in tokens})} context tokens")
    return torch.stack([t.repeat(longest // t.shape[0], 1) for t in tokens])


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
                 allow_download: bool = False, gradient_checkpointing: bool = False,
                 template: str = PROMPT_TEMPLATE_VERSION):
        super().__init__(template)
        device = torch.device(device)
        self.load_in_8bit = dtype in INT8_NAMES
        self.llm_dtype = parse_dtype(dtype, device)
        self._allow_download = allow_download
        spec.name = spec.name or display_name(spec.source)
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
        if not self.load_in_8bit:
            model.to(device)
        self._model_holder[0] = model
        if self._gradient_checkpointing:
            self.set_gradient_checkpointing(True)
        self._attach(model)

    def set_gradient_checkpointing(self, on: bool) -> None:
        was, self._gradient_checkpointing = self._gradient_checkpointing, on
        model = self._model_holder[0]
        if model is not None and hasattr(model, "gradient_checkpointing_enable"):
            if on:
                model.gradient_checkpointing_enable()
            elif was:
                model.gradient_checkpointing_disable()
            self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.llm_loaded:
            # Hugging Face models recompute activations only in training mode; the LLM has no dropout
            self.llm.train(mode and self._gradient_checkpointing)
        return self

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
        """prompts: B strings -> (B, N', D) float32, N' = N per part the template reads (``stack_context``).
        Gradients reach the prompt vectors, not the LLM."""
        if isinstance(prompts, str):
            prompts = [prompts]
        parts = [prompt_clauses(p, self.template) for p in prompts]
        texts = list(dict.fromkeys(c for clauses in parts for c in clauses))  # a part two notes share is read once
        g = self._read(texts)  # one LLM pass for all of them
        row = {t: i for i, t in enumerate(texts)}
        return stack_context([g[[row[c] for c in clauses]].reshape(-1, g.shape[-1]) for clauses in parts])

    def _read(self, prompts: Sequence[str]) -> torch.Tensor:
        """B texts -> (B, N, D): each text read once by the LLM after each set of prompt vectors."""
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
                       allow_download: bool = False, gradient_checkpointing: bool = False,
                       template: str = PROMPT_TEMPLATE_VERSION) -> TextEncoder:
    """Build the encoder a spec describes, reading prompts as ``template`` says (a bundle's own version).
    ``llm`` overrides where the model is found (its fingerprint must still match the spec's, when the
    spec has one)."""
    if spec.kind == "none":
        return NoTextEncoder()
    if llm:
        spec = TextEncoderSpec.from_dict({**spec.to_dict(), "source": str(llm)})
    if not spec.source:
        raise LLMNotFoundError("no LLM location: give --llm (a local folder or .gguf file)")
    cls = CausalLMPromptEncoder if spec.kind == "causal-lm" else SentenceEncoderPromptEncoder
    return cls(spec, device=device, dtype=dtype, allow_download=allow_download,
               gradient_checkpointing=gradient_checkpointing, template=template)
