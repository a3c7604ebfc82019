"""Scoring models: the paper's test-time views (evaluate.py), and a run or weights directory
on its own test data through any backend (run.py)."""
