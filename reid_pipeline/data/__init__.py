"""Data layer: dataset layouts, the manifest, fingerprints, image checks and a synthetic dataset.

Plain Python/pandas/PIL; importing it pulls in neither dagster nor torch. The synthetic generator
is imported lazily (on first access of its names) so that ``python -m reid_pipeline.data.synthetic``
does not find its own module already imported by the package.
"""

from typing import Any

from .fingerprint import directory_fingerprint, file_sha1, manifest_fingerprint
from .layouts import LAYOUTS, SPLITS, DatasetLayoutError, Layout, detect_layout, get_layout
from .manifest import (
    MANIFEST_COLUMNS,
    ManifestReport,
    build_manifest,
    build_manifest_with_report,
    summarize_manifest,
)
from .validation import BadImageError, check_image_file, find_bad_images

__all__ = [
    "LAYOUTS",
    "SPLITS",
    "MANIFEST_COLUMNS",
    "PRESETS",
    "Layout",
    "DatasetLayoutError",
    "BadImageError",
    "ManifestReport",
    "SyntheticDatasetInfo",
    "build_manifest",
    "build_manifest_with_report",
    "summarize_manifest",
    "detect_layout",
    "get_layout",
    "generate_synthetic_dataset",
    "directory_fingerprint",
    "manifest_fingerprint",
    "file_sha1",
    "check_image_file",
    "find_bad_images",
]

_LAZY = {"PRESETS", "SyntheticDatasetInfo", "generate_synthetic_dataset"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
