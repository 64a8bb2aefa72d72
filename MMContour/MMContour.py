"""MMContour: contour the breast-cancer radiotherapy CTV on a planning CT from the patient's clinical note.

The work happens in MMContourLib (plain Python): ``note.form`` turns the form into a ClinicalNote and
back; ``slicer.mrml`` moves data between the scene and images and writes the segmentation; ``slicer.job``
is one Apply; ``slicer.worker`` runs inference in a separate, long-lived process so the GUI never
freezes, Cancel always works and the model stays loaded between Applies. Python packages are
installed by ``MMContourInstall.py`` beside this file.
"""
from __future__ import annotations

import logging
import os
import queue
import shutil
import sys
import tempfile
import time
from typing import Annotated


def _find_root(here: str) -> str:
    """The folder that holds Resources/ and MMContourLib/: beside this file in an extension build, one up
    when MMContour/ is added from a source checkout through "Additional module paths"."""
    for root in (here, os.path.dirname(here)):
        if (os.path.isfile(os.path.join(root, "Resources", "UI", "MMContour.ui"))
                and os.path.isfile(os.path.join(root, "MMContourLib", "__init__.py"))):
            return root
    raise ImportError(f"MMContour: Resources/ and MMContourLib/ not found next to {here} or one folder up")


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = _find_root(HERE)
for _path in (ROOT, HERE):  # MMContourLib, and MMContourInstall beside this file
    if _path not in sys.path:
        sys.path.insert(0, _path)

import qt  # noqa: E402
import vtk  # noqa: E402

import slicer  # noqa: E402
from slicer.i18n import tr as _  # noqa: E402
from slicer.i18n import translate  # noqa: E402
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode  # noqa: E402
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper  # noqa: E402
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,  # noqa: E402
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin  # noqa: E402

from MMContourInstall import INSTALL_ENVIRONMENT_VARIABLE, InstallLogic  # noqa: E402
from MMContourLib.note import form as noteform  # noqa: E402

from MMContourLib.note.clinical import ClinicalNote  # noqa: E402
from MMContourLib.model.bundle_info import read_bundle_summary  # noqa: E402
from MMContourLib.slicer import report  # noqa: E402
from MMContourLib.slicer.bundle_ref import bundle_reference, resolve_bundle  # noqa: E402
from MMContourLib.slicer.worker import STAGE_LABELS  # noqa: E402
from MMContourLib.slicer.worker_client import WorkerClient, poll_until  # noqa: E402

CITATION = ("Oh Y, Park S, et al. LLM-driven multimodal target volume contouring in radiation oncology. "
            "Nat Commun 15, 2024. arXiv:2311.01908")
_C = noteform.form_choices()
NOT_STATED = noteform.NOT_STATED


class MMContour(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MMContour")
        # Slicer looks for the icon in Resources/ beside the module file: true once installed, not in a checkout
        self.parent.icon = qt.QIcon(os.path.join(ROOT, "Resources", "Icons", "MMContour.png"))
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Radiotherapy")]
        self.parent.dependencies = []
        self.parent.contributors = ["MMContour developers"]
        self.parent.helpText = _(
            "Contours the clinical target volume (CTV) for breast-cancer radiotherapy on a planning CT, "
            "conditioned on the patient's clinical note (side, N stage, surgery, ...): a frozen large language "
            "model reads the note and steers a 3D U-Net. Fill in the note, press <b>Contour CTV</b>, edit the "
            "note and press it again: the model stays loaded. <b>Compare notes</b> shows how the target changes "
            "with the note. The result is a new segmentation (existing ones are never replaced without asking) "
            "with the whole CTV and one segment per structure (e.g. CTVn_L1_L); under it, the review reasons and each "
            "structure's volume. "
            "<br><br><b>Send the CTV to the planning system</b>: with the SlicerRT extension installed, load the CT "
            "from DICOM, contour, then in the Data module right-click the study, choose <i>Export to DICOM...</i>, "
            "select the segmentation and the <i>RT structure set</i> export type; the RTSTRUCT references the loaded "
            "CT series. Without SlicerRT: <tt>mmcontour predict --ct DICOM_FOLDER ... --out-rtstruct RS.dcm</tt>.<br>"
            "See the <a href=\"https://github.com/mmcontour/MMContour/blob/main/docs/slicer.md\">module "
            "documentation</a>.<br><br>If you use this module, please cite: {citation}.").format(citation=CITATION)
        self.parent.acknowledgementText = _(
            "Reproduces and extends LLMSeg (Oh, Park et al., Nat. Commun. 2024). This is research software: "
            "every contour must be reviewed by a qualified clinician.")
        slicer.app.connect("startupCompleted()", registerSampleData)
        slicer.app.connect("startupCompleted()", registerTerminology)


def registerTerminology():
    """The CTV's category and type are in no terminology Slicer ships (note/structures.py says why): load the
    module's own context, so the terminology selector finds the segments' codes."""
    from MMContourLib.note.structures import CATEGORY_CONTEXT, TERMINOLOGY_FILE

    terminologies = getattr(slicer.modules, "terminologies", None)
    if terminologies is None:
        return
    logic = terminologies.logic()
    if not logic.IsTerminologyContextLoaded(CATEGORY_CONTEXT):
        if not logic.LoadTerminologyFromFile(os.path.join(ROOT, TERMINOLOGY_FILE)):
            logging.warning("MMContour: cannot load the terminology %s", os.path.join(ROOT, TERMINOLOGY_FILE))


def registerSampleData():
    """A phantom breast CT in Sample Data (category MMContour): try the module with one click."""
    try:
        import SampleData
    except ImportError:
        return
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="MMContour", sampleName="MMContourPhantomCT", uris=[], fileNames=[], nodeNames=[],
        thumbnailFileName=os.path.join(ROOT, "Resources", "Icons", "MMContour.png"),
        customDownloader=lambda source: loadPhantomSample())


