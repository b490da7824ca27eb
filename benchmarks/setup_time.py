"""What `make demo`'s set-up costs before any training, side by side in one run.

* ``draw``: the synthetic generator drawing the pre-training set (``data/embedded/pretrain-captions``'s
  arguments) in one thread against ``--workers`` threads; the files are compared byte for byte.
* ``install`` (``--install``; about seven minutes): this project installed into four fresh virtual
  environments (the venv's creation counted): with pip compiling every module to bytecode (pip's default),
  with pip ``--no-compile``, and with uv as the Makefile does (pip installs uv into the venv, uv installs
  the project), first with an empty uv cache (a fresh machine), then again with it warm; then what the
  demo imports, twice in a row after each (the first process writes the bytecode of what it imports, the
  next one reads it); after pip ``--no-compile`` also once before, with ``PYTHONDONTWRITEBYTECODE=1`` (as on
  this project's machines: Python compiles what the process imports and keeps nothing, so every process
  pays again).

    python benchmarks/setup_time.py [--workers 2] [--repeats 2] [--install]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reid_pipeline.embedded.build import PRETRAIN_DATASET  # noqa: E402
from reid_pipeline.embedded.synthetic import generate_synthetic_dataset  # noqa: E402

DEMO_IMPORTS = "import torch, dagster, clip, reid_pipeline.definitions"


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def draw(workers: int, repeats: int) -> None:
    _, kwargs = PRETRAIN_DATASET
    times: dict[int, list[float]] = {1: [], workers: []}
    digests = {}
    with tempfile.TemporaryDirectory(prefix="setup_time_") as tmp:
        for _ in range(repeats):
            for w in times:  # alternating, so that both see the same machine load
                t0 = time.perf_counter()
                generate_synthetic_dataset(Path(tmp) / f"w{w}", workers=w, overwrite=True, **kwargs)
                times[w].append(time.perf_counter() - t0)
                digests[w] = tree_digest(Path(tmp) / f"w{w}")
    same = len(set(digests.values())) == 1
    best = {w: min(ts) for w, ts in times.items()}
    print(f"drawing {PRETRAIN_DATASET[0]} ({kwargs['num_ids']} people x {kwargs['images_per_id']}), "
          f"best of {repeats}; files identical: {same}")
    print(f"{'threads':>8} {'seconds':>8} {'speed-up':>8}")
    for w, t in best.items():
        print(f"{w:8d} {t:8.1f} {best[1] / t:7.2f}x")
    if not same:
        raise SystemExit("the threaded drawing wrote other files than one thread")


#: the uv release the Makefile installs
UV_VERSION = re.search(r"^UV_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)


def install() -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="setup_time_venv_") as tmp:
        env = dict(os.environ, PYTHONWARNINGS="ignore", UV_CACHE_DIR=str(Path(tmp) / "uv-cache"))
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        modes = ("pip, compile (its default)", "pip --no-compile", "uv, cache cold", "uv, cache warm")
        for i, mode in enumerate(modes):
            venv = Path(tmp) / f"venv{i}"
            py = str(venv / "bin" / "python")
            t0 = time.perf_counter()  # the venv is part of it: uv's own install comes with its run
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            if mode.startswith("uv"):
                _run([py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", f"uv=={UV_VERSION}"],
                     mode, env)
                _run([str(venv / "bin" / "uv"), "pip", "install", "--quiet", "--python", py, "-e", f"{ROOT}[test]"],
                     mode, env)
            else:
                extra = ["--no-compile"] if "no-compile" in mode else []
                _run([py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *extra,
                      "-e", f"{ROOT}[test]"], mode, env)
            t1 = time.perf_counter()
            if mode == "pip --no-compile":  # before any bytecode is written: what every process paid with it set
                rows.append((f"{mode}, DONTWRITE=1", t1 - t0, *_imports(py, dict(env, PYTHONDONTWRITEBYTECODE="1"))))
            rows.append((mode, t1 - t0, *_imports(py, env)))
    print(f"{'install (venv included)':<30} {'install s':>9} {'1st import s':>12} {'2nd import s':>12} {'total s':>7}")
    for mode, install_s, first, second in rows:
        print(f"{mode:<30} {install_s:9.0f} {first:12.1f} {second:12.1f} {install_s + first:7.0f}")


def _run(cmd: list[str], mode: str, env: dict[str, str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:  # its warnings (pip: one per package about the machine's index paths) only then
        raise SystemExit(f"{cmd[0]} ({mode}) failed:\n{done.stderr}")


def _imports(py: str, env: dict[str, str]) -> tuple[float, float]:
    """Seconds of two processes in a row importing what the demo imports."""
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        subprocess.run([py, "-c", DEMO_IMPORTS], check=True, env=env, cwd=ROOT)
        times.append(time.perf_counter() - t0)
    return times[0], times[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="threads to compare with one (default 2)")
    parser.add_argument("--repeats", type=int, default=2, help="drawings of each (default 2)")
    parser.add_argument("--install", action="store_true", help="also time the two kinds of install")
    args = parser.parse_args()
    draw(args.workers, args.repeats)
    if args.install:
        install()
    return 0


if __name__ == "__main__":
    sys.exit(main())
