"""Using a trained encoder: feature extraction, gallery search and ONNX export (no Dagster).

::

    from reid_pipeline.inference import ReIDPredictor, GalleryIndex

    predictor = ReIDPredictor.load("artifacts/visual_encoder/<run>")      # folder, .safetensors or .onnx
    feats = predictor.extract(["a.jpg", "b.jpg"])                          # (2, D), L2-normalised
    index = GalleryIndex.build(predictor, gallery_paths)
    hits = index.search(["query.jpg"], k=10)                              # [SearchResult]

``reid-search`` (:mod:`reid_pipeline.inference.cli`) is the command-line face of the same calls.
"""

from .build import build_gallery_index, labels_from_names, list_images, parse_market_name
from .index import EmptyIndexError, FeatureDimensionError, GalleryIndex, SearchResult
from .onnx_export import DEFAULT_OPSET, OnnxParityError, export_onnx
from .predictor import (
    EncoderMismatchError,
    Extraction,
    ImageFailure,
    ReIDPredictor,
    UnreadableImagesError,
    as_uint8_chw,
)

__all__ = [
    "DEFAULT_OPSET",
    "EmptyIndexError",
    "EncoderMismatchError",
    "Extraction",
    "FeatureDimensionError",
    "GalleryIndex",
    "ImageFailure",
    "OnnxParityError",
    "ReIDPredictor",
    "SearchResult",
    "UnreadableImagesError",
    "as_uint8_chw",
    "build_gallery_index",
    "export_onnx",
    "labels_from_names",
    "list_images",
    "parse_market_name",
]
