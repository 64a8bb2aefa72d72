"""MMContour: LLM-driven, clinical-note-conditioned breast CTV contouring (plain Python; no Slicer imports)."""
__version__ = "0.1.0"
