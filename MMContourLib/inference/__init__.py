"""The Contourer and manifest batches."""
