import pytest

from MMContourLib.note.clinical import (ClinicalNote, ContradictionError, NoteError, normalise_n_stage,
                                        normalise_t_stage, prompt_clauses)


@pytest.mark.parametrize("raw,expected", [("1mi", "N1mi"), ("N1mi", "N1mi"), ("pN1(mi)", "N1mi"), ("pN1a", "N1"),
                                          ("ypN2", "N2"), ("cN0", "N0"), ("N0(i+)", "N0"), ("pN3c", "N3"),
                                          ("N2a", "N2"), ("0", "N0")])
def test_n_stage_spellings(raw, expected):
    assert normalise_n_stage(raw) == expected


@pytest.mark.parametrize("raw,expected", [("cT1c", "T1c"), ("Tis", "Tis"), ("is", "Tis"), ("ypT2", "T2"), ("T4d", "T4d")])
def test_t_stage_spellings(raw, expected):
    assert normalise_t_stage(raw) == expected


@pytest.mark.parametrize("side", ["Lt", "Left breast", "L", "left", "LEFT SIDE"])
def test_side_spellings(side):
    assert ClinicalNote.from_fields(side=side, n_stage="N0", surgery="BCS").side == "left"


@pytest.mark.parametrize("surgery,expected", [("BCS", "bcs"), ("partial mastectomy", "bcs"), ("lumpectomy", "bcs"),
                                              ("total", "mastectomy"), ("modified radical mastectomy", "mastectomy"),
                                              ("MRM", "mastectomy")])
def test_surgery_spellings(surgery, expected):
    assert ClinicalNote.from_fields(side="R", n_stage="N1", surgery=surgery).sides[0].surgery == expected


def test_prompts_match_paper_table5():
    assert ClinicalNote.from_fields(side="left", n_stage="1mi", surgery="BCS").to_prompt() == \
        "N1mi, breast conserving surgery, left side"
    assert ClinicalNote.from_fields(side="Rt", n_stage="N2", surgery="total").to_prompt() == \
        "N2, total mastectomy surgery, right side"
    both = ClinicalNote.from_fields(side="both", n_stage="N0", surgery="BCS")
    assert both.to_prompt() == ("N0, breast conserving surgery, left side; N0, breast conserving surgery, right side")


def test_template_v2_reads_each_side_on_its_own_and_v1_the_whole_note():
    both = ClinicalNote.from_fields(side="both", n_stage="left:N0;right:N2", surgery="BCS").to_prompt()
    assert prompt_clauses(both) == ["N0, breast conserving surgery, left side", "N2, breast conserving surgery, right side"]
    assert prompt_clauses(both, "table5-v1") == [both]
    one = "N1, breast conserving surgery, left side"
    assert prompt_clauses(one) == prompt_clauses(one, "table5-v1") == [one]
    with pytest.raises(ValueError, match="unknown prompt template"):
        prompt_clauses(one, "table6")


def test_bilateral_per_side_fields_round_trip():
    note = ClinicalNote.from_fields(side="bilateral", n_stage="left:N0;right:ypN2", surgery="left:BCS;right:MRM",
                                    chemotherapy="neoadjuvant", age="61")
    assert note.to_prompt() == "N0, breast conserving surgery, left side; N2, total mastectomy surgery, right side"
    fields = note.to_fields()
    assert fields["n_stage"] == "left:N0;right:N2" and fields["surgery"] == "left:bcs;right:mastectomy"
    assert ClinicalNote.from_fields(**fields) == note
    assert ClinicalNote.parse(note.to_prompt()).to_prompt() == note.to_prompt()


def test_parse_free_text_with_extra_facts():
    note = ClinicalNote.parse("pN1a, lumpectomy, Lt, cT1c, age 61, IDC, adjuvant, M0")
    assert (note.side, note.age, note.pathology, note.chemotherapy, note.m_stage) == ("left", 61, "IDC", "adjuvant", "M0")
    assert note.sides[0].t_stage == "T1c" and note.sides[0].node_positive


def test_replace_makes_counterfactuals():
    note = ClinicalNote.parse("N2, breast conserving surgery, left side")
    assert note.replace(side="right").to_prompt() == "N2, breast conserving surgery, right side"
    assert note.replace(n_stage="N0").to_prompt() == "N0, breast conserving surgery, left side"


