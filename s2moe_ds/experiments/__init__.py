"""Comparisons: which runs, with which flags (compare.py), running and evaluating them (runner.py),
and their tables. launch/compare.py is the command line."""
