"""Kubernetes without a cluster: the step pods dagster-k8s would create for this project.

The user-code deployment's environment is read from ``deploy/helm/values.yaml`` (what the README tells
users to install). With it, the project's ``Definitions`` (loaded in a fresh interpreter, as the code
server does) use ``k8s_job_executor``; the pod of each step is then built with dagster-k8s' own code,
in the order its step handler applies the layers: run launcher (the Helm chart's), executor config
(``reid_pipeline.deploy``), the step's ``dagster-k8s/config`` op tags. No API server is contacted.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
import uuid

import dagster as dg
import pytest
import yaml
from dagster_k8s import K8sRunLauncher
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import (
    UserDefinedDagsterK8sConfig,
    construct_dagster_k8s_job,
    get_k8s_job_name,
    get_user_defined_k8s_config,
)
from kubernetes.client import ApiClient

from reid_pipeline.datasets import parse_datasets
from reid_pipeline.deploy import executor_from_env, k8s_executor_config
from reid_pipeline_tests.conftest import PROJECT_ROOT

HELM_VALUES = PROJECT_ROOT / "deploy" / "helm" / "values.yaml"
JOB = "reid_pipeline_job"
GPU = "nvidia.com/gpu"


def gpu_op_tags() -> dict:
    """The training assets' op tags, wherever the Dagster layer keeps them (pools.py after the split)."""
    for module in ("reid_pipeline.pools", "reid_pipeline.automation"):
        try:
            return importlib.import_module(module).GPU_OP_TAGS
        except (ModuleNotFoundError, AttributeError):
            continue
    raise AssertionError("GPU_OP_TAGS is in neither reid_pipeline.pools nor reid_pipeline.automation")


def _user_deployment() -> dict:
    values = yaml.safe_load(HELM_VALUES.read_text())
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    return deployment


def _deployment_env() -> dict[str, str]:
    return {item["name"]: str(item["value"]) for item in _user_deployment()["env"]}


_LOAD_DEFS = textwrap.dedent(
    """
    import json, sys
    import dagster as dg
    from reid_pipeline.definitions import defs, settings

    job = defs.resolve_job_def(sys.argv[1])
    steps = {}
    for key in job.asset_layer.executable_asset_keys:
        assets_def = defs.resolve_assets_def(key)
        op = assets_def.op
        partitions = assets_def.partitions_def.get_partition_keys() if assets_def.partitions_def else None
        steps[op.name] = {"tags": dict(op.tags), "pool": op.pool, "partitions": partitions}
    print(json.dumps({
        "executor": job.executor_def.name,
        "execution": dg.validate_run_config(job, {})["execution"],
        "steps": steps,
        "datasets": settings.datasets,
    }))
    """
)


@pytest.fixture(scope="module")
def code_location() -> dict:
    """What the code server sees with the Helm deployment's environment: executor, its config, step tags."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REID_")}
    env.update(_deployment_env(), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", _LOAD_DEFS, JOB], check=False, cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture()
def run_launcher(tmp_path) -> K8sRunLauncher:
    """The K8sRunLauncher the dagster/dagster chart configures (with a kubeconfig that is never dialled)."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "offline",
        "clusters": [{"name": "offline", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "offline", "user": {"token": "unused"}}],
        "contexts": [{"name": "offline", "context": {"cluster": "offline", "user": "offline"}}],
    }))
    return K8sRunLauncher(
        service_account_name="reid-dagster",
        instance_config_map="reid-dagster-instance",
        postgres_password_secret="reid-postgresql-secret",
        dagster_home="/opt/dagster/dagster_home",
        job_namespace="reid",
        load_incluster_config=False,
        kubeconfig_file=str(kubeconfig),
    )


def step_manifest(step: str, tags: dict[str, str], execution: dict, launcher: K8sRunLauncher) -> dict:
    """The Job manifest for ``step``: the layers merged as dagster-k8s' K8sStepHandler merges them."""
    exc = execution["k8s"]
    run = dg.DagsterRun(job_name=JOB, run_id=str(uuid.uuid4()))
    context = K8sContainerContext.create_for_run(run, launcher, include_run_tags=False)
    # the executor's layer, field by field as k8s_job_executor builds it from its config
    context = context.merge(K8sContainerContext(
        env_vars=exc.get("env_vars"), volume_mounts=exc.get("volume_mounts"), volumes=exc.get("volumes"),
        labels=exc.get("labels"), namespace=exc.get("job_namespace"), resources=exc.get("resources"),
        run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(exc.get("step_k8s_config", {})),
    ))
    context = context.merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(tags)))
    image = _user_deployment()["image"]
    job_config = context.get_k8s_job_config(exc.get("job_image"), launcher).with_image(
        f"{image['repository']}:{image['tag']}"  # the user deployment's image, as the run's origin reports it
    )
    job_name = f"dagster-step-{get_k8s_job_name(run.run_id, step)}"
    job = construct_dagster_k8s_job(
        job_config=job_config,
        args=["dagster", "api", "execute_step"],
        job_name=job_name,
        pod_name=job_name,
        component="step_worker",
        user_defined_k8s_config=context.run_k8s_config,
        labels={"dagster/job": JOB, "dagster/op": step, "dagster/run-id": run.run_id},
        env_vars=[{"name": "DAGSTER_RUN_JOB_NAME", "value": JOB}, {"name": "DAGSTER_RUN_STEP_KEY", "value": step}],
    )
    return ApiClient().sanitize_for_serialization(job)


