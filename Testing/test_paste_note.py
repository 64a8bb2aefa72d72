"""The Slicer module's Paste note box without Slicer (issue 14): the form logic (note/form.py) and the .ui driven
with PySide6 offscreen through the same calls MMContour.py makes (read, edited, display, note_status)."""
from __future__ import annotations

import ast

from test_ui import _load, _module_ast, _parameters, _slicer_lookalike_loader, _string_constants, qt_app  # noqa: F401

from MMContourLib.note import form as noteform

NOTE = "S/p Lt partial mastectomy and SLNB. pT1c, 1/3 SLN positive. 61 yo"


# -- the logic -----------------------------------------------------------------------------------------------------

def test_a_pasted_note_fills_side_n_stage_and_surgery_with_their_evidence():
    paste = noteform.PastedNote()
    values = paste.read(NOTE)
    assert (values["side"], values["leftNStage"], values["leftSurgery"]) == ("left", "N1", "breast-conserving surgery")
    tips = paste.display("left", {name: "" for name in values}).tooltips
    assert tips["side"] == "left: from 'Lt' (laterality, characters 4-6)"
    assert "'1/3' (node count" in tips["leftNStage"] and "'partial mastectomy' (surgery term" in tips["leftSurgery"]
    assert paste.blocking("left") == "" and paste.warnings("left") == []


def test_an_undecided_field_blocks_until_the_user_chooses_it():
    paste = noteform.PastedNote()
    paste.read("Left lumpectomy. SLNB pending.")
    shown = paste.display("left", {"leftNStage": "the .ui's tooltip", "age": "the .ui's age tooltip"})
    assert shown.marked == ("leftNStage",) and shown.tooltips["leftNStage"].startswith("undecided")
    assert shown.tooltips["age"] == "the .ui's age tooltip"  # nothing read: the .ui's own tooltip
    assert "N stage (left)" in shown.blocking and shown.status.startswith("⚠")
    text, kind = noteform.note_status(None, shown.warnings, shown.blocking)
    assert kind == "bad" and "N stage (left)" in text
    paste.edited("leftNStage", "N0")  # choosing the shown value still decides it
    assert paste.blocking("left") == "" and noteform.note_status(None, paste.warnings("left"))[1] == "ok"


def test_the_users_edit_wins_and_is_shown_next_to_the_notes_value():
    paste = noteform.PastedNote()
    paste.read(NOTE)
    assert paste.edited("leftNStage", "N1") == {}  # left as it was: not an edit
    assert paste.display("left", {"leftNStage": ""}).tooltips["leftNStage"].startswith("N1: from")
    moved = paste.edited("side", "right")
    assert moved == {"rightNStage": "N1", "rightSurgery": "breast-conserving surgery", "rightTStage": "T1c"}
    assert paste.blocking("right") == ""
    paste.edited("rightNStage", "N2")
    view = paste.view("right")
    assert view.values["side"] == "right" and view.values["rightNStage"] == "N2"
    assert noteform.note_from_form(view.values).to_prompt() == "N2, breast conserving surgery, right side"
    warnings = paste.warnings("right")
    assert warnings == ["treated side is 'right' (set by you), but the pasted note says 'left', from 'Lt' "
                        "(laterality, characters 4-6)",
                        "N stage (right) is 'N2' (set by you), but the pasted note says 'N1', from '1/3' "
                        "(node count, characters 42-45)"]
    assert noteform.note_status(None, warnings) == ("\n".join("⚠ " + w for w in warnings), "warn")
    paste.edited("side", "both")  # the note describes one side: the other's N stage and surgery are the user's
    assert "surgery (right)" in paste.blocking("both")


def test_conflicts_in_the_note_are_marked_and_listed():
    paste = noteform.PastedNote()
    paste.read("Left lumpectomy. pN1 on the report, but pN2 in the summary.")
    assert paste.display("left", {}).marked == ("leftNStage",)
    assert paste.warnings("left") == ["pasted note: the note states N stage twice: 'pN1' (characters 17-20) and "
                                      "'pN2' (characters 40-43)"]
    paste.edited("leftNStage", "N2")
    assert paste.blocking("left") == "" and len(paste.warnings("left")) == 1  # still listed: the note says both


# -- MMContour.py uses it ----------------------------------------------------------------------------------------

def _method(tree, name):
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MMContourWidget")
    return next(n for n in widget.body if isinstance(n, ast.FunctionDef) and n.name == name)


def _calls(node):
    return {n.func.attr for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}


