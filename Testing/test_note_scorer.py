"""The frozen LLM as a closed-set scorer for what the free-text rules leave open (note.freetext.Scorer)."""
import math

import pytest
import torch

from MMContourLib.model.note_scorer import LLMChoiceScorer
from MMContourLib.model.text import TextEncoderSpec, build_text_encoder
from MMContourLib.note.freetext import ALLOWED, read_note


@pytest.fixture(scope="module")
def scorer(tiny_llm_dir):
    text = build_text_encoder(TextEncoderSpec(kind="causal-lm", source=str(tiny_llm_dir)))
    return LLMChoiceScorer.from_text_encoder(text)


def test_each_allowed_value_gets_the_log_likelihood_of_its_answer(scorer):
    note = "Carcinoma of the breast, s/p lumpectomy, 2/12 nodes positive."
    scores = scorer.score(note, "side", ALLOWED["side"])
    assert set(scores) == set(ALLOWED["side"]) and all(math.isfinite(v) and v < 0 for v in scores.values())
    # the same number by another route: the whole sequence's token log-probabilities, summed over the answer
    tok, model = scorer.tokenizer, scorer.model
    prompt = tok(scorer._prompt(note, "side"))["input_ids"]
    answer = tok(" right", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + answer])).logits[0].float(), -1)
    manual = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(answer))
    assert scores["right"] == pytest.approx(manual, abs=1e-4)


def test_the_scorer_only_decides_above_the_margin_and_never_overrides_a_rule(scorer):
    note = "s/p lumpectomy, pN1a (2/12). Radiotherapy planned."  # no side stated
    undecided = read_note(note)
    assert "side" in undecided.unresolved
    scores = scorer.score(note, "side", ALLOWED["side"])
    ranked = sorted(scores.values(), reverse=True)
    gap = ranked[0] - ranked[1]
    strict = read_note(note, scorer=scorer, margin=gap + 1.0)  # the random LLM is not that sure
    assert "side" in strict.unresolved
    lenient = read_note(note, scorer=scorer, margin=max(gap - 1e-6, 0.0))
    assert lenient.fields["side"] == max(scores, key=scores.get)
    assert [e.rule for e in lenient.evidence["side"]] == ["llm"]
    ruled = read_note("Left breast, s/p lumpectomy, pN1a (2/12).", scorer=scorer, margin=0.0)
    assert ruled.fields["side"] == "left" and all(e.rule != "llm" for e in ruled.evidence["side"])


def test_a_text_encoder_without_a_causal_llm_is_refused():
    vision_only = build_text_encoder(TextEncoderSpec(kind="none"))
    with pytest.raises(ValueError, match="not a causal LLM"):
        LLMChoiceScorer.from_text_encoder(vision_only)


def test_read_note_llm_option_scores_only_the_undecided_fields(tiny_llm_dir, capsys):
    import json

    from MMContourLib.cli.main import main

    code = main(["read-note", "--text", "s/p lumpectomy, pN1a (2/12).", "--llm", str(tiny_llm_dir),
                 "--margin", "1000", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 2 and "side" in out["unresolved"]  # the random LLM never clears a 1000-nat margin
    code = main(["read-note", "--text", "s/p lumpectomy, pN1a (2/12).", "--llm", str(tiny_llm_dir),
                 "--margin", "0", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and [e["rule"] for e in out["evidence"]["side"]] == ["llm"]
    assert out["fields"]["n_stage"] == "N1" and out["evidence"]["n_stage"][0]["rule"] != "llm"
