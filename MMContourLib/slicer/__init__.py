"""MRML conversion, the Slicer Apply job, the model worker (client and server); imports Slicer only inside functions."""
