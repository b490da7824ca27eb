"""Every Dagster package the project declares is installed, imports, and belongs to one release.

Dagster's core packages (dagster, dagster-webserver, dagster-graphql, dagster-pipes, dagster-shared,
dagster-dg-cli) carry the release number 1.M.P; the integration libraries (dagster-k8s,
dagster-postgres, ...) carry 0.(M+16).P for the same release. A mismatch is what pip produces when
one pin moves ahead of the integrations (it then picks an ancient dagster-k8s that fails on import).
"""

from __future__ import annotations

import importlib
import sys
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from reid_pipeline_tests.conftest import PROJECT_ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: Library releases are numbered 0.(core minor + 16).(core patch) since dagster 1.0 (= 0.16).
LIBRARY_MINOR_OFFSET = 16


def _declared_dagster_requirements() -> list[Requirement]:
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    for extra in project.get("optional-dependencies", {}).values():
        requirements += [Requirement(r) for r in extra]
    return [r for r in requirements if r.name == "dagster" or r.name.startswith("dagster-")]


def _core_release(version: Version) -> tuple[int, int, int]:
    """The core release (1, M, P) a package version belongs to."""
    major, minor, patch = version.release[:3]
    if major == 0:  # an integration library: 0.(M+16).P
        return 1, minor - LIBRARY_MINOR_OFFSET, patch
    return major, minor, patch


DECLARED = _declared_dagster_requirements()


def test_the_project_declares_the_dagster_packages_it_uses():
    names = {r.name for r in DECLARED}
    assert {"dagster", "dagster-webserver", "dagster-graphql", "dagster-pipes", "dagster-dg-cli",
            "dagster-k8s", "dagster-postgres"} <= names, names
    # Exact pins: a range would let pip drift to an unmatched combination.
    for requirement in DECLARED:
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"{requirement} is not pinned exactly"


@pytest.mark.parametrize("requirement", DECLARED, ids=lambda r: r.name)
def test_declared_package_is_installed_imports_and_matches_its_pin(requirement: Requirement):
    installed = metadata.version(requirement.name)
    assert requirement.specifier.contains(installed), f"{requirement.name} {installed} installed, {requirement} declared"
    module = importlib.import_module(requirement.name.replace("-", "_"))
    reported = getattr(module, "__version__", None)
    if reported is not None:  # dagster-pipes does not export one
        assert reported == installed, f"{module.__name__}.__version__ is {reported}, its metadata says {installed}"


def test_all_declared_packages_are_one_release():
    releases = {r.name: _core_release(Version(metadata.version(r.name))) for r in DECLARED}
    core = releases["dagster"]
    assert core[0] == 1
    assert all(release == core for release in releases.values()), releases


def test_installed_integrations_were_built_for_the_installed_dagster():
    """What each installed Dagster distribution itself requires of its siblings is what is installed."""
    for requirement in DECLARED:
        for dependency in map(Requirement, metadata.requires(requirement.name) or []):
            if dependency.marker is not None and not dependency.marker.evaluate({"extra": ""}):
                continue
            if dependency.name == "dagster" or dependency.name.startswith("dagster-"):
                installed = metadata.version(dependency.name)
                assert dependency.specifier.contains(installed), (
                    f"{requirement.name} requires {dependency}, but {dependency.name} {installed} is installed"
                )
