"""Free-text notes -> the structured note (note/freetext.py) and the form filled from them (note/form.py)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from MMContourLib.note import form as noteform
from MMContourLib.note.freetext import NoteReadingError, read_note

ROOT = Path(__file__).resolve().parents[1]


def _value(text, name):
    reading = read_note(text)
    return reading.values.get(name)


def _rules(reading, key):
    return {e.rule for e in reading.evidence.get(key, [])}


# -- one test per rule ---------------------------------------------------------------------------------------------

def test_pathologic_stage_wins_over_clinical_and_ypn_after_neoadjuvant():
    reading = read_note("Left breast IDC cT2 cN1. Neoadjuvant AC-T, then left lumpectomy: ypT1a ypN0.")
    assert reading.values["n_stage"] == "N0" and reading.values["t_stage"] == "T1a"
    assert _rules(reading, "n_stage") == {"post-neoadjuvant stage"}
    assert reading.values["chemotherapy"] == "neoadjuvant"
    assert _value("Right lumpectomy. cN0 on ultrasound; pN1a at surgery.", "n_stage") == "N1"
    clinical_only = read_note("Right breast cancer, cT2 cN1, plan right mastectomy.")
    assert clinical_only.values["n_stage"] == "N1" and _rules(clinical_only, "n_stage") == {"clinical stage"}


@pytest.mark.parametrize("count,expected", [("0/3", "N0"), ("1 of 3", "N1"), ("5/14", "N2"), ("two of eleven", "N1"),
                                            ("nine of 20", "N2"), ("12/21", "N3"), ("3 out of 3", "N1")])
def test_node_counts(count, expected):
    reading = read_note(f"Left mastectomy and ALND: metastatic carcinoma in {count} lymph nodes.")
    assert reading.values["n_stage"] == expected
    assert reading.evidence["n_stage"][0].text == count


def test_scores_and_dates_are_not_node_counts():
    assert _value("Right lumpectomy on 5/14/2023, Nottingham grade 2/3, ER Allred 8/8, sentinel node biopsy.",
                  "n_stage") is None


def test_micrometastasis_and_isolated_tumour_cells():
    micro = read_note("Left lumpectomy. One of two sentinel nodes with micrometastasis (1 mm); no macrometastasis.")
    assert micro.values["n_stage"] == "N1mi" and _rules(micro, "n_stage") == {"micrometastasis"}
    with_macro = read_note("Left lumpectomy. 2/3 sentinel nodes positive: one macrometastasis, one micrometastasis.")
    assert with_macro.values["n_stage"] == "N1"
    itc = read_note("Right mastectomy: isolated tumour cells in 1 of 2 sentinel nodes.")
    assert itc.values["n_stage"] == "N0" and _rules(itc, "n_stage") == {"isolated tumour cells"}


def test_negation():
    reading = read_note("Left WLE. Sentinel lymph nodes: no evidence of metastatic carcinoma in 0/3 nodes.")
    assert reading.values["n_stage"] == "N0" and _rules(reading, "n_stage") == {"negation"}
    assert _value("Right lumpectomy; sentinel nodes negative for malignancy.", "n_stage") == "N0"
    assert _value("Right lumpectomy; sentinel node biopsy not performed.", "n_stage") is None


def test_laterality_of_the_current_cancer():
    assert _value("History of right breast cancer treated with lumpectomy in 2009. New left breast IDC, "
                  "s/p left mastectomy, pN0.", "side") == "left"
    assert _value("Left breast: screening mammogram normal. Right breast IDC s/p lumpectomy, pN0.", "side") == "right"
    assert _value("Right breast IDC, pN1a. Bilateral mastectomies (left side prophylactic).", "side") == "right"
    conflict = read_note("Diagnosis: left breast IDC. Operation: right lumpectomy.")
    assert "side" in conflict.blocking() and "side" not in conflict.values


@pytest.mark.parametrize("words,expected", [
    ("lumpectomy", "bcs"), ("partial mastectomy", "bcs"), ("segmental mastectomy", "bcs"), ("quadrantectomy", "bcs"),
    ("wide local excision", "bcs"), ("BCS", "bcs"), ("total mastectomy", "mastectomy"), ("simple mastectomy", "mastectomy"),
    ("modified radical mastectomy", "mastectomy"), ("MRM", "mastectomy"), ("skin-sparing mastectomy", "mastectomy"),
    ("nipple-sparing mastectomy", "mastectomy")])
def test_surgery_vocabulary(words, expected):
    reading = read_note(f"s/p left {words} and SLNB, pN0.")
    assert reading.values["surgery"] == expected and reading.evidence["surgery"][0].text == words


def test_surgery_options_declined_and_completion():
    assert "surgery" in read_note("Left IDC, cN0; considering lumpectomy versus mastectomy.").unresolved
    assert _value("Mastectomy was offered but the patient declined; she had a left lumpectomy. pN0.", "surgery") == "bcs"
    completion = read_note("Left lumpectomy with positive margins, then completion mastectomy. pN0.")
    assert completion.values["surgery"] == "mastectomy" and _rules(completion, "surgery") == {"completion mastectomy"}


def test_bilateral_cases_keep_per_side_facts():
    reading = read_note("Synchronous bilateral breast cancer. Left: lumpectomy, pN0 (0/2). Right: MRM, pN2a (5/12).")
    assert reading.values["side"] == "both"
    assert (reading.values["n_stage.left"], reading.values["n_stage.right"]) == ("N0", "N2")
    assert reading.fields["surgery"] == "left:bcs;right:mastectomy"
    assert reading.prompt() == "N0, breast conserving surgery, left side; N2, total mastectomy surgery, right side"
    unsure = read_note("Left breast: lumpectomy, 0/2 SLN. Right breast: mastectomy, 4/9 nodes positive.")
    assert "n_stage" in unsure.unresolved and "n_stage" not in unsure.values  # never the two sides' counts added


@pytest.mark.parametrize("text", ["Lt BCS + SLNB, pN0", "L lumpectomy, SLNB 0/2", "s/p Rt MRM, ALND 0/12",
                                  "R partial mastectomy; SLN 0/1"])
def test_abbreviations(text):
    assert read_note(text).complete


def test_radiotherapy_is_not_the_right_side():
    assert _value("Referred for adjuvant RT after Lt lumpectomy, pN0.", "side") == "left"


@pytest.mark.parametrize("text,side,surgery", [
    ("Mammakarzinom links, brusterhaltende Operation, pN0", "left", "bcs"),       # German
    ("Cáncer de mama derecha, mastectomía, pN1a", "right", "mastectomy"),          # Spanish
    ("Cancer du sein gauche, tumorectomie, pN0", "left", "bcs"),                   # French
    ("우측 유방암, 유방전절제술 시행, pN0", "right", "mastectomy")])                   # Korean
def test_other_languages(text, side, surgery):
    reading = read_note(text)
    assert (reading.values["side"], reading.values["surgery"]) == (side, surgery)


def test_typos_of_long_keywords():
    reading = read_note("rigth breast, s/p lumpectmy, senitnel node 0/2")
    assert (reading.values["side"], reading.values["surgery"], reading.values["n_stage"]) == ("right", "bcs", "N0")


def test_age_chemotherapy_and_histology():
    reading = read_note("63-year-old (mother diagnosed at age 45) with right ILC s/p lumpectomy, pN0; "
                        "adjuvant chemotherapy planned.")
    assert (reading.values["age"], reading.values["pathology"], reading.values["chemotherapy"]) == \
        ("63", "ILC", "adjuvant")
    assert _value("Left lumpectomy, pN0; chemotherapy was not recommended.", "chemotherapy") == "none"


# -- what a reading returns ----------------------------------------------------------------------------------------

def test_json_shape_and_evidence_spans_point_into_the_text():
    text = "S/p left partial mastectomy and SLNB. pT1c, 1/3 SLN positive."
    out = read_note(text).to_json()
    assert set(out) == {"prompt", "fields", "evidence", "unresolved", "conflicts"}
    assert out["prompt"] == "N1, breast conserving surgery, left side"
    assert set(out["fields"]) == {"age", "side", "t_stage", "n_stage", "m_stage", "surgery", "chemotherapy", "pathology"}
    assert out["unresolved"] == [] and out["conflicts"] == []
    for spans in out["evidence"].values():
        for span in spans:
            assert set(span) == {"start", "end", "text", "rule"}
            assert text[span["start"]:span["end"]] == span["text"]


def test_undecided_and_conflicting_fields_stop_the_note():
    undecided = read_note("Left lumpectomy, awaiting sentinel node pathology.")
    assert not undecided.complete and undecided.unresolved == ["n_stage"] and undecided.to_json()["prompt"] is None
    with pytest.raises(NoteReadingError, match="n_stage") as error:
        undecided.note()
    assert error.value.fields == ["n_stage"]
    conflict = read_note("Left lumpectomy. pN0. Sentinel nodes: 2/3 positive for metastatic carcinoma.")
    assert [x["field"] for x in conflict.conflicts] == ["n_stage"]
    assert {"pN0", "2/3"} <= set(conflict.conflicts[0]["values"])
    with pytest.raises(NoteReadingError, match="n_stage"):
        conflict.prompt()


# -- the closed-set scorer -----------------------------------------------------------------------------------------

class FakeScorer:
    def __init__(self, scores):
        self.scores, self.asked = scores, []

    def score(self, text, field, allowed_values):
        self.asked.append((field, tuple(allowed_values)))
        return {v: self.scores.get(field, {}).get(v, -10.0) for v in allowed_values}


def test_scorer_decides_only_what_rules_leave_open_and_only_above_the_margin():
    text = "Left lumpectomy, awaiting sentinel node pathology."
    sure = FakeScorer({"n_stage": {"N0": -0.1, "N1": -5.0}})
    reading = read_note(text, scorer=sure, margin=2.0)
    assert reading.values["n_stage"] == "N0" and _rules(reading, "n_stage") == {"llm"} and reading.complete
    assert sure.asked == [("n_stage", ("N0", "N1mi", "N1", "N2", "N3"))]
    unsure = read_note(text, scorer=FakeScorer({"n_stage": {"N0": -1.0, "N1": -1.5}}), margin=2.0)
    assert "n_stage" in unsure.unresolved
    overruled = FakeScorer({"n_stage": {"N3": 0.0}, "side": {"right": 0.0}, "surgery": {"mastectomy": 0.0}})
    ruled = read_note("Left lumpectomy, pN0.", scorer=overruled)
    assert (ruled.values["side"], ruled.values["n_stage"], ruled.values["surgery"]) == ("left", "N0", "bcs")
    assert overruled.asked == []


# -- the form ------------------------------------------------------------------------------------------------------

def test_form_fills_from_a_reading_with_tooltips_and_undecided_fields():
    fill = noteform.form_from_reading(read_note("Bilateral: Lt breast lumpectomy pT1a pN0; Rt breast MRM pT2."))
    assert fill.values["side"] == "both" and fill.values["leftNStage"] == "N0"
    assert fill.values["rightSurgery"] == "total mastectomy" and fill.values["mStage"] == noteform.NOT_STATED
    assert fill.undecided == ("rightNStage",) and "rightNStage" not in fill.values
    assert "'pN0'" in fill.tooltips["leftNStage"] and fill.tooltips["rightNStage"].startswith("undecided")
    with pytest.raises(Exception):
        noteform.note_from_form(fill.values)


def test_user_edits_win_over_the_extraction():
    fill = noteform.form_from_reading(read_note("Left lumpectomy, pN0, 61-year-old."))
    merged = noteform.merge(fill, {"leftNStage": "N1", "age": 62})
    assert merged.values["leftNStage"] == "N1" and merged.tooltips["leftNStage"] == "set by you"
    assert noteform.note_from_form(merged.values).to_prompt() == "N1, breast conserving surgery, left side"
    assert noteform.note_from_form(merged.values).age == 62
    undecided = noteform.form_from_reading(read_note("Left lumpectomy."))
    assert undecided.undecided == ("leftNStage",)
    assert noteform.merge(undecided, {"leftNStage": "N0"}).undecided == ()


# -- the whole note set --------------------------------------------------------------------------------------------

def test_the_note_set_reads_without_a_wrong_value():
    spec = importlib.util.spec_from_file_location("read_note_accuracy", ROOT / "bench" / "read_note_accuracy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    totals = bench.score()
    print(f"\n{totals['notes']} notes: {totals['right']}/{totals['fields']} fields right "
          f"({100 * totals['accuracy']:.1f} %), {totals['wrong']} wrong, {totals['undecided']} undecided")
    assert totals["notes"] >= 70
    assert totals["wrong"] == 0, totals["misses"]
    assert totals["accuracy"] >= 0.95
