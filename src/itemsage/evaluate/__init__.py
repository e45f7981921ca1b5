"""Evaluation on the test window (evaluation.py and its parts), its report (report.py), and the
paper's comparisons over seeds (compare.py, compare_runs.py, compare_report.py). `itemsage evaluate`,
`itemsage compare`."""
