"""Long-context evaluation: the RULER-style synthetic suite (`longcpm eval`), its scoring, table and JSON."""

from .report import format_table, load_json, metadata, summary, timing, write_json
from .scoring import RULES, score
from .suite import EvalError, Loader, resolve_tasks, run_suite

__all__ = ["RULES", "EvalError", "Loader", "format_table", "load_json", "metadata", "resolve_tasks", "run_suite",
           "score", "summary", "timing", "write_json"]
