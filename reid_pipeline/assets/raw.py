"""Observable source assets: the raw dataset folders (one partition per dataset) and the CLIP weights file.

Neither is produced by the pipeline; Dagster only *observes* them. Each observation records a
``DataVersion`` built from a cheap fingerprint (names, sizes and modification times — one ``stat``
per file, nothing read), so polling them is cheap. The assets computed from them carry content
versions of their own (``dataset_manifest``: a hash of rows and image bytes; ``frozen_clip``: the
weights' SHA-256), so a mere ``touch`` makes them stale but does not change what flows further down.

``reid_pipeline.sensors.retrain_sensor`` observes both on an interval (every dataset's folder on its
own); the UI's "Observe sources" button and every run of ``reid_pipeline_job`` observe them too.
"""

import warnings
from typing import Callable

import dagster as dg

from reid_pipeline.assets._common import OWNERS
from reid_pipeline.data import directory_fingerprint
from reid_pipeline.partitions import dataset_partitions, partition_of
from reid_pipeline.resources import ReidSettings

__all__ = [
    "raw_dataset",
    "clip_weights",
    "SOURCE_FINGERPRINTS",
    "raw_dataset_fingerprint",
    "clip_weights_fingerprint",
]

def raw_dataset_fingerprint(reid: ReidSettings, dataset: str | None) -> str:
    """The cheap fingerprint of a dataset's root (raises ``FileNotFoundError`` naming a missing root)."""
    return directory_fingerprint(reid.dataset_root(dataset), external_links=reid.external_links)


def clip_weights_fingerprint(reid: ReidSettings, _dataset: str | None = None) -> str:
    """The cheap fingerprint of ``reid.clip_weights`` (the library's
    :func:`~reid_pipeline.model.clip_loader.weights_stat_fingerprint`: path, size, mtime)."""
    from reid_pipeline.model.clip_loader import weights_stat_fingerprint  # lazily: it pulls in torch

    return weights_stat_fingerprint(reid.clip_weights_spec())


def _observable_source(spec: dg.AssetSpec):
    """``multi_observable_source_asset`` for one spec (full AssetSpec: owners, kinds), its beta warning muted."""

    def decorate(fn) -> dg.AssetsDefinition:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dg.BetaWarning)
            return dg.multi_observable_source_asset(name=spec.key.to_python_identifier(), specs=[spec])(fn)

    return decorate


@_observable_source(
    dg.AssetSpec(
        "raw_dataset",
        group_name="data",
        partitions_def=dataset_partitions,
        kinds={"folder"},
        owners=OWNERS,
        description=(
            "A dataset's raw folder (ReidSettings.datasets; one partition per dataset). Observed by a cheap fingerprint "
            "of file names, sizes and modification times; a new fingerprint makes that dataset's manifest and "
            "everything below it stale."
        ),
    )
)
def raw_dataset(context: dg.AssetExecutionContext, reid: ReidSettings) -> dg.ObserveResult:
    dataset = partition_of(context)
    root = reid.dataset_root(dataset)
    version = raw_dataset_fingerprint(reid, dataset)
    context.log.info(f"observed {dataset} at {root}: fingerprint {version[:12]}")
    return dg.ObserveResult(
        data_version=dg.DataVersion(version),
        metadata={"root": dg.MetadataValue.path(str(root)), "fingerprint": version},
    )


@_observable_source(
    dg.AssetSpec(
        "clip_weights",
        group_name="backbone",
        kinds={"pytorch"},
        owners=OWNERS,
        description=(
            "The CLIP weights (ReidSettings.clip_weights): a checkpoint file or an openai-clip model name. "
            "Observed by path, size and modification time; a new fingerprint makes frozen_clip and everything "
            "below it stale."
        ),
    )
)
def clip_weights(context: dg.AssetExecutionContext, reid: ReidSettings) -> dg.ObserveResult:
    version = clip_weights_fingerprint(reid)
    spec = reid.clip_weights_spec()
    context.log.info(f"observed CLIP weights {spec}: fingerprint {version[:12]}")
    return dg.ObserveResult(data_version=dg.DataVersion(version), metadata={"weights": spec, "fingerprint": version})


#: How the observation sensor fingerprints each source, by asset key (same functions as the assets); each
#: takes the settings and the dataset (None for the unpartitioned clip_weights).
SOURCE_FINGERPRINTS: dict[dg.AssetKey, Callable[[ReidSettings, str | None], str]] = {
    raw_dataset.key: raw_dataset_fingerprint,
    clip_weights.key: clip_weights_fingerprint,
}
