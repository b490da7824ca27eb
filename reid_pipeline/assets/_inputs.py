"""Loading what upstream assets produced (Dagster-side glue around the library)."""

from pathlib import Path

import pandas as pd

from reid_pipeline.data.cache import ImageCache
from reid_pipeline.resources import ReidSettings


def read_manifest(descriptor: dict) -> pd.DataFrame:
    path = Path(descriptor["manifest"])
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest file of the latest dataset_manifest is gone — rematerialise dataset_manifest")
    return pd.read_parquet(path)


def split_rows(df: pd.DataFrame, split: str) -> pd.DataFrame:
    rows = df[df.split == split].reset_index(drop=True)
    if rows.empty:
        raise ValueError(f"the manifest has no {split!r} images")
    return rows


def image_cache(reid: ReidSettings, manifest: dict, rows: pd.DataFrame, log=None) -> ImageCache:
    """Decode-once uint8 cache of ``rows`` on disk under the storage folder, shared between assets."""
    progress = None
    if log is not None:
        def progress(done: int, total: int) -> None:
            if done == total or done % 2000 == 0:
                log.info(f"decoded {done}/{total} images")
    return ImageCache.from_paths(
        manifest["root"], list(rows.path), mode="disk", cache_dir=reid.storage_path() / "_image_cache",
        key=manifest["fingerprint"], progress=progress,
    )
