"""What users call: the Python API, the command line and the reports.
"""

__all__ = ["api", "cli", "report"]