def loadPhantomSample():
    """A synthetic breast planning CT (never used for training), generated once into Slicer's cache."""
    from MMContourLib.inference.demo import DEMO_NOTE, DEMO_SEED, demo_case
    from MMContourLib.image.readwrite import write_image

    path = os.path.join(slicer.app.cachePath, "MMContour", f"phantom-{DEMO_SEED}-planning.nrrd")
    if not os.path.exists(path):
        with slicer.util.WaitCursor():
            write_image(demo_case(case_id="phantom").ct, path)
    node = slicer.util.loadVolume(path, {"name": "MMContourPhantomCT"})
    node.SetAttribute("MMContour.phantomNote", DEMO_NOTE)
    return node


@parameterNodeWrapper
class MMContourParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode  # None: create a new segmentation
    side: Annotated[str, Choice(_C["side"])] = "left"
    age: Annotated[int, WithinRange(0, 120)] = 0  # 0: not stated
    leftNStage: Annotated[str, Choice(_C["n_stage"])] = "N0"
    rightNStage: Annotated[str, Choice(_C["n_stage"])] = "N0"
    leftSurgery: Annotated[str, Choice(_C["surgery"])] = _C["surgery"][0]
    rightSurgery: Annotated[str, Choice(_C["surgery"])] = _C["surgery"][0]
    leftTStage: Annotated[str, Choice(_C["t_stage"])] = NOT_STATED
    rightTStage: Annotated[str, Choice(_C["t_stage"])] = NOT_STATED
    mStage: Annotated[str, Choice(_C["m_stage"])] = NOT_STATED
    chemotherapy: Annotated[str, Choice(_C["chemotherapy"])] = NOT_STATED
    pathology: Annotated[str, Choice(_C["pathology"])] = NOT_STATED
    device: Annotated[str, Choice(_C["device"])] = "auto"
    structures: Annotated[str, Choice(_C["structures"])] = "Both"  # the segments of a result (form.STRUCTURE_CHOICES)
    bundlePath: str = ""  # "" = the default bundle ($MMCONTOUR_BUNDLE or the shipped demo): scenes stay portable
    llmPath: str = ""  # "" = the LLM the bundle names
    variant1: str = ""
    variant2: str = ""
    variant3: str = ""


NOTE_PARAMETERS = ("side", "age", "leftNStage", "rightNStage", "leftSurgery", "rightSurgery", "leftTStage",
                   "rightTStage", "mStage", "chemotherapy", "pathology")
#: ClinicalNote field -> widgets to highlight when the note module rejects that field.
FIELD_WIDGETS = {"age": ("ageSpinBox",), "side": ("sideComboBox",), "m_stage": ("mStageComboBox",),
                 "chemotherapy": ("chemotherapyComboBox",), "pathology": ("pathologyComboBox",),
                 "n_stage": ("leftNStageComboBox", "rightNStageComboBox"),
                 "surgery": ("leftSurgeryComboBox", "rightSurgeryComboBox"),
                 "t_stage": ("leftTStageComboBox", "rightTStageComboBox")}