@pytest.mark.parametrize("kwargs,field", [
    (dict(side="up", n_stage="N0", surgery="BCS"), "side"),
    (dict(side="left", n_stage="N7", surgery="BCS"), "n_stage"),
    (dict(side="left", n_stage="NX", surgery="BCS"), "n_stage"),
    (dict(side="left", n_stage="N0", surgery="radiotherapy"), "surgery"),
    (dict(side="left", n_stage="N0", surgery="BCS", chemotherapy="maybe"), "chemotherapy"),
    (dict(side="left", n_stage="N0", surgery="BCS", age="200"), "age"),
    (dict(side="left", n_stage="N0", surgery="BCS", t_stage="T9"), "t_stage"),
])
def test_unknown_values_name_field_value_and_accepted(kwargs, field):
    with pytest.raises(NoteError) as info:
        ClinicalNote.from_fields(**kwargs)
    assert info.value.field == field
    assert "Accepted" in str(info.value) and repr(kwargs[field]) in str(info.value)


@pytest.mark.parametrize("kwargs", [
    dict(side="left", n_stage="ypN1", surgery="BCS", chemotherapy="adjuvant"),
    dict(side="left", n_stage="N0", surgery="BCS", t_stage="Tis", pathology="IDC"),
    dict(side="left", n_stage="right:N0", surgery="BCS"),
])
def test_contradictory_notes_are_refused(kwargs):
    with pytest.raises(ContradictionError):
        ClinicalNote.from_fields(**kwargs)


def test_parse_refuses_incomplete_or_twice_stated():
    with pytest.raises(NoteError):
        ClinicalNote.parse("N1, breast conserving surgery")
    with pytest.raises(ContradictionError):
        ClinicalNote.parse("N1, N2, breast conserving surgery, left side")
    with pytest.raises(NoteError):
        ClinicalNote.parse("")


def test_from_row_reads_manifest_rows():
    row = {"case_id": "x", "age": "55", "side": "right", "t_stage": "T2", "n_stage": "N1mi", "m_stage": "M0",
           "surgery": "total mastectomy", "chemotherapy": "none", "pathology": "ILC", "ct": "a.nii.gz"}
    note = ClinicalNote.from_row(row)
    assert note.to_prompt() == "N1mi, total mastectomy surgery, right side" and not note.sides[0].node_positive


def test_note_from_parts_takes_each_fact_from_where_it_is_stated():
    from MMContourLib.note.clinical import note_from_parts

    note = note_from_parts("N1, BCS, left", {"side": "Lt", "n_stage": "pN1a", "age": 61, "pathology": "",
                                             "chemotherapy": None, "case_id": "x"})
    assert note.to_prompt() == "N1, breast conserving surgery, left side" and note.age == 61
    assert note.chemotherapy == ""  # None and '' are not stated
    assert note_from_parts("N1, BCS", {"side": "left"}) == note_from_parts("N1, BCS, left", {})
    assert note_from_parts(None, {"side": "R", "n_stage": "N0", "surgery": "MRM"}).to_prompt() == \
        "N0, total mastectomy surgery, right side"
    both = "N0, BCS, left side; N2, MRM, right side"
    assert note_from_parts(both, {"side": "bilateral", "n_stage": "left:N0;right:ypN2", "age": "50"}).age == 50
    with pytest.raises(ContradictionError, match="neoadjuvant"):  # checked with the text's own yp prefix
        note_from_parts("ypN1, BCS, left", {"chemotherapy": "adjuvant"})
    with pytest.raises(NoteError) as info:
        note_from_parts("N1, BCS", {})
    assert info.value.field == "side"


@pytest.mark.parametrize("text,fields,field,values", [
    ("N1, breast conserving surgery, left side", {"side": "right"}, "side", ("left", "right")),
    ("N1, breast conserving surgery, left side", {"side": "both"}, "side", ("left", "both")),
    ("N1, breast conserving surgery, left side", {"n_stage": "N0"}, "n_stage", ("N1", "N0")),
    ("N1, BCS, left", {"surgery": "mastectomy"}, "surgery", ("bcs", "mastectomy")),
    ("N1, BCS, left, age 61", {"age": "62"}, "age", ("61", "62")),
    ("N0, BCS, left side; N2, MRM, right side", {"n_stage": "left:N0;right:N1"}, "n_stage",
     ("left:N0;right:N2", "left:N0;right:N1")),
])
def test_note_from_parts_refuses_a_fact_stated_twice_differently(text, fields, field, values):
    from MMContourLib.note.clinical import note_from_parts

    with pytest.raises(ContradictionError) as info:
        note_from_parts(text, fields)
    assert info.value.field == field and info.value.values == (values[0], fields[field])
    assert all(repr(v) in str(info.value) for v in (values[0], fields[field])) and field in str(info.value)