def test_the_switch_selects_the_executor():
    assert executor_from_env({}) is None  # Dagster's default (multiprocess), as before
    assert executor_from_env({"REID_EXECUTOR": "in_process"}) is dg.in_process_executor
    assert executor_from_env({"REID_EXECUTOR": "multiprocess"}) is dg.multiprocess_executor
    assert executor_from_env({"REID_EXECUTOR": "k8s"}).name == "k8s"
    with pytest.raises(ValueError, match="REID_EXECUTOR='spark'.*k8s"):
        executor_from_env({"REID_EXECUTOR": "spark"})
    with pytest.raises(ValueError, match="REID_K8S_DATA_MOUNT='data'.*absolute"):
        k8s_executor_config({"REID_K8S_DATA_MOUNT": "data"})


def test_the_helm_deployment_loads_the_k8s_executor(code_location):
    assert code_location["executor"] == "k8s"
    config = code_location["execution"]["k8s"]  # accepted by k8s_job_executor's own schema
    reid_env = sorted(name for name in _deployment_env() if not name.startswith("REID_K8S_"))
    assert config["env_vars"] == reid_env
    assert {v["persistent_volume_claim"]["claim_name"] for v in config["volumes"] if "persistent_volume_claim" in v} == {
        "reid-data", "reid-artifacts"}


def test_the_helm_deployment_names_the_dataset_partitions(code_location):
    """REID_DATASETS of the deployment decides the partitions of every per-dataset step and their roots (what
    `dg launch --partition NAME` and the sensor's per-dataset runs use); the backbone stays unpartitioned."""
    datasets = parse_datasets(_deployment_env()["REID_DATASETS"])
    assert code_location["datasets"] == datasets
    steps = code_location["steps"]
    for name in ("dataset_manifest", "prompt_checkpoint", "visual_encoder", "reid_features", "evaluation_metrics"):
        assert steps[name]["partitions"] == sorted(datasets), name
    assert steps["frozen_clip"]["partitions"] is None


def test_training_steps_carry_the_gpu_tags(code_location):
    training = {name: step for name, step in code_location["steps"].items() if step["pool"] == "gpu"}
    assert {"prompt_checkpoint", "visual_encoder"} <= set(training), code_location["steps"].keys()
    for step in training.values():
        assert json.loads(step["tags"]["dagster-k8s/config"]) == gpu_op_tags()["dagster-k8s/config"]
    others = {name for name, step in code_location["steps"].items() if step["pool"] != "gpu"}
    assert "evaluation_metrics" in others
    for name in others:
        assert "dagster-k8s/config" not in code_location["steps"][name]["tags"], name


def _pod(manifest: dict) -> tuple[dict, dict]:
    spec = manifest["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return spec, container


def test_training_step_pod_spec(code_location, run_launcher, monkeypatch):
    deployment_env = _deployment_env()
    for name, value in deployment_env.items():  # the run pod inherits the deployment's env
        monkeypatch.setenv(name, value)
    step = code_location["steps"]["visual_encoder"]
    manifest = step_manifest("visual_encoder", step["tags"], code_location["execution"], run_launcher)
    assert manifest["kind"] == "Job"
    spec, container = _pod(manifest)

    # one GPU, and the GPU nodes' taint tolerated
    assert container["resources"]["limits"][GPU] == "1"
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    # the user deployment's image runs the step
    image = _user_deployment()["image"]
    assert container["image"] == f"{image['repository']}:{image['tag']}"
    assert container["args"] == ["dagster", "api", "execute_step"]

    # data read-only, artefacts writable, a memory-backed /dev/shm for the data-loader workers
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert volumes[mounts["/data"]["name"]]["persistentVolumeClaim"] == {"claimName": "reid-data", "readOnly": True}
    assert mounts["/data"]["readOnly"] is True
    assert volumes[mounts["/artifacts"]["name"]]["persistentVolumeClaim"]["claimName"] == "reid-artifacts"
    assert not mounts["/artifacts"].get("readOnly")
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    # the deployment's mounts are the ones the steps get: the same claims at the same paths
    helm_mounts = {m["mountPath"]: m["name"] for m in _user_deployment()["volumeMounts"]}
    helm_claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in _user_deployment()["volumes"]}
    for path, name in helm_mounts.items():
        assert volumes[mounts[path]["name"]]["persistentVolumeClaim"]["claimName"] == helm_claims[name], path

    # the REID_* environment with the deployment's values; the instance's home and database password
    env = {e["name"]: e for e in container["env"]}
    for name, value in deployment_env.items():
        if not name.startswith("REID_K8S_"):
            assert env[name]["value"] == value, name
    datasets = parse_datasets(env["REID_DATASETS"]["value"])  # name=root items: the dataset partitions
    assert datasets and all(root.startswith("/data/") for root in datasets.values()), datasets
    assert env["REID_STORAGE_DIR"]["value"].startswith("/artifacts/")
    assert env["DAGSTER_HOME"]["value"] == "/opt/dagster/dagster_home"
    assert env["DAGSTER_PG_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "reid-postgresql-secret"
    assert env["DAGSTER_RUN_STEP_KEY"]["value"] == "visual_encoder"
    assert manifest["metadata"]["labels"]["app.kubernetes.io/part-of"] == "reid-pipeline"


def test_non_training_step_pod_has_no_gpu(code_location, run_launcher, monkeypatch):
    for name, value in _deployment_env().items():
        monkeypatch.setenv(name, value)
    step = code_location["steps"]["evaluation_metrics"]
    spec, container = _pod(step_manifest("evaluation_metrics", step["tags"], code_location["execution"], run_launcher))
    assert GPU not in (container.get("resources") or {}).get("limits", {})
    assert not spec.get("tolerations")
    # ...but the same data, artefacts and environment as the training steps
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/data", "/artifacts", "/dev/shm"}
    assert {e["name"] for e in container["env"]} >= {"REID_DATASETS", "REID_CLIP_WEIGHTS", "REID_STORAGE_DIR"}
