"""Helpers shared by test modules and the benchmarks: synthetic inputs, no tests and no fixtures.

Test modules import from here, never from each other or from `conftest` (pytest loads those itself, and
importing them a second time runs their module code twice under another name).
"""