RIGHT_COLUMN = ("rightHeaderLabel", "rightNStageComboBox", "rightSurgeryComboBox", "rightTStageComboBox")
LEFT_COLUMN = ("leftHeaderLabel", "leftNStageComboBox", "leftSurgeryComboBox", "leftTStageComboBox")
OK_STYLE, BAD_STYLE, WARN_STYLE = "color: #1b7f3b;", "color: #b3261e;", "color: #9a6700;"
UNDECIDED_STYLE = "QComboBox, QSpinBox { border: 2px solid #9a6700; background: #fff4d6; }"


class MMContourWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._guiTag = None
        self._note = None
        self._variants = []
        self._variantsValid = True
        self._bundleValid = False
        self._loadRequest = None
        self._loadedModel = None  # (bundle, llm, device) the worker loaded, so the LLM fingerprint matched
        self._loadingModel = None
        self._shownJob = None
        self._paste = noteform.PastedNote()  # the Paste note box: what it read, and the user's edits since
        self._pasteBlocking = ""

    # -- setup / lifecycle -------------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(os.path.join(ROOT, "Resources", "UI", "MMContour.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MMContourLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.compareButton.connect("clicked(bool)", self.onCompare)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.suggestVariantsButton.connect("clicked(bool)", self.onSuggestVariants)
        self.ui.loadModelButton.connect("clicked(bool)", self.onLoadModel)
        self.ui.loadPhantomButton.connect("clicked(bool)", self.onLoadPhantom)
        self.ui.bundlePathLineEdit.connect("currentPathChanged(QString)", self.onBundlePathChanged)
        self.ui.llmPathLineEdit.connect("currentPathChanged(QString)", self.onLlmPathChanged)
        self.ui.readNoteButton.connect("clicked(bool)", self.onReadNote)
        # only the user's own changes (not the parameter node's) count as edits that win over a pasted note
        for name in NOTE_PARAMETERS:
            widget = getattr(self.ui, noteform.widget_name(name))
            signal = "editingFinished()" if name == "age" else "activated(int)"
            widget.connect(signal, lambda *args, name=name: self.onNoteFieldEdited(name))
        self._fieldToolTips = {name: getattr(self.ui, noteform.widget_name(name)).toolTip for name in NOTE_PARAMETERS}
        self.ui.promptPreviewLabel.setFont(qt.QFontDatabase.systemFont(qt.QFontDatabase.FixedFont))

        self.timer = qt.QTimer()
        self.timer.setInterval(100)
        self.timer.connect("timeout()", self.onPoll)
        self._itemToolTips = self.readItemToolTips()
        self.initializeParameterNode()

    def cleanup(self):
        self.timer.stop()
        self.removeObservers()
        if self.logic is not None:
            self.logic.shutdown()

    def enter(self):
        # The worker (torch, a CUDA context) starts on first use, not when the module is shown.
        self.initializeParameterNode()
        if self.ui.deviceInfoLabel.text == "":
            self.ui.deviceInfoLabel.text = _("GPUs are listed once the model is loaded (Load model or Contour CTV)")

    def exit(self):
        if self._parameterNode and self._guiTag is not None:
            self._parameterNode.disconnectGui(self._guiTag)
            self._guiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateForm)

    def onSceneStartClose(self, caller, event):
        self.logic.cancel(graceSeconds=0)  # its CT is going away; nothing is written
        self._paste = noteform.PastedNote()  # the pasted note belongs to the patient being closed
        self.ui.pasteNoteTextEdit.setPlainText("")
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if volume:
                self._parameterNode.inputVolume = volume
        reference = bundle_reference(self._parameterNode.bundlePath)  # an old scene's stale default becomes ""
        if reference != self._parameterNode.bundlePath:
            self._parameterNode.bundlePath = reference

    def setParameterNode(self, parameterNode):
        if self._parameterNode and self._guiTag is not None:
            self._parameterNode.disconnectGui(self._guiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateForm)
            self._guiTag = None
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._guiTag = self._parameterNode.connectGui(self.ui)
            self.restoreItemToolTips()
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateForm)
            self.updateForm()

    # The parameter wrapper's combo-box connector clears and re-adds the items (Choice), which drops the
    # .ui's per-item tooltips (what each N stage means); they are read once and put back after connectGui.
    def _noteComboBoxes(self):
        return [getattr(self.ui, name) for names in FIELD_WIDGETS.values() for name in names
                if name.endswith("ComboBox")]

    def readItemToolTips(self):
        return {combo.objectName: {combo.itemText(i): combo.itemData(i, qt.Qt.ToolTipRole) for i in range(combo.count)}
                for combo in self._noteComboBoxes()}

    def restoreItemToolTips(self):
        for combo in self._noteComboBoxes():
            tips = self._itemToolTips.get(combo.objectName, {})
            for i in range(combo.count):
                if tips.get(combo.itemText(i)):
                    combo.setItemData(i, tips[combo.itemText(i)], qt.Qt.ToolTipRole)

    # -- the form ----------------------------------------------------------------------------------
    def updateForm(self, caller=None, event=None):
        p = self._parameterNode
        if p is None:
            return
        for name in RIGHT_COLUMN:
            getattr(self.ui, name).setVisible(p.side != "left")
        for name in LEFT_COLUMN:
            getattr(self.ui, name).setVisible(p.side != "right")
        for widgets in FIELD_WIDGETS.values():
            for name in widgets:
                getattr(self.ui, name).setStyleSheet("")
        pasted = self._paste.display(p.side, self._fieldToolTips)
        for name, tip in pasted.tooltips.items():
            widget = getattr(self.ui, noteform.widget_name(name))
            widget.toolTip = tip
            if name in pasted.marked:
                widget.setStyleSheet(UNDECIDED_STYLE)
        self.ui.pasteStatusLabel.text = pasted.status
        self.ui.pasteStatusLabel.setStyleSheet(WARN_STYLE if pasted.marked else "")
        self._pasteBlocking = pasted.blocking

        self._note, error = None, None
        try:
            self._note = noteform.note_from_form({name: getattr(p, name) for name in NOTE_PARAMETERS})
        except ValueError as exc:  # NoteError or ContradictionError: say which field, before Apply
            error = str(exc)
            for name in FIELD_WIDGETS.get(getattr(exc, "field", ""), ()):
                getattr(self.ui, name).setStyleSheet("QComboBox, QSpinBox { border: 2px solid #b3261e; }")
        self.ui.promptPreviewLabel.text = self._note.to_prompt() if self._note is not None else "—"
        warnings = [*(noteform.note_warnings(self._note) if self._note is not None else ()), *pasted.warnings]
        text, kind = noteform.note_status(error, warnings, pasted.blocking)
        self.ui.noteStatusLabel.text = text
        self.ui.noteStatusLabel.setStyleSheet({"ok": OK_STYLE, "warn": WARN_STYLE, "bad": BAD_STYLE}[kind])

        for widget, value in ((self.ui.bundlePathLineEdit, self._bundle()), (self.ui.llmPathLineEdit, p.llmPath)):
            if widget.currentPath != value:
                widget.currentPath = value
        self.updateModelInfo()
        self.updateVariants()
        self.updateButtons()

    def updateVariants(self):
        p = self._parameterNode
        self._variants, text, self._variantsValid = report.parse_variants((p.variant1, p.variant2, p.variant3))
        self.ui.compareStatusLabel.text = text
        self.ui.compareStatusLabel.setStyleSheet(BAD_STYLE if not self._variantsValid else OK_STYLE if text else "")

    def _bundle(self) -> str:
        return str(resolve_bundle(self._parameterNode.bundlePath))

    def updateModelInfo(self):
        p = self._parameterNode
        if p is None:  # between scene close and the next parameter node (a job may finish meanwhile)
            return
        try:
            summary = read_bundle_summary(self._bundle())
        except (OSError, ValueError) as exc:
            self.ui.bundleInfoLabel.text = f"✗ {exc}"
            self.ui.bundleInfoLabel.setStyleSheet(BAD_STYLE)
            self.ui.llmStatusLabel.text = ""
            self._bundleValid = False
            return
        self._bundleValid = True
        self.ui.bundleInfoLabel.text = (f"{summary['name']} {summary['version']} · id {summary['bundle_id'][:12]} · "
                                        f"text model: {summary['llm_name'] or summary['llm_kind']}")
        self.ui.bundleInfoLabel.setStyleSheet("")
        if summary["llm_kind"] == "none":
            self.ui.llmStatusLabel.text = _("This bundle does not use a language model.")
            self.ui.llmStatusLabel.setStyleSheet("")
            return
        status, ok = noteform.llm_location_status(summary, p.llmPath)
        if self._loadedModel == self._modelKey():
            status, ok = "✓ Loaded; the language model matches the bundle's fingerprint", True
        self.ui.llmStatusLabel.text = status
        self.ui.llmStatusLabel.setStyleSheet(OK_STYLE if ok else (BAD_STYLE if ok is False else ""))

    def updateButtons(self):
        p = self._parameterNode
        if p is None:
            return
        running = self.logic.job is not None and self.logic.job.state == "running"
        ready = bool(p.inputVolume) and self._note is not None and not self._pasteBlocking and self._bundleValid
        self.ui.applyButton.enabled = ready and not running
        self.ui.compareButton.enabled = ready and not running and bool(self._variants) and self._variantsValid
        self.ui.cancelButton.enabled = running
        self.ui.loadModelButton.enabled = self._bundleValid and not running
        if not p.inputVolume:
            self.ui.applyButton.toolTip = _("Choose the planning CT first.")
        elif self._note is None:
            self.ui.applyButton.toolTip = _("Fix the clinical note first (see the message under the prompt).")
        elif self._pasteBlocking:
            self.ui.applyButton.toolTip = f"First {self._pasteBlocking}."
        else:
            self.ui.applyButton.toolTip = f"Contour the CTV for: {self._note.to_prompt()}"

    def _modelKey(self):
        p = self._parameterNode
        return (self._bundle(), p.llmPath or None, noteform.DEVICE_CHOICES[p.device])

    def onBundlePathChanged(self, path):
        if self._parameterNode and self._parameterNode.bundlePath != bundle_reference(path):
            self._parameterNode.bundlePath = bundle_reference(path)

    def onLlmPathChanged(self, path):
        if self._parameterNode and self._parameterNode.llmPath != path:
            self._parameterNode.llmPath = path

    def onSuggestVariants(self):
        if self._note is None:
            return
        suggestions = [v.to_prompt() for v in noteform.suggest_variants(self._note)] + ["", "", ""]
        with slicer.util.NodeModify(self._parameterNode):
            self._parameterNode.variant1, self._parameterNode.variant2, self._parameterNode.variant3 = suggestions[:3]
        self.ui.compareCollapsibleButton.collapsed = False

    def onReadNote(self):
        values = self._paste.read(self.ui.pasteNoteTextEdit.plainText)
        self.setNoteParameters(values)

    def onNoteFieldEdited(self, name):
        widget = getattr(self.ui, noteform.widget_name(name))
        self.setNoteParameters(self._paste.edited(name, widget.value if name == "age" else widget.currentText))

    def setNoteParameters(self, values):
        with slicer.util.NodeModify(self._parameterNode):
            for name, value in values.items():
                setattr(self._parameterNode, name, value)
        self.updateForm()  # also when nothing changed: the tooltips and marks are the paste's

    # -- running -----------------------------------------------------------------------------------
    def onApply(self):
        self.run([self._note])

    def onCompare(self):
        self.run([self._note, *self._variants])

    def run(self, notes):
        p = self._parameterNode
        if any(note is None for note in notes):
            return
        if self._pasteBlocking:  # Apply is disabled then; this guards a script or a stale click
            self.ui.statusLabel.text = f"✗ Not contouring: first {self._pasteBlocking}"
            self.ui.statusLabel.setStyleSheet(BAD_STYLE)
            return
        for warning in self._paste.warnings(p.side):
            self.log(f"Contouring although: {warning}")
        target = p.outputSegmentation
        replace = False
        if target is not None and target.GetSegmentation().GetNumberOfSegments():
            segmentation = target.GetSegmentation()
            names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
            if not slicer.util.confirmOkCancelDisplay(report.replace_question(target.GetName(), names),
                                                      _("Replace segmentation?")):
                return
            replace = True
        try:
            if not self.logic.ensureDependencies(interactive=True, bundle=self._bundle()):
                return
            self.logic.startContour(p.inputVolume, notes, self._bundle(), p.llmPath or None,
                                    noteform.DEVICE_CHOICES[p.device], target, replace,
                                    structures=noteform.STRUCTURE_CHOICES[p.structures])
        except Exception as exc:
            slicer.util.errorDisplay(f"Cannot start contouring: {exc}")
            return
        self.requestDeviceInfo()
        self.log(f"Contouring {len(notes)} note(s): " + " | ".join(n.to_prompt() for n in notes))
        self.ui.progressBar.setRange(0, 0)
        self.ui.statusLabel.text = _("Starting…")
        self.ui.statusLabel.setStyleSheet("")
        self.ui.reviewLabel.text = ""
        self.timer.start()
        self.updateButtons()

    def onCancel(self):
        self.logic.cancel()
        self.ui.statusLabel.text = _("Cancelling… (nothing will be written)")

    def onLoadModel(self):
        p = self._parameterNode
        try:
            if not self.logic.ensureDependencies(interactive=True, bundle=self._bundle()):
                self.showLlmStatus(_("✗ Not loaded: the Python packages it needs were not installed"), BAD_STYLE)
                return
            self._loadRequest = self.logic.requestLoad(self._bundle(), p.llmPath or None,
                                                       noteform.DEVICE_CHOICES[p.device])
        except Exception as exc:  # as for Apply: the reason shows in the module, not only in the console
            self.showLlmStatus(f"✗ Cannot load the model: {exc}", BAD_STYLE)
            self.log(f"Cannot load the model: {exc}")
            return
        self._loadingModel = self._modelKey()
        self.requestDeviceInfo()
        self.showLlmStatus(_("Loading the model in the background…"), "")
        self.timer.start()

    def showLlmStatus(self, text, style):
        self.ui.llmStatusLabel.text = text
        self.ui.llmStatusLabel.setStyleSheet(style)

    def requestDeviceInfo(self):
        """Ask the (started) worker which GPUs it sees, once."""
        if self.logic.deviceInfoRequested:
            return
        self.logic.deviceInfoRequested = True
        self.logic.requestInfo()
        self.timer.start()

    def onLoadPhantom(self):
        # numpy, scipy and SimpleITK are all the phantom needs, and Slicer ships them: no install here
        with slicer.util.tryWithErrorDisplay(_("Could not create the phantom CT."), waitCursor=True):
            self._parameterNode.inputVolume = self.logic.loadPhantomSample()

    def onPoll(self):
        for line in self.logic.drainLog():
            self.ui.logTextEdit.appendPlainText(line)
        for event in self.logic.poll():
            self.onWorkerEvent(event)
        job = self.logic.job
        if job is not None and job.state == "running":
            self.showProgress(job)
        elif job is not None and job is not self._shownJob:
            self._shownJob = job
            self.showOutcome(job)
        if not self.logic.busy():
            self.timer.stop()
        self.updateButtons()

    def onWorkerEvent(self, event):
        kind = event.get("event")
        if kind == "info":
            self.ui.deviceInfoLabel.text = noteform.describe_devices(event)
        elif kind == "loaded" and event.get("id") == self._loadRequest:
            self._loadedModel = self._loadingModel
            self.log(f"Model loaded in {event.get('seconds', 0):.1f} s on {event.get('device')}")
            self.updateModelInfo()
        elif kind == "error" and event.get("id") == self._loadRequest:
            self.ui.llmStatusLabel.text = f"✗ {event.get('message')}"
            self.ui.llmStatusLabel.setStyleSheet(BAD_STYLE)
        elif kind == "died":
            self.log(f"Worker stopped: {event.get('message')}\n{event.get('stderr_tail', '')}")

    def showProgress(self, job):
        if job.stage == "windows" and job.total:
            self.ui.progressBar.setRange(0, job.total)
            self.ui.progressBar.setValue(job.done)
        else:
            self.ui.progressBar.setRange(0, 0)
        self.ui.statusLabel.text = report.progress_text(STAGE_LABELS.get(job.stage, job.stage or "Starting"), job.stage,
                                                        job.done, job.total, job.note_index, job.note_count,
                                                        time.perf_counter() - job._started)

    def showOutcome(self, job):
        self.ui.progressBar.setRange(0, 1)
        self.ui.progressBar.setValue(1 if job.state == "done" else 0)
        if job.state == "done":
            node = job.segmentation_node
            self._loadedModel = (job.bundle, job.llm, job.device)
            self.updateModelInfo()
            self.ui.statusLabel.text = report.outcome_text(node.GetName(), job.seconds, job.loaded_model,
                                                           node.GetSegmentation().GetNumberOfSegments())
            self.ui.statusLabel.setStyleSheet(OK_STYLE)
            self.log(self.ui.statusLabel.text)  # 3D: "Show 3D" in Segmentations (not here: it can take seconds)
            # from the worker's summaries, not the node: the user may hide or delete any segment afterwards
            text, needs_review = report.result_text(job.results)
            self.ui.reviewLabel.text = text
            self.ui.reviewLabel.setStyleSheet(WARN_STYLE if needs_review else OK_STYLE)
            self.log(text)
        elif job.state == "cancelled":
            self.ui.statusLabel.text = f"Cancelled after {job.seconds:.1f} s; nothing was written"
            self.ui.statusLabel.setStyleSheet(WARN_STYLE)
        else:
            self.ui.statusLabel.text = f"✗ {job.error}"
            self.ui.statusLabel.setStyleSheet(BAD_STYLE)
            self.log(f"Failed: {job.error}\n{job.error_detail}")
            if not slicer.app.testingEnabled():
                slicer.util.errorDisplay(f"Contouring failed: {job.error}\n\nThe next Apply starts again; details "
                                         "are in the Log section.", detailedText=job.error_detail)

    def log(self, text):
        logging.info(text)
        self.ui.logTextEdit.appendPlainText(text)


