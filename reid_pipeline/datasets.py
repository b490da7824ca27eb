"""The datasets a deployment keeps side by side: a name (the Dagster partition key) → its root folder.

Where they come from, first match wins (:func:`datasets_from_env`):

* ``REID_DATASETS``: ``name=root`` items separated by commas (``market1501=/data/Market-1501,dukemtmc=/data/Duke``;
  a bare ``root`` is named after its folder), or the path of a YAML file mapping names to roots, at the
  top level or under ``datasets:``;
* ``REID_DATA_ROOT``: one dataset, named after its folder (``/data/Market-1501`` → ``market-1501``);
* else the embedded default: ``synthetic`` (the demo) and ``synthetic-ci`` (the CI preset).

Names are lower-case partition keys (letters, digits, ``_ . -``); relative roots are relative to the
working directory, like every other path of the pipeline. No Dagster here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import yaml

__all__ = ["EMBEDDED_DATASETS", "DATASETS_ENV", "dataset_name", "parse_datasets", "datasets_from_env", "check_name"]

DATASETS_ENV = "REID_DATASETS"
EMBEDDED_DATASETS: dict[str, str] = {"synthetic": "data/embedded/synthetic", "synthetic-ci": "data/embedded/synthetic-ci"}
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def check_name(name: str, where: str) -> str:
    """``name`` if it is a valid dataset name, else a ``ValueError`` saying where it came from."""
    if not _NAME.match(name):
        raise ValueError(f"{where}: dataset name {name!r} — expected 1-64 lower-case letters, digits, '_', '.' or '-', "
                         "starting with a letter or digit")
    return name


def dataset_name(root: str | os.PathLike) -> str:
    """The name a root gets when none is given: its folder name, lower-cased, other characters as ``-``."""
    base = Path(os.path.normpath(os.path.expanduser(str(root)))).name
    slug = re.sub(r"[^a-z0-9_.-]+", "-", base.lower()).strip("-._")[:64]
    if not slug:
        raise ValueError(f"dataset root {str(root)!r}: cannot name a dataset after it — give it a name (name=root)")
    return slug


def _add(out: dict[str, str], name: str, root: object, where: str) -> None:
    if not isinstance(root, str) or not root.strip():
        raise ValueError(f"{where}: dataset {name!r} — expected a root folder (a path), got {root!r}")
    check_name(name, where)
    if name in out:
        raise ValueError(f"{where}: dataset {name!r} is named twice")
    out[name] = root.strip()


def _from_yaml(path: Path) -> dict[str, str]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"datasets file {str(path)!r}: unreadable or not YAML ({exc})") from None
    if isinstance(data, dict) and set(data) == {"datasets"}:
        data = data["datasets"]
    if not isinstance(data, dict) or not data:
        raise ValueError(f"datasets file {str(path)!r}: expected a mapping of dataset names to root folders")
    out: dict[str, str] = {}
    for name, value in data.items():
        root = value.get("root") if isinstance(value, dict) else value
        _add(out, str(name), root, f"datasets file {str(path)!r}")
    return out


def parse_datasets(spec: str) -> dict[str, str]:
    """Datasets from a ``REID_DATASETS`` value (see the module docstring)."""
    spec = spec.strip()
    if not spec:
        raise ValueError(f"{DATASETS_ENV} is empty: expected name=root items or a YAML file")
    if spec.endswith((".yaml", ".yml")) or ("=" not in spec and "," not in spec and Path(spec).is_file()):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ValueError(f"{DATASETS_ENV}={spec!r}: datasets file does not exist")
        return _from_yaml(path)
    out: dict[str, str] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, sep, root = item.partition("=")
        name, root = (name.strip(), root.strip()) if sep else (dataset_name(item), item)
        _add(out, name, root, f"{DATASETS_ENV} item {item!r}")
    return out


def datasets_from_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The configured datasets: ``REID_DATASETS``, else ``REID_DATA_ROOT``, else :data:`EMBEDDED_DATASETS`."""
    environ = os.environ if environ is None else environ
    if environ.get(DATASETS_ENV, "").strip():
        return parse_datasets(environ[DATASETS_ENV])
    root = environ.get("REID_DATA_ROOT", "").strip()
    if root:
        return {dataset_name(root): root}
    return dict(EMBEDDED_DATASETS)
