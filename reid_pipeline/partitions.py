"""Datasets side by side: the ``datasets`` partitions of every per-dataset asset (Dagster side).

Static partitions, read where the code location loads (:func:`reid_pipeline.datasets.datasets_from_env`:
``REID_DATASETS``, else ``REID_DATA_ROOT``, else the embedded ``synthetic`` and ``synthetic-ci``). Every
process that loads the definitions — ``dg launch``, ``dg dev``'s webserver and daemon, a k8s step pod —
derives the same keys from the same configuration, with no registration step and nothing stored in the
instance first, so ``dg launch --partition market1501`` works on a fresh instance. Adding a dataset is
one more ``name=root`` and a reload of the code location; a dataset dropped from the list keeps its
history in the instance. The roots themselves are :class:`~reid_pipeline.resources.ReidSettings.datasets`
(resource config: a run may point a name at another folder).
"""

from __future__ import annotations

import dagster as dg

from reid_pipeline.datasets import datasets_from_env

__all__ = ["CONFIGURED_DATASETS", "dataset_partitions", "partition_of"]

#: name → root, as configured where this code location loaded
CONFIGURED_DATASETS: dict[str, str] = datasets_from_env()
dataset_partitions = dg.StaticPartitionsDefinition(sorted(CONFIGURED_DATASETS))


def partition_of(context) -> str | None:
    """The dataset (partition key) a step runs for; None for an unpartitioned asset, also when it runs in
    a dataset's run (``frozen_clip``, ``cross_domain_metrics``)."""
    if not getattr(context, "has_partition_key", False):
        return None
    assets_def = getattr(context, "assets_def", None)
    if assets_def is not None and assets_def.partitions_def is None:
        return None
    return context.partition_key
