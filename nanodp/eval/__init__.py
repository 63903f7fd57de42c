"""Accuracy and fidelity of sparse decode: `python -m nanodp.eval` (nanodp/eval/cli.py)."""