class MMContourLogic(ScriptedLoadableModuleLogic):
    """Owns the warm worker and the current job. Usable without the widget (scripts, tests):
    ``MMContourLogic().contour(ctNode, ["N1, breast conserving surgery, left side"])``."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._client = None
        self.workdir = tempfile.mkdtemp(prefix="MMContour-")
        self.ctCache = None  # the CT as a file for the worker; made on first use (it imports SimpleITK)
        self.installer = InstallLogic.for_this_python(ROOT)
        self.deviceInfoRequested = False
        self.job = None
        self._log = queue.Queue()
        self._requests = set()

    def getParameterNode(self):
        return MMContourParameterNode(super().getParameterNode())

    @staticmethod
    def defaultBundlePath() -> str:
        return str(resolve_bundle(""))

    def client(self) -> WorkerClient:
        if self._client is None:
            python = shutil.which("PythonSlicer") or sys.executable
            self._client = WorkerClient(python=python, pythonpath=[ROOT], log=self._log.put)
        return self._client

    # -- dependencies (MMContourInstall.py) -------------------------------------------------------------
    def missingPackages(self, bundle=None):
        return self.installer.missing(bundle or self.defaultBundlePath())

    def dependenciesInstalled(self, bundle=None) -> bool:
        return not self.missingPackages(bundle)

    def ensureDependencies(self, interactive: bool = True, bundle=None) -> bool:
        """Install PyTorch and the pinned requirements on first use, after the user agrees. Headless runs never
        wait for a dialog: they install only if MMCONTOUR_INSTALL_DEPENDENCIES=1, else raise with instructions."""
        headless = slicer.app.commandOptions().noMainWindow or slicer.app.testingEnabled() or not interactive

        def confirm(listed):
            return slicer.util.confirmOkCancelDisplay(
                "MMContour needs Python packages that are not installed yet:\n  " + "\n  ".join(listed)
                + "\n\nInstall them now? This downloads PyTorch and a few libraries (several minutes, ~2 GB).",
                "Install Python packages")

        return self.installer.ensure(bundle or self.defaultBundlePath(), confirm=None if headless else confirm,
                                     install=os.environ.get(INSTALL_ENVIRONMENT_VARIABLE) == "1")

    # -- requests ----------------------------------------------------------------------------------
    def busy(self) -> bool:
        return (self.job is not None and self.job.state == "running") or bool(self._requests)

    def startContour(self, ctNode, notes, bundle=None, llm=None, device="auto", outputNode=None,
                     replaceConfirmed=False, name=None, requestOptions=None, structures="both"):
        if self.job is not None and self.job.state == "running":
            raise RuntimeError("a contour is already running; cancel it or wait")
        if ctNode is None:
            raise ValueError("choose the planning CT")
        from MMContourLib.slicer.job import ContourJob, CtFileCache  # numpy, SimpleITK: not at Slicer start

        if self.ctCache is None:
            self.ctCache = CtFileCache(self.workdir)
        self.job = ContourJob(self.client(), slicer.mrmlScene, ctNode, notes, bundle or self.defaultBundlePath(),
                                        llm, device, outputNode, replaceConfirmed, ct_cache=self.ctCache,
                                        workdir=self.workdir, name=name, request_options=requestOptions,
                                        structures=structures).start()
        return self.job

    def requestLoad(self, bundle=None, llm=None, device="auto") -> str:
        rid = self.client().send("load", bundle=bundle or self.defaultBundlePath(), llm=llm, device=device)
        self._requests.add(rid)
        return rid

    def requestInfo(self) -> str:
        rid = self.client().send("info")
        self._requests.add(rid)
        return rid

    def cancel(self, graceSeconds: float = 3.0):
        if self.job is not None:
            self.job.cancel(grace_s=graceSeconds)

    def poll(self) -> list:
        """The worker's events since the last call; advances the current job (call from a timer)."""
        if self._client is None:
            return []
        events = self._client.poll()
        for event in events:
            if event.get("event") in ("loaded", "info", "error", "cancelled", "pong") or event.get("event") == "died":
                self._requests.discard(str(event.get("id", "")))
                if event.get("event") == "died":
                    self._requests.difference_update(event.get("pending") or [])
        if self.job is not None and self.job.state == "running":
            self.job.poll(events)
        return events

    def drainLog(self) -> list:
        lines = []
        while not self._log.empty():
            lines.append(self._log.get_nowait())
        return lines

    def contour(self, ctNode, notes, bundle=None, llm=None, device="auto", outputNode=None, replaceConfirmed=False,
                timeout=None, structures="both"):
        """Blocking contour (scripts, tests): returns the segmentation node; raises on failure or cancel.
        ``structures``: both (the CTV and one segment per structure), regions or union."""
        job = self.startContour(ctNode, notes, bundle, llm, device, outputNode, replaceConfirmed,
                                structures=structures)

        def poll():
            slicer.app.processEvents()
            return self.poll()

        try:
            poll_until(lambda: job.finished, poll, timeout, what="contouring")
        except TimeoutError:
            job.cancel(grace_s=0)
            raise
        if job.state != "done":
            raise RuntimeError(job.error or f"contouring {job.state}")
        return job.segmentation_node

    # -- sample data -------------------------------------------------------------------------------
    def loadPhantomSample(self):
        return loadPhantomSample()

    def shutdown(self):
        if self._client is not None:
            self._client.close()
            self._client = None
        shutil.rmtree(self.workdir, ignore_errors=True)


class MMContourTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (Developer mode > Reload and Test, or ctest). CI without Slicer runs Testing/*.py."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        # "Reload and Test" calls runTest outside a unittest runner, where skipTest shows as a failure
        self.setUp()
        self.test_form_shows_the_exact_prompt_and_flags_contradictions()
        reason = self.phantomSkipReason()
        if reason:
            self.delayDisplay(f"Not contouring the phantom: {reason}")
            return
        self.setUp()
        self.test_contour_the_phantom()

    @staticmethod
    def phantomSkipReason():
        logic = MMContourLogic()
        try:
            bundle = logic.defaultBundlePath()
            if not os.path.isfile(os.path.join(bundle, "config.json")):
                return f"no model bundle at {bundle}"
            if not logic.dependenciesInstalled() and os.environ.get(INSTALL_ENVIRONMENT_VARIABLE) != "1":
                return ("Python packages missing: install them (docs/slicer.md) or set "
                        f"{INSTALL_ENVIRONMENT_VARIABLE}=1")
            return None
        finally:
            logic.shutdown()

    def test_form_shows_the_exact_prompt_and_flags_contradictions(self):
        widget = slicer.modules.mmcontour.widgetRepresentation().self()
        p = widget._parameterNode
        p.side, p.leftNStage, p.leftSurgery = "left", "N1", _C["surgery"][0]
        self.assertEqual(widget.ui.promptPreviewLabel.text, "N1, breast conserving surgery, left side")
        self.assertTrue(widget.ui.rightNStageComboBox.isHidden())
        p.side, p.rightNStage, p.rightSurgery = "both", "N2", _C["surgery"][1]
        self.assertEqual(widget.ui.promptPreviewLabel.text,
                         "N1, breast conserving surgery, left side; N2, total mastectomy surgery, right side")
        self.assertFalse(widget.ui.rightNStageComboBox.isHidden())
        p.side, p.leftTStage, p.pathology = "left", "Tis", "IDC"
        self.assertIn("✗", widget.ui.noteStatusLabel.text)
        self.assertFalse(widget.ui.applyButton.enabled)
        p.leftTStage, p.pathology = NOT_STATED, NOT_STATED
        self.assertIn("✓", widget.ui.noteStatusLabel.text)

    def test_contour_the_phantom(self):
        from MMContourLib.note.structures import structure_for
        from MMContourLib.slicer import mrml as slicer_io

        reason = self.phantomSkipReason()
        if reason:
            self.skipTest(reason)
        logic = MMContourLogic()
        try:
            logic.ensureDependencies(interactive=False)
            ct = logic.loadPhantomSample()
            note = "N2, breast conserving surgery, left side"
            node = logic.contour(ct, [note], timeout=900)
            ids = slicer_io.segment_ids(node)  # the CTV, then one per structure a per-structure bundle drew
            self.assertEqual(ids[0], "CTV")
            self.assertTrue(all(structure_for(i)[0] is not None for i in ids))
            self.assertIn("review", logic.job.results[0]["summary"])
            self.assertEqual(node.GetAttribute("MMContour.prompt"), note)
            self.assertTrue(node.GetAttribute("MMContour.llm_fingerprint"))
            mask = slicer_io.segment_mask(node, "CTV", ct)
            self.assertTrue(slicer_io.same_grid(mask, slicer_io.volume_node_to_image(ct)))
            # a non-empty output is never replaced without confirmation
            with self.assertRaises(slicer_io.SegmentationNotEmptyError):
                logic.startContour(ct, [note], outputNode=node)
            # edit the note, contour again: the model stays loaded
            second = logic.contour(ct, ["N0, breast conserving surgery, left side"], timeout=300)
            self.assertFalse(logic.job.loaded_model)
            self.assertIsNot(second, node)
        finally:
            logic.shutdown()
