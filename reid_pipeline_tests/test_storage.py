"""safetensors + JSON sidecar storage, atomic writes and resumable training state."""

from __future__ import annotations

import json
import os

import pytest
import torch

from reid_pipeline.storage import (
    CheckpointError,
    atomic_write_bytes,
    load_tensors,
    load_training_state,
    save_tensors,
    save_training_state,
    sidecar_path,
    tensors_fingerprint,
)


def test_roundtrip_with_sidecar(tmp_path):
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    path = save_tensors(tmp_path / "x.safetensors", tensors, {"label_to_pid": [5, 9], "template": "A photo"})
    loaded, meta = load_tensors(path)
    assert set(loaded) == {"a", "b"} and torch.equal(loaded["a"], tensors["a"]) and torch.equal(loaded["b"], tensors["b"])
    assert meta["label_to_pid"] == [5, 9]
    assert meta["tensors"]["a"] == {"shape": [2, 3], "dtype": "float32"}
    sidecar = json.loads(sidecar_path(path).read_text())
    assert sidecar["template"] == "A photo"
    assert b"pickle" not in path.read_bytes()[:64]


def test_no_temporary_files_left_and_old_file_kept_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="missing.safetensors.*not found"):
        load_tensors(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="bad.safetensors.*not a readable safetensors"):
        load_tensors(bad)
    with pytest.raises(ValueError, match="ending in .safetensors"):
        save_tensors(tmp_path / "x.pt", {"a": torch.zeros(1)})


def test_sidecar_shape_mismatch_detected(tmp_path):
    path = save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(2, 2)})
    meta = json.loads(sidecar_path(path).read_text())
    meta["tensors"]["a"]["shape"] = [3, 2]
    sidecar_path(path).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="shape"):
        load_tensors(path)


def test_fingerprint_changes_with_values_only():
    a = {"w": torch.ones(3), "b": torch.zeros(2)}
    assert tensors_fingerprint(a) == tensors_fingerprint(dict(reversed(list(a.items()))))
    assert tensors_fingerprint(a) != tensors_fingerprint({"w": torch.ones(3) * 2, "b": torch.zeros(2)})


def _train(model, opt, gen, steps):
    for _ in range(steps):
        x = torch.randn(8, 4, generator=gen)
        loss = (model(x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_training_state_resume_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    ref = torch.nn.Linear(4, 2)
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    _train(ref, opt, gen, 3)
    save_training_state(tmp_path / "s.safetensors", model_tensors=ref.state_dict(), optimizer=opt,
                        generators={"data": gen}, epoch=3, extra={"losses": [1.0, 0.5]})
    _train(ref, opt, gen, 4)

    model = torch.nn.Linear(4, 2)
    model.load_state_dict(init)
    opt2 = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen2 = torch.Generator()
    tensors, epoch, extra = load_training_state(tmp_path / "s.safetensors", optimizer=opt2, generators={"data": gen2})
    model.load_state_dict(tensors)
    assert epoch == 3 and extra == {"losses": [1.0, 0.5]}
    _train(model, opt2, gen2, 4)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, model.state_dict()[k])


def test_training_state_requires_epoch(tmp_path):
    path = save_tensors(tmp_path / "plain.safetensors", {"a": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="not a training-state checkpoint"):
        load_training_state(path)


def test_tensors_fingerprint_takes_zero_dimensional_tensors():
    """BatchNorm's num_batches_tracked is 0-d: fingerprinting a model's tensors must not fail on it."""
    from reid_pipeline.storage import tensors_fingerprint

    a = tensors_fingerprint({"n": torch.tensor(3), "w": torch.ones(2)})
    assert a == tensors_fingerprint({"n": torch.tensor(3), "w": torch.ones(2)})
    assert a != tensors_fingerprint({"n": torch.tensor(4), "w": torch.ones(2)})
