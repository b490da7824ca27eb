"""Data layer: dataset layouts, the manifest, fingerprints and image checks.

Plain Python/pandas/PIL; importing it pulls in neither dagster nor torch. The synthetic generator of
the embedded default lives in :mod:`reid_pipeline.embedded.synthetic`.
"""

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
    "Layout",
    "DatasetLayoutError",
    "BadImageError",
    "ManifestReport",
    "build_manifest",
    "build_manifest_with_report",
    "summarize_manifest",
    "detect_layout",
    "get_layout",
    "directory_fingerprint",
    "manifest_fingerprint",
    "file_sha1",
    "check_image_file",
    "find_bad_images",
]
