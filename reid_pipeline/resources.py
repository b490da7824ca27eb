"""Dagster resources: where the data, weights and artefacts live, and which device trains.

Thin wrappers over the library: every method here returns plain Python / torch objects.
"""


import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from reid_pipeline.artifacts import Artifact, load_descriptor
from reid_pipeline.datasets import EMBEDDED_DATASETS
from reid_pipeline.device import DeviceSpec, resolve_device

__all__ = ["ReidSettings", "TrainingDevice", "ArtifactIOManager", "DEFAULT_CLIP_WEIGHTS"]

#: input metadata of an unpartitioned asset that reads every dataset of a per-dataset input (a dict)
ALL_DATASETS = "reid/all_datasets"
DEFAULT_CLIP_WEIGHTS = "data/embedded/tiny_clip_vit.pt"
DEFAULT_STORAGE_DIR = "artifacts"


class ReidSettings(dg.ConfigurableResource):
    """Where the datasets, the CLIP weights and the pipeline's artefacts live.

    ``datasets`` maps each dataset (a partition key of :data:`reid_pipeline.partitions.dataset_partitions`)
    to its root folder. Relative paths are resolved against the working directory (the project root when
    run through the Makefile, ``dg dev`` or ``dagster asset materialize``).
    """

    datasets: dict[str, str] = Field(
        default=dict(EMBEDDED_DATASETS),
        description="Dataset name (partition key) → root folder (any supported layout). Default: REID_DATASETS.",
    )
    clip_weights: str = Field(
        default=DEFAULT_CLIP_WEIGHTS,
        description="A CLIP model name (ViT-B/16, RN50, vitb16, rn50, …) or the path of a checkpoint file.",
    )
    external_links: str = Field(
        default="skip",
        description="Symlinks in the data root that resolve outside it: skip (default; reported) or keep (followed). "
                    "Applies to the raw_dataset fingerprint and to the manifest alike.",
    )
    storage_dir: str = Field(
        default=DEFAULT_STORAGE_DIR,
        description="Base folder for manifests, checkpoints, features and metrics (local path).",
    )

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Every step that uses this resource tags its run with the host, so that a run whose process
        tree dies can be recognised and reaped (:mod:`reid_pipeline.operations`)."""
        from reid_pipeline.operations import record_run_worker

        if context.instance is not None and context.run is not None:
            record_run_worker(context.instance, context.run.run_id)

    def dataset_root(self, name: str | None) -> Path:
        """The root folder of dataset ``name`` (a partition key); a clear error for none or an unknown one."""
        known = ", ".join(sorted(self.datasets)) or "none"
        if name is None:
            raise ValueError(f"this asset is partitioned by dataset: launch it for one (--partition NAME; configured: {known})")
        if name not in self.datasets:
            raise ValueError(f"dataset {name!r} has no root in reid.datasets (configured: {known}) — "
                             "add it to REID_DATASETS (name=root) or to the resource config")
        return Path(self.datasets[name]).expanduser().resolve()

    def clip_weights_spec(self) -> str:
        """The canonical model name (``ViT-B/16``, also from ``vitb16``) or the absolute path of the file.

        A known model name is a name although it contains ``/``; a path is what starts with ``./``,
        ``/``, ``~``, ends like a checkpoint or exists; anything else is an unknown name (a clear error).
        """
        from reid_pipeline.model.clip_loader import resolve_clip_source

        return resolve_clip_source(self.clip_weights, must_exist=False)

    def storage_path(self) -> Path:
        return Path(self.storage_dir).expanduser().resolve()

    def asset_dir(self, asset_name: str, partition: str | None = None) -> Path:
        """``storage/<asset>`` — or ``storage/<asset>/<dataset>`` for one partition of a per-dataset asset."""
        path = self.storage_path() / re.sub(r"[^A-Za-z0-9_.-]", "_", asset_name)
        return path / re.sub(r"[^A-Za-z0-9_.-]", "_", partition) if partition is not None else path

    def new_artifact_dir(self, asset_name: str, run_id: str, partition: str | None = None) -> Path:
        """A fresh, timestamped folder for one materialisation of ``asset_name`` (of one dataset).

        Each run writes into its own folder, so a failed run never overwrites what an earlier
        successful run produced; the IO manager only points at the new folder once the asset
        succeeded. Each dataset (partition) has folders of its own.
        """
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = self.asset_dir(asset_name, partition) / f"{stamp}_{run_id[:8]}"
        path.mkdir(parents=True, exist_ok=False)
        return path

    def image_cache_dir(self) -> Path:
        """Where the decode-once image caches live (shared by the assets of this storage folder)."""
        return self.storage_path() / "_image_cache"

    def work_dir(self, asset_name: str, key: str, partition: str | None = None) -> Path:
        """A stable folder for resumable training state, keyed by what the run trains from."""
        path = self.asset_dir(asset_name, partition) / "_resume" / key
        path.mkdir(parents=True, exist_ok=True)
        return path


class TrainingDevice(dg.ConfigurableResource):
    """The device the training assets run on.

    ``device``: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
    ``precision``: ``auto`` (bf16 autocast on a GPU that has it, else fp16 with a grad scaler; fp32 on
    the CPU), ``fp32``, ``bf16`` or ``fp16``.
    """

    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    precision: str = Field(default="auto", description="auto | fp32 | bf16 | fp16")
    num_threads: int = Field(default=0, description="CPU threads for torch (0 = torch's default).")

    def spec(self) -> DeviceSpec:
        if self.num_threads > 0:
            import torch

            torch.set_num_threads(self.num_threads)
        return resolve_device(self.device, self.precision)


class ArtifactIOManager(dg.ConfigurableIOManager):
    """Passes each asset's typed descriptor (:mod:`reid_pipeline.artifacts`) to the assets below it.

    Assets write their tensors themselves (safetensors + JSON sidecars, atomically, in a fresh
    timestamped folder) and return the descriptor of that folder; it is saved there as
    ``descriptor.json`` and its path recorded in the materialisation's metadata. Downstream assets
    get the descriptor of the latest *successful* materialisation, validated against its model.
    Nothing is pickled, and nothing of an earlier materialisation is touched.
    """

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        name = context.asset_key.to_user_string()
        if not isinstance(obj, Artifact):
            raise TypeError(
                f"asset {name} returned {type(obj).__name__}; this IO manager stores typed descriptors "
                "(reid_pipeline.artifacts.Artifact)"
            )
        path = obj.save()
        context.add_output_metadata({"descriptor": dg.MetadataValue.path(str(path))})

    def load_input(self, context: dg.InputContext) -> Artifact | dict[str, Artifact]:
        key = context.upstream_output.asset_key if context.upstream_output else context.asset_key
        if not context.has_asset_partitions:
            return self._latest(context.instance, key, None)
        if not (context.definition_metadata or {}).get(ALL_DATASETS):  # a dataset's step reads that dataset upstream
            (partition,) = context.asset_partition_keys
            return self._latest(context.instance, key, partition)
        found = {}
        for partition in sorted(context.asset_partition_keys):
            try:
                found[partition] = self._latest(context.instance, key, partition)
            except _NeverMaterialised:
                continue
        return found

    @staticmethod
    def _latest(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None) -> Artifact:
        name = key.to_user_string() + (f" [{partition}]" if partition is not None else "")
        if partition is None:
            event = instance.get_latest_materialization_event(key)
            materialization = event.asset_materialization if event is not None else None
        else:
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1).records
            materialization = records[0].asset_materialization if records else None
        if materialization is None:
            raise _NeverMaterialised(f"asset {name} has never been materialised in this Dagster instance — materialise it first")
        entry = materialization.metadata.get("descriptor")
        if entry is None:
            raise FileNotFoundError(f"the latest materialisation of {name} recorded no descriptor path")
        path = Path(entry.value)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: descriptor of the latest {name} materialisation is gone — rematerialise it")
        artifact = load_descriptor(path)
        if artifact.kind != key.path[-1]:
            raise TypeError(f"{path}: descriptor of a {artifact.kind} artefact recorded for asset {name}")
        return artifact


class _NeverMaterialised(FileNotFoundError):
    """An input asset (or dataset) with no materialisation yet."""
