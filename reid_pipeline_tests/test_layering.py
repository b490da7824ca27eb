"""The shape of the code: the library never loads Dagster, and the one use of private Dagster API works."""

from __future__ import annotations

import subprocess
import sys

import dagster as dg

from reid_pipeline_tests.conftest import PROJECT_ROOT

LIBRARY = [
    "reid_pipeline.artifacts",
    "reid_pipeline.data",
    "reid_pipeline.datasets",
    "reid_pipeline.device",
    "reid_pipeline.embedded",
    "reid_pipeline.evaluation",
    "reid_pipeline.model",
    "reid_pipeline.pipeline",
    "reid_pipeline.storage",
    "reid_pipeline.training",
    "reid_pipeline.training.loop",
    "reid_pipeline.training.distributed",
    "reid_pipeline.training.launch",  # dagster-pipes (not dagster) only when run under Pipes, on rank 0
    "reid_pipeline.training.stage1",
    "reid_pipeline.training.stage2",
]


def test_library_imports_without_dagster():
    """In a fresh interpreter: importing every library package leaves dagster unloaded."""
    code = (
        "import importlib, pkgutil, sys\n"
        f"names = {LIBRARY!r}\n"
        "import reid_pipeline.inference as inf\n"
        "names += [m.name for m in pkgutil.walk_packages(inf.__path__, 'reid_pipeline.inference.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m == 'dagster' or m.startswith(('dagster.', 'dagster_')))\n"
        "print('DAGSTER', loaded[:5])\n"
        "raise SystemExit(1 if loaded else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "DAGSTER []" in proc.stdout


def test_private_dagster_api_still_works(tmp_path):
    """``retrain.stale_asset_keys`` is the one place that uses ``dagster._core`` (no public stale-status
    API). Fail loudly, naming the release, when an upgrade moves it."""
    from reid_pipeline.retrain import stale_asset_keys

    versions = iter(["v1", "v2"])

    @dg.asset(code_version="1")
    def upstream() -> dg.Output[None]:
        return dg.Output(None, data_version=dg.DataVersion(next(versions)))

    @dg.asset(deps=[upstream], code_version="1")
    def downstream() -> None: ...

    defs = dg.Definitions(assets=[upstream, downstream])
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        assert dg.materialize([upstream, downstream], instance=instance).success
        try:
            fresh = stale_asset_keys(instance, defs.resolve_asset_graph())
        except (ImportError, AttributeError, TypeError) as exc:  # pragma: no cover - only on a Dagster upgrade
            raise AssertionError(f"dagster {dg.__version__} moved the private stale-status API: {exc}") from exc
        assert fresh == set()
        assert dg.materialize([upstream], instance=instance).success
        assert stale_asset_keys(instance, defs.resolve_asset_graph()) == {dg.AssetKey("downstream")}
