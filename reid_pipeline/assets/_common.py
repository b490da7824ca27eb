"""Small helpers shared by the asset modules (Dagster-side only)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any, Iterable, Mapping

import dagster as dg
import pandas as pd

OWNERS = ["team:reid"]


def version_of(*parts: Any) -> str:
    """A short, stable version string from any JSON-able parts."""
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\x00")
    return h.hexdigest()[:20]


def table_metadata(df: pd.DataFrame, max_rows: int = 20) -> dg.MetadataValue:
    """A DataFrame as a Dagster table (rendered in the UI)."""
    head = df.head(max_rows)
    columns = []
    for name, dtype in head.dtypes.items():
        kind = "int" if pd.api.types.is_integer_dtype(dtype) else "float" if pd.api.types.is_float_dtype(dtype) else "string"
        columns.append(dg.TableColumn(str(name), kind))
    records = [
        dg.TableRecord({str(k): (v.item() if hasattr(v, "item") else v) for k, v in row.items()})
        for row in head.to_dict(orient="records")
    ]
    return dg.MetadataValue.table(records=records, schema=dg.TableSchema(columns=columns))


def png_metadata(path: Path | str) -> dg.MetadataValue:
    """An image file shown inline in the UI (markdown with a data URI) — the path is kept too."""
    import base64  # noqa: PLC0415

    data = Path(path).read_bytes()
    return dg.MetadataValue.md(f"![{Path(path).name}](data:image/png;base64,{base64.b64encode(data).decode()})")


def line_plot_png(series: Mapping[str, Iterable[float]], title: str, xlabel: str, ylabel: str) -> bytes:
    """Render one or more curves to PNG bytes (matplotlib, Agg)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, values in series.items():
        values = list(values)
        ax.plot(range(1, len(values) + 1), values, label=name, marker="o" if len(values) < 30 else None)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
