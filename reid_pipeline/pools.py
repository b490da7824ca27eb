"""The GPU concurrency pool and the Kubernetes tags of the training steps.

The training assets declare ``pool=GPU_POOL`` and ``op_tags=GPU_OP_TAGS``. The project's
``dagster_home/dagster.yaml`` limits every pool to one slot (``concurrency: pools: default_limit: 1``),
so a second run's training step waits until the first one's has finished; ``dagster instance
concurrency set gpu N`` allows N at once (a machine with N GPUs). Under ``dagster-k8s``
(``k8s_job_executor`` or ``K8sRunLauncher``) the tags ask for one ``nvidia.com/gpu`` per training pod
and tolerate the usual GPU-node taint.
"""

from __future__ import annotations

GPU_POOL = "gpu"

GPU_OP_TAGS: dict[str, object] = {
    "dagster-k8s/config": {
        "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}},
        "pod_spec_config": {
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
    }
}
