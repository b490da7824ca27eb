"""What `make demo`'s set-up costs before any training, side by side in one run.

* ``draw``: the synthetic generator drawing the pre-training set (``data/embedded/pretrain-captions``'s
  arguments) in one thread against ``--workers`` threads; the files are compared byte for byte.
* ``install`` (``--install``; about six minutes): this project installed into two fresh virtual
  environments, with pip compiling every module to bytecode (pip's default, what the Makefile does) and
  with ``--no-compile``, then what the demo imports: twice after the default install; after ``--no-compile``
  once with ``PYTHONDONTWRITEBYTECODE=1`` (as on this project's machines: Python compiles what the process
  imports and keeps nothing, so every process pays again), then twice with it unset, as the Makefile runs
  (the first process writes the bytecode of what it imports, the next ones read it).

    python benchmarks/setup_time.py [--workers 2] [--repeats 2] [--install]
"""

from __future__ import annotations

import argparse
import hashlib
import os
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


def install() -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="setup_time_venv_") as tmp:
        for mode, extra in (("compile (pip default)", []), ("--no-compile", ["--no-compile"])):
            venv = Path(tmp) / mode.split()[0].strip("-")
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            py = str(venv / "bin" / "python")
            t0 = time.perf_counter()
            pip = subprocess.run([py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *extra,
                                  "-e", f"{ROOT}[test]"], capture_output=True, text=True)
            if pip.returncode:  # its warnings (one per package about the machine's index paths) only then
                raise SystemExit(f"pip install ({mode}) failed:\n{pip.stderr}")
            t1 = time.perf_counter()
            env = dict(os.environ, PYTHONWARNINGS="ignore")
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            if extra:  # before any bytecode is written: what every process paid with the variable set
                rows.append((f"{mode}, DONTWRITE=1", t1 - t0, *_imports(py, dict(env, PYTHONDONTWRITEBYTECODE="1"))))
            rows.append((mode if not extra else f"{mode}, unset", t1 - t0, *_imports(py, env)))
    print(f"{'install':<30} {'pip s':>6} {'1st import s':>12} {'2nd import s':>12} {'total s':>7}")
    for mode, pip_s, first, second in rows:
        print(f"{mode:<30} {pip_s:6.0f} {first:12.1f} {second:12.1f} {pip_s + first:7.0f}")


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