def test_the_module_wires_the_paste_box_through_the_form_logic():
    tree = _module_ast()
    parameters = _parameters()
    for name in _string_constants(tree, "NOTE_PARAMETERS"):
        assert parameters[name].get("name") == noteform.widget_name(name)
    assert "read" in _calls(_method(tree, "onReadNote")) and "edited" in _calls(_method(tree, "onNoteFieldEdited"))
    assert {"display", "note_status"} <= _calls(_method(tree, "updateForm"))
    source = ast.unparse(_method(tree, "updateButtons"))
    assert "not self._pasteBlocking" in source
    refusals = [n for n in ast.walk(_method(tree, "run")) if isinstance(n, ast.If)
                and ast.unparse(n.test) == "self._pasteBlocking"]
    assert refusals and isinstance(refusals[0].body[-1], ast.Return)  # Apply refused with the reason shown
    assert "statusLabel" in ast.unparse(refusals[0])


# -- the .ui, driven as the module drives it -------------------------------------------------------------------

class _Form:
    """The loaded .ui with the module's paste glue; the widgets stand in for the parameter node."""

    def __init__(self):
        from PySide6.QtWidgets import QWidget

        self.ui = _load(_slicer_lookalike_loader())
        self.names = _string_constants(_module_ast(), "NOTE_PARAMETERS")
        self.widget = lambda name: self.ui.findChild(QWidget, noteform.widget_name(name))
        self.find = lambda cls, name: self.ui.findChild(cls, name)
        self.paste = noteform.PastedNote()
        self.defaults = {name: self.widget(name).toolTip() for name in self.names}
        for name in self.names:
            if name != "age":
                self.widget(name).activated.connect(lambda _index, name=name: self.edited(name))

    def value(self, name):
        return self.widget(name).value() if name == "age" else self.widget(name).currentText()

    def set(self, values):
        for name, value in values.items():
            self.widget(name).setValue(value) if name == "age" else self.widget(name).setCurrentText(value)
        self.update()

    def read(self, text):
        from PySide6.QtWidgets import QPlainTextEdit

        self.find(QPlainTextEdit, "pasteNoteTextEdit").setPlainText(text)
        self.set(self.paste.read(self.find(QPlainTextEdit, "pasteNoteTextEdit").toPlainText()))

    def edited(self, name):
        self.set(self.paste.edited(name, self.value(name)))

    def choose(self, name, text):
        """As the user picks an item: the index changes, then activated."""
        combo = self.widget(name)
        combo.setCurrentText(text)
        combo.activated.emit(combo.currentIndex())

    def update(self):
        from PySide6.QtWidgets import QLabel, QPushButton

        values = {name: self.value(name) for name in self.names}
        shown = self.paste.display(values["side"], self.defaults)
        for name, tip in shown.tooltips.items():
            self.widget(name).setToolTip(tip)
            self.widget(name).setStyleSheet("border: 2px solid #9a6700;" if name in shown.marked else "")
        self.find(QLabel, "pasteStatusLabel").setText(shown.status)
        try:
            note, error = noteform.note_from_form(values), None
        except ValueError as exc:
            note, error = None, str(exc)
        self.status = noteform.note_status(error, shown.warnings, shown.blocking)
        self.find(QLabel, "noteStatusLabel").setText(self.status[0])
        self.find(QPushButton, "applyButton").setEnabled(note is not None and not shown.blocking)

    def apply_enabled(self):
        from PySide6.QtWidgets import QPushButton

        return self.find(QPushButton, "applyButton").isEnabled()


def test_the_ui_fills_marks_blocks_and_lets_the_user_win(qt_app):  # noqa: F811
    from PySide6.QtWidgets import QLabel

    form = _Form()
    form.read(NOTE)
    assert (form.value("side"), form.value("leftNStage"), form.value("leftSurgery"), form.value("age")) == \
        ("left", "N1", "breast-conserving surgery", 61)
    assert form.widget("side").toolTip() == "left: from 'Lt' (laterality, characters 4-6)"
    assert form.widget("leftNStage").toolTip().startswith("N1: from '1/3'")
    assert form.widget("mStage").toolTip() == form.defaults["mStage"]
    assert form.apply_enabled() and form.status == ("✓ Valid note", "ok")

    form.read("Left lumpectomy. SLNB pending.")
    assert form.widget("leftNStage").styleSheet() and "undecided" in form.widget("leftNStage").toolTip()
    assert not form.apply_enabled() and "N stage (left)" in form.find(QLabel, "noteStatusLabel").text()
    form.choose("leftNStage", "N0")
    assert form.apply_enabled() and not form.widget("leftNStage").styleSheet()
    assert form.widget("leftNStage").toolTip() == "set by you"

    form.read(NOTE)
    form.choose("side", "right")
    assert form.value("rightNStage") == "N1" and form.value("rightSurgery") == "breast-conserving surgery"
    form.choose("rightNStage", "N0")
    assert form.apply_enabled() and form.status[1] == "warn"
    text = form.find(QLabel, "noteStatusLabel").text()
    assert "treated side is 'right' (set by you), but the pasted note says 'left'" in text
    assert "N stage (right) is 'N0' (set by you), but the pasted note says 'N1'" in text
    assert noteform.note_from_form({n: form.value(n) for n in form.names}).to_prompt() == \
        "N0, breast conserving surgery, right side"
