"""Benchmarks: presets, measurements, scale-out, the random LLM and synthetic inputs they share with the tests."""
