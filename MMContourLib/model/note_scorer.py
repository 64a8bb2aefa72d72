"""The frozen LLM as a closed-set reader of free-text notes (``note.freetext.Scorer``).

For a field the rules of ``note.freetext`` left open, the LLM does not generate anything: it scores each
allowed value ("left", "right", "both"; "N0" ... "N3"; ...) by the log-likelihood of the answer
``<value>`` after a fixed question about the note, and ``read_note`` accepts the best value only when it
beats the runner-up by a margin (in nats). The LLM is the one the bundle already loads for the contour
(its LM head is part of the same weights), so this costs one forward pass per allowed value, on CPU
fractions of a second for a 135M model.
"""
from __future__ import annotations

from typing import Mapping

import torch

#: The question asked for each field (the part of the key before a ".left" / ".right" side suffix).
QUESTIONS = {
    "side": "Which breast has the cancer being treated now: left, right or both?",
    "n_stage": "What is the nodal stage (N0, N1mi, N1, N2 or N3) of the breast cancer{side}?",
    "surgery": "Which breast surgery was done{side}: bcs (breast-conserving surgery) or mastectomy?",
    "t_stage": "What is the tumour stage (T category) of the breast cancer{side}?",
    "m_stage": "What is the M stage (M0, M1 or MX)?",
    "chemotherapy": "Which chemotherapy: none, adjuvant or neoadjuvant?",
    "pathology": "What is the histology (IDC, ILC, DCIS, mixed, mucinous, tubular, medullary, metaplastic, other)?",
}


class LLMChoiceScorer:
    """``score(text, field, allowed_values) -> {value: log-likelihood}`` with a causal LM and its tokenizer."""

    def __init__(self, model, tokenizer, max_note_tokens: int = 768):
        self.model = model
        self.tokenizer = tokenizer
        self.max_note_tokens = max_note_tokens

    @classmethod
    def from_text_encoder(cls, encoder) -> "LLMChoiceScorer":
        """The scorer over the LLM a prompt-tuned causal-LM text encoder already holds."""
        if getattr(encoder, "hf_kind", None) != "causal-lm":
            raise ValueError("this bundle's text encoder is not a causal LLM: it cannot score a note's values")
        if not encoder.llm_loaded:
            encoder.move_llm(encoder.device)
        return cls(encoder.llm, encoder.tokenizer)

    def _prompt(self, text: str, field: str) -> str:
        name, _, side = field.partition(".")
        question = QUESTIONS[name].format(side=f" in the {side} breast" if side else "")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_note_tokens]
        note = self.tokenizer.decode(ids)
        return f"Clinical note:\n{note}\n\nQuestion: {question}\nAnswer:"

    @torch.no_grad()
    def score(self, text: str, field: str, allowed_values: tuple[str, ...]) -> Mapping[str, float]:
        prompt = self.tokenizer(self._prompt(text, field))["input_ids"]
        device = next(self.model.parameters()).device
        scores = {}
        for value in allowed_values:
            answer = self.tokenizer(" " + value, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + answer], device=device)
            logits = self.model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1:-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            scores[value] = float(logp[torch.arange(len(answer)), torch.tensor(answer, device=device)].sum())
        return scores
