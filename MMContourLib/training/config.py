"""Training's torch-free constants: the text-encoder kinds and their default models, and the regions that
region-weighted training emphasises (what ``mmcontour train --help`` shows without loading torch)."""
from __future__ import annotations

from ..model.sources import MINILM_SOURCE, SMOLLM2_SOURCE
from ..note.targets import NODAL_LABELS

#: Label values of the manifest's ``regions`` maps that ``--region-weight`` emphasises by default: the
#: nodal levels (axilla, supraclavicular, internal mammary, both sides) of ``phantom.REGION_LABELS``.
DEFAULT_EMPHASIS_LABELS = NODAL_LABELS
TEXT_ENCODER_KINDS = {"llm": "causal-lm", "encoder": "encoder", "none": "none"}
DEFAULT_SOURCES = {"causal-lm": SMOLLM2_SOURCE, "encoder": MINILM_SOURCE, "none": ""}
