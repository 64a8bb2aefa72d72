"""The network, text-image alignment, text encoders and LLM files, model bundles."""
