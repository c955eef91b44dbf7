"""A one-screen text table of metrics with one column per run (e.g. untrained, sft, dpo)."""

from numbers import Number
from typing import Mapping, Optional, Sequence


def flatten_metrics(metrics: Mapping, max_depth: Optional[int] = None, prefix: str = "") -> dict:
    """Numeric leaves (and None) of nested dicts keyed 'outer/inner'; lists are dropped, deeper dicts too if
    `max_depth` (levels of keys kept) is reached."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if max_depth is None or max_depth > 1:
                deeper = None if max_depth is None else max_depth - 1
                flat.update(flatten_metrics(value, deeper, prefix=f"{name}/"))
        elif value is None or (isinstance(value, Number) and not isinstance(value, bool)):
            flat[name] = value
    return flat


def _cell(value) -> str:
    """A number as the table shows it: integers whole, other numbers to 4 decimals, missing as '-'."""
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{float(value):.4f}"


def format_table(results: Mapping[str, Mapping], metrics: Optional[Sequence[str]] = None, max_depth: int = 2) -> str:
    """Rows = metrics, columns = runs (in the order given); '-' where a run lacks a metric.

    Each run's dict is flattened with `flatten_metrics` ('clinical/macro_f1'); by default every numeric entry up
    to `max_depth` key levels is a row, in first-seen order, which keeps per-finding details (one level deeper in
    `clinical_metrics`' output) and per-report lists off the screen. `metrics` picks and orders rows explicitly
    (any depth).
    """
    if not isinstance(results, Mapping) or not results:
        raise ValueError(f"results must be a non-empty dict run name -> metrics dict, got {results!r:.80}")
    for run, values in results.items():
        if not isinstance(values, Mapping):
            raise TypeError(f"results[{run!r}] must be a dict of metrics, got {type(values).__name__}")
    depth = None if metrics is not None else max_depth
    flat = {str(run): flatten_metrics(values, depth) for run, values in results.items()}
    if metrics is None:
        rows = list(dict.fromkeys(name for values in flat.values() for name in values))
    else:
        rows = [str(name) for name in metrics]
        unknown = [name for name in rows if all(name not in values for values in flat.values())]
        if unknown:
            known = sorted({name for values in flat.values() for name in values})
            raise ValueError(f"metrics {unknown} are in no run's results; known metrics: {known}")
    runs = list(flat)
    cells = [[name] + [_cell(flat[run].get(name)) for run in runs] for name in rows]
    header = ["metric"] + runs
    widths = [max(len(row[col]) for row in [header] + cells) for col in range(len(header))]

    def line(row):
        return "  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])])

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule] + [line(row) for row in cells])
