"""Captions of the synthetic people: deterministic per seed, varied in wording, and true to what was drawn."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from reid_pipeline.embedded import synthetic as syn
from reid_pipeline.embedded.captions import (
    BUILD_WORDS,
    COLOUR_WORDS,
    HAIR_WORDS,
    HEIGHT_WORDS,
    SKIN_WORDS,
    STRIPE_WORDS,
    describe,
)

ARGS = {"num_ids": 16, "images_per_id": 6, "num_cameras": 4}
PALETTE = dict(zip(syn._CLOTHES_NAMES, (c for c, _ in syn._CLOTHES)))


def read(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / syn.CAPTIONS_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    root = tmp_path_factory.mktemp("cap") / "d"
    syn.generate_synthetic_dataset(root, seed=4, **ARGS)
    return root, read(root)


def mentions(caption: str, words: tuple[str, ...]) -> bool:
    return any(w in caption for w in words)


def test_one_caption_per_image_and_deterministic(captioned, tmp_path):
    root, records = captioned
    images = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    assert sorted(r["image"] for r in records) == images
    syn.generate_synthetic_dataset(tmp_path / "again", seed=4, **ARGS)
    assert (tmp_path / "again" / syn.CAPTIONS_FILE).read_bytes() == (root / syn.CAPTIONS_FILE).read_bytes()
    syn.generate_synthetic_dataset(tmp_path / "other", seed=5, **ARGS)
    assert {r["caption"] for r in read(tmp_path / "other")} != {r["caption"] for r in records}


def test_captions_off_writes_no_file_and_same_images(captioned, tmp_path):
    root, _ = captioned
    syn.generate_synthetic_dataset(tmp_path / "plain", seed=4, captions=False, **ARGS)
    assert not (tmp_path / "plain" / syn.CAPTIONS_FILE).exists()
    for p in root.rglob("*.jpg"):
        assert (tmp_path / "plain" / p.relative_to(root)).read_bytes() == p.read_bytes()


def test_caption_names_every_attribute_that_was_drawn(captioned):
    _, records = captioned
    people = [r for r in records if r["pid"] > 0]
    assert people
    for r in people:
        a, c = r["attributes"], r["caption"]
        assert mentions(c, COLOUR_WORDS[a["top"]]), c
        assert mentions(c, COLOUR_WORDS[a["bottom"]]), c
        bottom_words = {"trousers": ("trousers", "pants", "slacks"), "shorts": ("shorts",), "skirt": ("skirt",)}
        assert mentions(c, bottom_words[a["bottom_type"]]), c
        if a["pattern"] in ("hstripes", "vstripes"):
            assert "stripe" in c and mentions(c, COLOUR_WORDS[a["top2"]]), c
        if a["pattern"] == "checks":
            assert mentions(c, ("check", "plaid", "chequered")), c
        logo = mentions(c, (" logo", " print", " badge"))
        assert logo == (a["pattern"] == "logo" and r["shows"] == "front"), c  # drawn on the front only
        if a["bag"] != "none":
            bag_words = {"backpack": ("backpack", "rucksack"), "handbag": ("handbag",), "shoulder": ("bag",)}
            assert mentions(c, bag_words[a["bag"]]) and mentions(c, COLOUR_WORDS[a["bag_colour"]]), c
        else:
            assert not mentions(c, ("backpack", "rucksack", "handbag", "shoulder bag")), c
        if mentions(c, (" hair",)):
            assert a["hairstyle"] in ("short", "long") and mentions(c, HAIR_WORDS[a["hair"]]), c
        if "cap" in c.split():
            assert a["hairstyle"] == "cap", c
    junk = [r for r in records if r["pid"] == -1]
    assert junk and all(r["attributes"] is None for r in junk)
    assert all(r["caption"] in syn._JUNK_CAPTIONS[r["shows"]] for r in junk)


def words_of(caption: str) -> set[str]:
    return set(caption.replace(",", " ").split())


def test_build_skin_and_stripe_width_are_what_was_drawn(captioned):
    """Height and torso width are named by the third of their range the figure was drawn in (the
    middle third unnamed), skin by its palette tone, stripes by their period; never wrongly."""
    _, records = captioned
    people = [r for r in records if r["pid"] > 0]
    named = {"build": 0, "skin": 0}
    for r in people:
        a, c, w = r["attributes"], r["caption"], words_of(r["caption"])
        ident = syn._random_identity(syn._rng(4, 11, r["pid"]))
        third = (ident.height - 0.84) / (1.0 - 0.84)
        assert a["height"] == ("short" if third < 1 / 3 else "tall" if third >= 2 / 3 else "average")
        for key, table in (("height", HEIGHT_WORDS), ("build", BUILD_WORDS)):
            for value, synonyms in table.items():
                if w & set(synonyms):
                    assert a[key] == value, c
                    named["build"] += 1
        tones = [t for t, synonyms in SKIN_WORDS.items()
                 if any(f"{s}-skinned" in c or f"with {s} skin" in c for s in synonyms)]
        assert tones in ([], [a["skin"]]), c
        assert bool(tones) == ("skin" in c), c
        named["skin"] += bool(tones)
        assert a["stripes"] == ("narrow" if ident.period < 10 else "wide")
        for value, synonyms in STRIPE_WORDS.items():
            if w & set(synonyms):
                assert a["pattern"] in ("hstripes", "vstripes") and a["stripes"] == value, c
    assert named["build"] > len(people) / 3 and named["skin"] > len(people) / 3, named
    assert {r["attributes"]["skin"] for r in people} >= {"pale", "dark"}


def test_named_colours_are_the_drawn_pixels(captioned):
    """The colour a caption names is the palette entry the figure was painted with: the identity's
    jittered top colour lies within the jitter of that entry, and the rendered torso has that colour."""
    _, records = captioned
    seen = 0
    for r in records:
        if r["pid"] <= 0:
            continue
        ident = syn._random_identity(syn._rng(4, 11, r["pid"]))
        assert ident.attributes() == r["attributes"]
        for part, colour in (("top", ident.top), ("bottom", ident.bottom)):
            assert np.abs(np.subtract(colour, PALETTE[r["attributes"][part]])).max() <= 14
        if ident.pattern == "solid" and ident.bag != "shoulder":  # (a shoulder strap crosses the torso)
            layer = syn._draw_person(ident, "front", np.random.default_rng(0), 128, 256, {})
            arr = np.asarray(layer)
            # the torso centre: between shoulders and hips, mid-width
            y = int(256 * (0.965 - 0.9 * ident.height * 0.6))
            assert tuple(arr[y, 64, :3]) == ident.top and arr[y, 64, 3] == 255
            seen += 1
    assert seen > 0


def test_wording_varies_for_one_appearance(captioned):
    _, records = captioned
    by_pid: dict[int, set[str]] = {}
    for r in records:
        if r["pid"] > 0:
            by_pid.setdefault(r["pid"], set()).add(r["caption"])
    assert all(len(c) >= 3 for c in by_pid.values())  # 4+ images each, practically always distinct
    starts = Counter(r["caption"].split(" ")[0] for r in records if r["pid"] > 0)
    assert len(starts) >= 3  # subjects and view clauses move around
    rng = np.random.default_rng(0)
    attrs = records[next(i for i, r in enumerate(records) if r["pid"] > 0)]["attributes"]
    variants = {describe(attrs, "front", rng) for _ in range(50)}
    assert len(variants) >= 30
    with pytest.raises(ValueError, match="view"):
        describe(attrs, "above", rng)
