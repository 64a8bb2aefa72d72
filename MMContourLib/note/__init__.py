"""The clinical note (ClinicalNote), the Slicer form's logic and the guideline target rules; imports nothing of ours."""
