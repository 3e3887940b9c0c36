"""The experiments behind each claim of the tour: one module per experiment.

Each module exposes a `run_<name>(quick, out_dir, progress=None, budget_s=None)` function that
returns rows for results.json and writes its plot into out_dir; bench/<name>.py is a thin
command-line entry point over it.
"""
