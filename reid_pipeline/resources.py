"""Dagster resources: where the data, weights and artefacts live, and which device trains.

Thin wrappers over the library: every method here returns plain Python / torch objects.
"""


import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from reid_pipeline.device import DeviceSpec, resolve_device
from reid_pipeline.artifacts import Artifact, load_descriptor

__all__ = ["ReidSettings", "TrainingDevice", "ArtifactIOManager", "DEFAULT_DATA_ROOT", "DEFAULT_CLIP_WEIGHTS"]

DEFAULT_DATA_ROOT = "data/embedded/synthetic"
DEFAULT_CLIP_WEIGHTS = "data/embedded/tiny_clip_vit.pt"
DEFAULT_STORAGE_DIR = "artifacts"


class ReidSettings(dg.ConfigurableResource):
    """Where the dataset, the CLIP weights and the pipeline's artefacts live.

    Relative paths are resolved against the working directory (the project root when run through
    the Makefile, ``dagster dev`` or ``dagster asset materialize``).
    """

    data_root: str = Field(default=DEFAULT_DATA_ROOT, description="Dataset root (any supported layout).")
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

        if context.instance is not None and context.run_id:
            record_run_worker(context.instance, context.run_id)

    def data_root_path(self) -> Path:
        return Path(self.data_root).expanduser().resolve()

    def clip_weights_spec(self) -> str:
        """The canonical model name (``ViT-B/16``, also from ``vitb16``) or the absolute path of the file.

        A known model name is a name although it contains ``/``; a path is what starts with ``./``,
        ``/``, ``~``, ends like a checkpoint or exists; anything else is an unknown name (a clear error).
        """
        from reid_pipeline.model.clip_loader import resolve_clip_source

        return resolve_clip_source(self.clip_weights, must_exist=False)

    def storage_path(self) -> Path:
        return Path(self.storage_dir).expanduser().resolve()

    def new_artifact_dir(self, asset_name: str, run_id: str) -> Path:
        """A fresh, timestamped folder for one materialisation of ``asset_name``.

        Each run writes into its own folder, so a failed run never overwrites what an earlier
        successful run produced; the IO manager only points at the new folder once the asset
        succeeded.
        """
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", asset_name)
        path = self.storage_path() / safe / f"{stamp}_{run_id[:8]}"
        path.mkdir(parents=True, exist_ok=False)
        return path

    def image_cache_dir(self) -> Path:
        """Where the decode-once image caches live (shared by the assets of this storage folder)."""
        return self.storage_path() / "_image_cache"

    def work_dir(self, asset_name: str, key: str) -> Path:
        """A stable folder for resumable training state, keyed by what the run trains from."""
        path = self.storage_path() / asset_name / "_resume" / key
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

    def load_input(self, context: dg.InputContext) -> Artifact:
        key = context.upstream_output.asset_key if context.upstream_output else context.asset_key
        event = context.instance.get_latest_materialization_event(key)
        name = key.to_user_string()
        if event is None or event.asset_materialization is None:
            raise FileNotFoundError(f"asset {name} has never been materialised in this Dagster instance — materialise it first")
        entry = event.asset_materialization.metadata.get("descriptor")
        if entry is None:
            raise FileNotFoundError(f"the latest materialisation of {name} recorded no descriptor path")
        path = Path(entry.value)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: descriptor of the latest {name} materialisation is gone — rematerialise {name}")
        artifact = load_descriptor(path)
        if artifact.kind != key.path[-1]:
            raise TypeError(f"{path}: descriptor of a {artifact.kind} artefact recorded for asset {name}")
        return artifact
