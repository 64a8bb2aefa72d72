"""The manifest, training datasets and patches, synthetic phantoms."""
