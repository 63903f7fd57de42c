"""Accuracy and fidelity of sparse decode: `python -m nanodp.eval` (nanodp/eval/harness.py)."""
