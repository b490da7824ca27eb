"""Bookkeeping shared by the asset modules (Dagster side only): folders, config overrides, metadata."""

from __future__ import annotations

import base64
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import dagster as dg
import pandas as pd

from reid_pipeline.evaluation.plots import thumbnail_png
from reid_pipeline.partitions import partition_of
from reid_pipeline.pipeline import version_of
from reid_pipeline.resources import ReidSettings
from reid_pipeline.training.loop import remove_training_state

OWNERS = ["team:reid"]


class Overrides(dg.Config):
    """An asset's run config: every field optional; ``None`` (left out) = the library's default,
    which is the paper's value. :meth:`overrides` gives only what the run config set."""

    def overrides(self, *, exclude: set[str] = frozenset()) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None and k not in exclude}


def output_dir(context: dg.AssetExecutionContext, reid: ReidSettings) -> Path:
    """A fresh, timestamped folder for this materialisation of the asset (in its dataset's folder)."""
    return reid.new_artifact_dir(context.asset_key.to_python_identifier(), context.run.run_id, partition_of(context))


@contextmanager
def resume_state(context: dg.AssetExecutionContext, reid: ReidSettings, *parts: Any) -> Iterator[Path]:
    """Where this asset keeps its resumable training state, keyed by what it trains from, held
    exclusively by this step while it trains.

    A rematerialisation from the same inputs and config finds the state and resumes; the state is
    removed when training has finished. Two runs never share it: a second step with the same key
    while the first is alive fails at once, naming the holder (the lock dies with its process).
    """
    key = version_of(*parts)
    folder = reid.work_dir(context.asset_key.to_python_identifier(), key, partition_of(context))
    lock_path = folder.with_name(f"{key}.lock")
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise RuntimeError(
                f"{folder}: another step is training from the same inputs right now ({lock.read().strip() or 'unknown'}); "
                "it owns this resumable state — wait for it to finish"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"run {context.run.run_id}, pid {os.getpid()}")
        lock.flush()
        path = folder / "state.safetensors"
        if path.exists():
            context.log.info(f"resuming from {path}")
        yield path
        remove_training_state(path)  # finished: nothing resumable is left behind, the lock included
        lock_path.unlink(missing_ok=True)


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


def picture_metadata(name: str, path: Path | str, max_side: int = 320) -> dict[str, dg.MetadataValue]:
    """A picture for the UI: a small thumbnail inline (the event log stays light) and the full file as a path."""
    data = base64.b64encode(thumbnail_png(path, max_side)).decode()
    return {
        name: dg.MetadataValue.md(f"![{Path(path).name}](data:image/png;base64,{data})"),
        f"{name}_path": dg.MetadataValue.path(str(path)),
    }


def training_metadata(result: Any, device: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The metadata both training assets report, with the same keys (a LoopResult)."""
    last = result.history[-1] if result.history else {}
    return {
        "final_loss": float(result.final_loss),
        "first_loss": float(result.history[0]["loss"]) if result.history else float("nan"),
        "epochs": int(result.epochs_completed),
        "resumed_from_epoch": int(result.resumed_from_epoch),
        "wall_time_s": float(result.wall_time_s),
        "samples_per_s": float(result.samples_per_s),
        "last_epoch_lr": float(last.get("lr", float("nan"))),
        "precision": result.precision,
        "device": getattr(result, "device", None) or device,  # a torchrun step: rank 0's device × ranks
        "world_size": int(getattr(result, "world_size", 1)),
        **(extra or {}),
    }
