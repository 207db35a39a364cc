"""Benchmark scenarios, the embedded demo and the glyph proving ground (data and base models made offline)."""
