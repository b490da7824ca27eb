"""Where the steps run: the executor the ``Definitions`` use, chosen by ``REID_EXECUTOR``.

``REID_EXECUTOR`` (read when the code location loads):

* unset / ``default`` — Dagster's default: every step in its own process (``multiprocess``), or in one
  process when a run asks for it; what ``make demo``, ``make ui`` and the tests use;
* ``multiprocess`` / ``in_process`` — that executor, always;
* ``k8s`` — ``dagster_k8s.k8s_job_executor``: every step is a Kubernetes Job. The training steps'
  ``dagster-k8s/config`` op tags (the ``gpu`` pool's tags) add one ``nvidia.com/gpu`` and the GPU-node
  toleration to their pods; :func:`k8s_executor_config` adds what every step pod needs: the
  ``REID_*`` environment, the data and artefact volumes, and a memory-backed ``/dev/shm`` for the
  PyTorch data-loader workers.

The Kubernetes settings come from ``REID_K8S_*`` variables (all optional)::

    REID_K8S_NAMESPACE        namespace of the step jobs (default: the run launcher's)
    REID_K8S_IMAGE            image of the step pods (default: the user-code deployment's image)
    REID_K8S_DATA_CLAIM       PersistentVolumeClaim with datasets and CLIP weights (default reid-data),
    REID_K8S_DATA_MOUNT         mounted read-only at this path (default /data)
    REID_K8S_ARTIFACTS_CLAIM  PersistentVolumeClaim for the artefacts (default reid-artifacts),
    REID_K8S_ARTIFACTS_MOUNT    mounted read-write at this path (default /artifacts)
    REID_K8S_SHM_SIZE         size limit of /dev/shm (default 8Gi)

Every other ``REID_*`` variable set where the code location loads (``REID_DATASETS``,
``REID_CLIP_WEIGHTS``, ``REID_STORAGE_DIR``, ``REID_RUN_CONFIG``, ...) is passed on by name: each step
pod gets the value the run's pod has (the Helm chart's ``env`` of the user-code deployment), so it
derives the same dataset partitions and roots as the code server.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import dagster as dg

__all__ = ["EXECUTOR_CHOICES", "EXECUTOR_ENV", "executor_from_env", "k8s_executor_config"]

#: The environment switch.
EXECUTOR_ENV = "REID_EXECUTOR"
EXECUTOR_CHOICES = ("default", "multiprocess", "in_process", "k8s")

DATA_VOLUME = "reid-data"
ARTIFACTS_VOLUME = "reid-artifacts"
SHM_VOLUME = "dshm"


def _setting(environ: Mapping[str, str], name: str, default: str) -> str:
    value = environ.get(name, "").strip()
    return value or default


def _mount_path(environ: Mapping[str, str], name: str, default: str) -> str:
    path = _setting(environ, name, default)
    if not path.startswith("/"):
        raise ValueError(f"{name}={path!r}: expected an absolute path inside the pod (e.g. {default})")
    return path


def k8s_executor_config(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``k8s_job_executor`` config for this project, from ``REID_K8S_*`` (see the module docstring).

    The ``REID_*`` variables (other than ``REID_K8S_*``) present in ``environ`` are listed by name only,
    so dagster-k8s copies their values from the run's own environment into every step pod.
    """
    environ = os.environ if environ is None else environ
    data_mount = _mount_path(environ, "REID_K8S_DATA_MOUNT", "/data")
    artifacts_mount = _mount_path(environ, "REID_K8S_ARTIFACTS_MOUNT", "/artifacts")
    if data_mount == artifacts_mount:
        raise ValueError(f"REID_K8S_DATA_MOUNT and REID_K8S_ARTIFACTS_MOUNT are both {data_mount!r}: expected two paths")
    config: dict[str, Any] = {
        "env_vars": sorted(name for name in environ if name.startswith("REID_") and not name.startswith("REID_K8S_")),
        "volumes": [
            {"name": DATA_VOLUME, "persistent_volume_claim": {
                "claim_name": _setting(environ, "REID_K8S_DATA_CLAIM", "reid-data"), "read_only": True}},
            {"name": ARTIFACTS_VOLUME, "persistent_volume_claim": {
                "claim_name": _setting(environ, "REID_K8S_ARTIFACTS_CLAIM", "reid-artifacts")}},
            {"name": SHM_VOLUME, "empty_dir": {"medium": "Memory", "size_limit": _setting(environ, "REID_K8S_SHM_SIZE", "8Gi")}},
        ],
        "volume_mounts": [
            {"name": DATA_VOLUME, "mount_path": data_mount, "read_only": True},
            {"name": ARTIFACTS_VOLUME, "mount_path": artifacts_mount},
            {"name": SHM_VOLUME, "mount_path": "/dev/shm"},
        ],
        "labels": {"app.kubernetes.io/part-of": "reid-pipeline"},
    }
    namespace = environ.get("REID_K8S_NAMESPACE", "").strip()
    if namespace:
        config["job_namespace"] = namespace
    image = environ.get("REID_K8S_IMAGE", "").strip()
    if image:
        config["job_image"] = image
    return config


def executor_from_env(environ: Mapping[str, str] | None = None) -> dg.ExecutorDefinition | None:
    """The executor named by ``REID_EXECUTOR`` (None: Dagster's default executor).

    Raises:
        ValueError: ``REID_EXECUTOR`` names no known executor.
    """
    environ = os.environ if environ is None else environ
    choice = environ.get(EXECUTOR_ENV, "").strip().lower().replace("-", "_") or "default"
    if choice == "default":
        return None
    if choice == "multiprocess":
        return dg.multiprocess_executor
    if choice == "in_process":
        return dg.in_process_executor
    if choice == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor.configured(k8s_executor_config(environ), name="k8s")
    raise ValueError(f"{EXECUTOR_ENV}={environ[EXECUTOR_ENV]!r}: expected one of {', '.join(EXECUTOR_CHOICES)}")
