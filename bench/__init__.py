"""Benchmarks, beside the JSON they write (``make bench``, ``python -m bench``): speed and
memory live here, never in timed tests."""
