"""The parallel run's schedule: files announced as longest are collected first (conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from reid_pipeline_tests import conftest


@dataclass
class _Item:
    nodeid: str
    marks: dict[str, pytest.Mark] = field(default_factory=dict)

    def get_closest_marker(self, name: str) -> pytest.Mark | None:
        return self.marks.get(name)


def _slow(seconds: float | None = None) -> dict[str, pytest.Mark]:
    return {"slow": pytest.Mark("slow", (), {} if seconds is None else {"seconds": seconds})}


def _items() -> list[_Item]:
    return [
        _Item("t/test_a.py::one"), _Item("t/test_a.py::two"),
        _Item("t/test_b.py::quick", _slow()),
        _Item("t/test_c.py::long", _slow(300)),
        _Item("t/test_d.py::x", _slow(100)), _Item("t/test_d.py::y", _slow(150)), _Item("t/test_d.py::z"),
        _Item("t/test_e.py::plain"),
    ]


def test_under_xdist_files_go_longest_first_and_keep_their_tests_order(monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    items = _items()
    conftest.pytest_collection_modifyitems(None, items)
    assert [i.nodeid for i in items] == [
        "t/test_c.py::long",  # 300 s announced
        "t/test_d.py::x", "t/test_d.py::y", "t/test_d.py::z",  # 250 s in all, order within the file kept
        "t/test_a.py::one", "t/test_a.py::two", "t/test_b.py::quick", "t/test_e.py::plain",  # 0 s: pytest's order
    ]


def test_a_serial_run_keeps_pytests_order(monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    items = _items()
    before = [i.nodeid for i in items]
    conftest.pytest_collection_modifyitems(None, items)
    assert [i.nodeid for i in items] == before


def test_the_longest_files_of_this_suite_are_marked(request):
    """The demo test (the longest by far) must announce itself, or it would start last again."""
    demo = [i for i in request.session.items if i.nodeid.startswith("reid_pipeline_tests/test_demo_learning.py")]
    if not demo:
        pytest.skip("the demo file is not part of this run")
    assert conftest._expected_seconds(demo) >= 300
