"""A deterministic synthetic person re-identification dataset in the Market-1501 layout.

Every identity is a person-like figure drawn with PIL — head and hair (short, long, bald, cap),
torso with a clothing pattern (solid, horizontal or vertical stripes, checks, two-tone, or a chest
logo visible from the front only), long or short sleeves, trousers, shorts or a skirt, shoes, an
optional backpack, handbag or shoulder bag, and a build (height, width). Colours come from a
palette of 18 named colours, about equally likely (version 3; version 2 drew mostly dark colours, so
many people looked alike): identity is carried by the combination of attributes the captions name
(version 4: the captions also name skin tone, build and stripe width, which set apart people
dressed alike; the images are those of version 3).

Each camera has its own scene (background panorama with clutter), illumination (brightness,
contrast, colour cast), preferred viewpoints (front, back, side), mirroring probability, slight
shear, scale and crop-offset range, blur, sensor noise and occlusion rate; each image jitters
around its camera's values and may be partly occluded by a box, a pole or another person
(version 3 narrowed the cameras' lighting, blur and noise ranges and their occlusion rates, which hid
identity more than 128 × 64 pixels can afford). The task is learnable (identity is carried by clothes
and build) but far from trivial for an untrained model.

Written like Market-1501: ``bounding_box_train/``, ``query/``, ``bounding_box_test/`` with names
``0002_c1s1_000451_03.jpg``; train and test identities are disjoint; each test identity is seen by
at least two cameras with at least two images each, and one image per camera is its query (as
Market chose them), the rest gallery. The gallery also holds distractors (pid ``0000``: people
outside the test set) and junk (pid ``-1``: background or body-part fragments).

Captions: ``captions.jsonl`` describes every image in words from the attributes drawn (colours,
pattern and stripe width, sleeves, trousers/shorts/skirt, bag, hair or cap, shoes, skin tone,
height and build, view) with synonyms and varied word
order (:mod:`reid_pipeline.embedded.captions`) — the pre-training data of the embedded small CLIP.

Determinism: the same arguments give byte-identical files (numpy ``Generator`` seeded per
identity, camera and image through ``SeedSequence``; fixed JPEG quality and settings).

Command line::

    python -m reid_pipeline.embedded.synthetic OUT [--size small] [--ids N] [--seed S] ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from reid_pipeline.embedded.captions import describe

__all__ = [
    "CAPTIONS_FILE",
    "PRESETS",
    "SyntheticDatasetInfo",
    "generate_synthetic_dataset",
    "main",
]

GENERATOR_VERSION = 4
INFO_FILE = "synthetic.json"
#: one JSON object a line: ``image`` (path relative to the root), ``caption``, ``pid``, ``camid``
#: (0-based), ``split``, ``shows`` (the view, or ``fragment``/``background`` for junk), ``attributes``.
CAPTIONS_FILE = "captions.jsonl"
SPLIT_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}

#: Named sizes: arguments of :func:`generate_synthetic_dataset`. ``small`` is the default.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"num_ids": 12, "images_per_id": 6},
    "small": {"num_ids": 80, "images_per_id": 8},
    "medium": {"num_ids": 300, "images_per_id": 10},
    "large": {"num_ids": 1000, "images_per_id": 12},
}

Color = tuple[int, int, int]

# Clothing palette: (colour, weight). Every colour about equally likely, so that an identity's
# clothes (the attributes its captions name) set it apart; the neutral ones slightly more frequent.
_CLOTHES: list[tuple[Color, float]] = [
    ((25, 25, 28), 1.3), ((60, 60, 64), 1.0), ((120, 120, 124), 1.0), ((200, 200, 200), 1.0),
    ((240, 240, 236), 1.0), ((30, 40, 80), 1.0), ((50, 90, 170), 1.0), ((130, 170, 220), 1.0),
    ((170, 30, 35), 1.0), ((100, 25, 35), 1.0), ((40, 110, 60), 1.0), ((100, 100, 50), 1.0),
    ((220, 190, 40), 1.0), ((230, 120, 40), 1.0), ((230, 140, 170), 1.0), ((110, 60, 140), 1.0),
    ((200, 180, 140), 1.0), ((110, 75, 45), 1.0),
]
_CLOTHES_NAMES = ("black", "dark grey", "grey", "light grey", "white", "navy", "blue", "light blue",
                  "red", "maroon", "green", "olive", "yellow", "orange", "pink", "purple", "beige",
                  "brown")
_SKIN: list[Color] = [(250, 215, 185), (235, 190, 155), (210, 160, 120), (175, 125, 90),
                      (135, 90, 60), (95, 65, 45)]
_SKIN_NAMES = ("pale", "fair", "medium", "tan", "brown", "dark")
_HAIR: list[Color] = [(20, 18, 16), (45, 30, 20), (90, 60, 35), (200, 170, 110),
                      (150, 150, 150), (130, 60, 30)]
_HAIR_NAMES = ("black", "dark brown", "brown", "blond", "grey", "red")
_SHOES: list[Color] = [(20, 20, 20), (240, 240, 240), (110, 70, 40), (60, 60, 70)]
_SHOES_NAMES = ("black", "white", "brown", "dark grey")
_PATTERNS = ("solid", "hstripes", "vstripes", "checks", "twotone", "logo")
_PATTERN_P = (0.40, 0.16, 0.08, 0.10, 0.12, 0.14)
_BOTTOMS = ("trousers", "shorts", "skirt")
_BOTTOM_P = (0.68, 0.17, 0.15)
_BAGS = ("none", "backpack", "handbag", "shoulder")
_BAG_P = (0.5, 0.22, 0.13, 0.15)
_HAIRSTYLES = ("short", "long", "bald", "cap")
_HAIR_P = (0.5, 0.28, 0.07, 0.15)
_VIEWS = ("front", "back", "side")
#: build: figure height and torso width, relative (uniform); captions name their thirds
_HEIGHT_RANGE, _WIDTH_RANGE = (0.84, 1.0), (0.8, 1.25)


@dataclass(frozen=True)
class _Identity:
    """What a person wears and how they are built; fixed across all their images."""

    skin: Color
    hair: Color
    hairstyle: str
    cap: Color
    top: Color
    top2: Color
    pattern: str
    period: int
    long_sleeves: bool
    bottom: Color
    bottom_type: str
    shoes: Color
    bag: str
    bag_color: Color
    height: float
    width: float
    #: names of the drawn colours (keys of :data:`.captions.COLOUR_WORDS`), for the captions
    names: dict[str, str] = field(default_factory=dict, compare=False)

    def attributes(self) -> dict[str, Any]:
        """What a caption may say about this person (see :func:`.captions.describe`)."""
        n = self.names
        return {"top": n["top"], "top2": n["top2"], "pattern": self.pattern,
                "long_sleeves": self.long_sleeves, "bottom": n["bottom"], "bottom_type": self.bottom_type,
                "bag": self.bag, "bag_colour": n["bag"], "hairstyle": self.hairstyle, "hair": n["hair"],
                "cap": n["cap"], "shoes": n["shoes"], "skin": n["skin"],
                "height": _third(self.height, *_HEIGHT_RANGE, ("short", "average", "tall")),
                "build": _third(self.width, *_WIDTH_RANGE, ("slim", "average", "broad")),
                "stripes": "narrow" if self.period < 10 else "wide"}


@dataclass(frozen=True)
class _Camera:
    """Per-camera imaging conditions."""

    scene: Image.Image
    gains: tuple[float, float, float]
    brightness: float
    contrast: float
    view_p: tuple[float, float, float]
    mirror_p: float
    shear: float
    scale: tuple[float, float]
    offset: float
    blur: float
    noise: float
    occlusion_p: float


@dataclass(frozen=True)
class _Spec:
    """One image to write."""

    kind: str  # "id" | "distractor" | "junk"
    pid: int
    cam: int  # 1-based
    split: str
    index: int  # per pid (or per distractor / junk) image index
    frame: int = 0
    seq: int = 1
    bbox: int = 1

    @property
    def filename(self) -> str:
        pid = "-1" if self.pid == -1 else f"{self.pid:04d}"
        return f"{pid}_c{self.cam}s{self.seq}_{self.frame:06d}_{self.bbox:02d}.jpg"


@dataclass
class SyntheticDatasetInfo:
    """What :func:`generate_synthetic_dataset` wrote (also saved as ``synthetic.json``).

    ``num_images`` counts files per split, junk and distractors included;
    ``num_identities`` counts distinct pids per split as the manifest will (junk excluded,
    distractor pid 0 included).
    """

    root: str
    seed: int
    num_cameras: int
    height: int
    width: int
    train_pids: list[int]
    test_pids: list[int]
    num_images: dict[str, int]
    num_identities: dict[str, int]
    num_junk: int
    num_distractors: int
    parameters: dict[str, Any] = field(default_factory=dict)
    generator_version: int = GENERATOR_VERSION
    seconds: float = 0.0
    reused: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy."""
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# random helpers
# ----------------------------------------------------------------------------------------------
def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))


def _jitter(rng: np.random.Generator, c: Color, amount: int = 14) -> Color:
    return tuple(int(v) for v in np.clip(np.asarray(c) + rng.integers(-amount, amount + 1, 3),
                                         0, 255))  # type: ignore[return-value]


def _clothes_pick(rng: np.random.Generator) -> tuple[Color, str]:
    """A jittered palette colour and its name."""
    weights = np.array([w for _, w in _CLOTHES])
    idx = int(rng.choice(len(_CLOTHES), p=weights / weights.sum()))
    return _jitter(rng, _CLOTHES[idx][0]), _CLOTHES_NAMES[idx]


def _clothes_colour(rng: np.random.Generator) -> Color:
    return _clothes_pick(rng)[0]


def _pick(rng: np.random.Generator, options: Sequence[str], p: Sequence[float]) -> str:
    return options[int(rng.choice(len(options), p=np.asarray(p) / np.sum(p)))]


def _third(value: float, low: float, high: float, words: tuple[str, str, str]) -> str:
    """The word for the third of ``[low, high)`` that ``value`` falls in."""
    return words[min(2, int(3 * (value - low) / (high - low)))]


def _random_identity(rng: np.random.Generator) -> _Identity:
    # The draws happen in a fixed order (the images of a seed do not depend on the captions).
    top, top_name = _clothes_pick(rng)
    top2, top2_name = _clothes_pick(rng)
    while sum(abs(a - b) for a, b in zip(top, top2)) < 90:  # a visible second colour
        top2, top2_name = _clothes_pick(rng)
    skin_idx = int(rng.integers(len(_SKIN)))
    skin = _jitter(rng, _SKIN[skin_idx], 8)
    hair_idx = int(rng.integers(len(_HAIR)))
    hair = _jitter(rng, _HAIR[hair_idx], 10)
    hairstyle = _pick(rng, _HAIRSTYLES, _HAIR_P)
    cap, cap_name = _clothes_pick(rng)
    pattern = _pick(rng, _PATTERNS, _PATTERN_P)
    period = int(rng.integers(6, 15))
    long_sleeves = bool(rng.random() < 0.55)
    bottom, bottom_name = _clothes_pick(rng)
    bottom_type = _pick(rng, _BOTTOMS, _BOTTOM_P)
    shoes_idx = int(rng.integers(len(_SHOES)))
    shoes = _jitter(rng, _SHOES[shoes_idx], 10)
    bag = _pick(rng, _BAGS, _BAG_P)
    bag_color, bag_name = _clothes_pick(rng)
    return _Identity(
        skin=skin, hair=hair, hairstyle=hairstyle, cap=cap, top=top, top2=top2, pattern=pattern,
        period=period, long_sleeves=long_sleeves, bottom=bottom, bottom_type=bottom_type,
        shoes=shoes, bag=bag, bag_color=bag_color,
        height=float(rng.uniform(*_HEIGHT_RANGE)),
        width=float(rng.uniform(*_WIDTH_RANGE)),
        names={"top": top_name, "top2": top2_name, "hair": _HAIR_NAMES[hair_idx], "cap": cap_name,
               "bottom": bottom_name, "shoes": _SHOES_NAMES[shoes_idx], "bag": bag_name,
               "skin": _SKIN_NAMES[skin_idx]},
    )


# ----------------------------------------------------------------------------------------------
# scenes and cameras
# ----------------------------------------------------------------------------------------------
def _muted(rng: np.random.Generator, amount: float) -> Color:
    """A clothing-palette colour pulled ``amount`` of the way towards mid grey (scene clutter)."""
    c = np.asarray(_clothes_colour(rng), dtype=np.float32)
    return tuple(int(v) for v in (1 - amount) * c + amount * 110.0)  # type: ignore[return-value]


def _make_scene(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A wide background panorama (4 × the crop width) for one camera."""
    pw = 4 * w
    base = np.array(_clothes_colour(rng), dtype=np.float32) * 0.5 + 60
    floor = np.array(_clothes_colour(rng), dtype=np.float32) * 0.4 + 50
    horizon = int(h * rng.uniform(0.55, 0.75))
    yy = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    img = np.empty((h, pw, 3), dtype=np.float32)
    img[:horizon] = base * (0.85 + 0.3 * yy[:horizon])
    img[horizon:] = floor * (0.8 + 0.3 * (1 - yy[horizon:]))
    scene = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(scene)
    for _ in range(int(rng.integers(10, 22))):  # buildings, windows, signs, benches
        x0 = float(rng.uniform(-0.1, 1.0) * pw)
        bw = float(rng.uniform(0.05, 0.35) * w)
        y0 = float(rng.uniform(0.0, 0.8) * h)
        bh = float(rng.uniform(0.05, 0.5) * h)
        draw.rectangle([x0, y0, x0 + bw, y0 + bh], fill=_muted(rng, 0.55))
    for _ in range(int(rng.integers(4, 10))):  # poles, kerbs, tiles
        col = _muted(rng, 0.5)
        if rng.random() < 0.5:
            x = float(rng.uniform(0, pw))
            draw.line([(x, 0), (x + rng.uniform(-8, 8), h)], fill=col, width=int(rng.integers(1, 5)))
        else:
            y = float(rng.uniform(0.4, 1.0) * h)
            draw.line([(0, y), (pw, y + rng.uniform(-20, 20))], fill=col,
                      width=int(rng.integers(1, 4)))
    return scene


def _make_camera(seed: int, cam: int, w: int, h: int) -> _Camera:
    rng = _rng(seed, 17, cam)
    view_p = rng.dirichlet([1.2, 1.2, 0.8])
    lo = float(rng.uniform(0.78, 0.92))
    return _Camera(
        scene=_make_scene(rng, w, h),
        gains=tuple(float(g) for g in np.exp(rng.normal(0.0, 0.05, 3))),  # type: ignore[arg-type]
        brightness=float(rng.uniform(0.85, 1.12)),
        contrast=float(rng.uniform(0.88, 1.05)),
        view_p=tuple(float(p) for p in view_p),  # type: ignore[arg-type]
        mirror_p=float(rng.uniform(0.2, 0.8)),
        shear=float(rng.uniform(-0.12, 0.12)),
        scale=(lo, lo + float(rng.uniform(0.08, 0.2))),
        offset=float(rng.uniform(0.03, 0.1)),
        blur=float(rng.uniform(0.0, 1.0)),
        noise=float(rng.uniform(2.0, 5.0)),
        occlusion_p=float(rng.uniform(0.05, 0.15)),
    )


# ----------------------------------------------------------------------------------------------
# drawing a person
# ----------------------------------------------------------------------------------------------
def _texture(ident: _Identity, view: str, w: int, h: int, torso_box: tuple[float, ...]) -> Image.Image:
    """The torso fill for one identity and view, in canvas coordinates."""
    x0, y0, x1, y1 = torso_box
    yy, xx = np.mgrid[0:h, 0:w]
    c1 = np.array(ident.top, dtype=np.uint8)
    c2 = np.array(ident.top2, dtype=np.uint8)
    p = ident.period
    if ident.pattern == "hstripes":
        sel = ((yy - int(y0)) // p) % 2 == 1
    elif ident.pattern == "vstripes":
        sel = ((xx - int(x0)) // p) % 2 == 1
    elif ident.pattern == "checks":
        sel = (((yy - int(y0)) // p + (xx - int(x0)) // p) % 2) == 1
    elif ident.pattern == "twotone":
        sel = yy > (y0 + y1) / 2
    elif ident.pattern == "logo" and view == "front":
        cx, cy = (x0 + x1) / 2, y0 + 0.35 * (y1 - y0)
        sel = (np.abs(xx - cx) < 0.22 * (x1 - x0)) & (np.abs(yy - cy) < 0.12 * (y1 - y0))
    else:
        sel = np.zeros((h, w), dtype=bool)
    arr = np.where(sel[..., None], c2, c1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _limb(draw: ImageDraw.ImageDraw, a: tuple[float, float], b: tuple[float, float],
          width: float, color: Color) -> None:
    draw.line([a, b], fill=color + (255,), width=max(1, round(width)))
    r = width / 2
    for (x, y) in (a, b):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=color + (255,))


def _draw_person(ident: _Identity, view: str, rng: np.random.Generator, w: int, h: int,
                 textures: dict[str, Image.Image]) -> Image.Image:
    """An RGBA layer with one person standing in the middle of a ``w`` × ``h`` canvas."""
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    ph = 0.9 * h * ident.height
    foot = 0.965 * h
    top = foot - ph
    cx = w / 2
    side = view == "side"
    r = 0.062 * ph
    shoulder_y = top + 2 * r + 0.015 * ph
    hip_y = top + 0.53 * ph
    tw = 0.25 * ph * ident.width * (0.62 if side else 1.0)
    hw = tw * 0.86
    leg_w = 0.085 * ph * math.sqrt(ident.width)
    arm_w = 0.062 * ph * math.sqrt(ident.width)
    stride = float(rng.uniform(0.0, 0.22 if side else 0.08)) * ph
    swing = float(rng.uniform(-0.35, 0.35)) if side else float(rng.uniform(-0.12, 0.12))

    # long hair and backpack behind the body
    if ident.hairstyle == "long":
        draw.rectangle([cx - 1.05 * r, top + r, cx + 1.05 * r, shoulder_y + 0.12 * ph],
                       fill=ident.hair + (255,))
    if ident.bag == "backpack" and side:  # from the front only the straps show (drawn later)
        draw.rectangle([cx - tw / 2 - 0.1 * ph, shoulder_y + 0.02 * ph, cx - tw / 2 + 2,
                        shoulder_y + 0.24 * ph], fill=ident.bag_color + (255,))

    # legs and lower body
    hip_l, hip_r = (cx - hw / 4, hip_y), (cx + hw / 4, hip_y)
    foot_l, foot_r = (cx - hw / 4 - stride / 2, foot), (cx + hw / 4 + stride / 2, foot)
    for hp, ft in ((hip_l, foot_l), (hip_r, foot_r)):
        kn = ((hp[0] + ft[0]) / 2, (hp[1] + ft[1]) / 2)
        if ident.bottom_type == "trousers":
            _limb(draw, hp, ft, leg_w, ident.bottom)
        elif ident.bottom_type == "shorts":
            _limb(draw, kn, ft, leg_w * 0.85, ident.skin)
            _limb(draw, hp, kn, leg_w * 1.1, ident.bottom)
        else:  # skirt: legs in skin, skirt drawn below
            _limb(draw, hp, ft, leg_w * 0.8, ident.skin)
        draw.ellipse([ft[0] - leg_w * 0.7, ft[1] - leg_w * 0.45, ft[0] + leg_w * 0.7,
                      ft[1] + leg_w * 0.35], fill=ident.shoes + (255,))
    if ident.bottom_type == "skirt":
        sy = hip_y + 0.2 * ph
        draw.polygon([(cx - hw / 2, hip_y - 2), (cx + hw / 2, hip_y - 2),
                      (cx + hw / 2 + 0.06 * ph, sy), (cx - hw / 2 - 0.06 * ph, sy)],
                     fill=ident.bottom + (255,))
    else:
        draw.rectangle([cx - hw / 2, hip_y - 2, cx + hw / 2, hip_y + 0.04 * ph],
                       fill=ident.bottom + (255,))

    # torso with its pattern
    torso = [(cx - tw / 2, shoulder_y), (cx + tw / 2, shoulder_y),
             (cx + hw / 2, hip_y + 1), (cx - hw / 2, hip_y + 1)]
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).polygon(torso, fill=255)
    tex = textures.get(view)
    if tex is None:
        tex = _texture(ident, view, w, h, (cx - tw / 2, shoulder_y, cx + tw / 2, hip_y))
        textures[view] = tex
    layer.paste(tex, (0, 0), mask)

    if ident.bag == "backpack" and view == "back":
        draw.rounded_rectangle([cx - 0.36 * tw, shoulder_y + 0.03 * ph, cx + 0.36 * tw,
                                shoulder_y + 0.25 * ph], radius=0.02 * ph,
                               fill=ident.bag_color + (255,))
    elif ident.bag == "backpack" and view == "front":
        for sx in (-0.3, 0.3):
            _limb(draw, (cx + sx * tw, shoulder_y), (cx + sx * tw * 0.9, shoulder_y + 0.18 * ph),
                  0.018 * ph, ident.bag_color)
    if ident.bag == "shoulder":
        _limb(draw, (cx - tw / 2, shoulder_y + 2), (cx + hw / 2, hip_y - 0.02 * ph), 0.016 * ph,
              ident.bag_color)

    # arms
    arm_len = 0.38 * ph
    sleeve = ident.top if ident.long_sleeves else None
    shoulders = [(cx - tw / 2 + arm_w * 0.3, shoulder_y + arm_w * 0.4),
                 (cx + tw / 2 - arm_w * 0.3, shoulder_y + arm_w * 0.4)]
    hands = []
    for i, sh in enumerate(shoulders):
        ang = (swing if i == 0 else -swing) + (0.1 if i == 1 else -0.1) * (0 if side else 1)
        hand = (sh[0] + arm_len * math.sin(ang), sh[1] + arm_len * math.cos(ang))
        elbow = ((sh[0] + hand[0]) / 2, (sh[1] + hand[1]) / 2)
        if sleeve is not None:
            _limb(draw, sh, hand, arm_w, sleeve)
        else:
            _limb(draw, elbow, hand, arm_w * 0.85, ident.skin)
            _limb(draw, sh, elbow, arm_w * 1.05, ident.top)
        draw.ellipse([hand[0] - arm_w * 0.5, hand[1] - arm_w * 0.5, hand[0] + arm_w * 0.5,
                      hand[1] + arm_w * 0.5], fill=ident.skin + (255,))
        hands.append(hand)
    if ident.bag == "handbag":
        hx, hy = hands[1]
        draw.rectangle([hx - 0.05 * ph, hy, hx + 0.05 * ph, hy + 0.1 * ph],
                       fill=ident.bag_color + (255,))
    elif ident.bag == "shoulder":
        bx, by = cx + hw / 2, hip_y - 0.02 * ph
        draw.rectangle([bx - 0.04 * ph, by - 0.05 * ph, bx + 0.05 * ph, by + 0.04 * ph],
                       fill=ident.bag_color + (255,))

    # neck and head
    draw.rectangle([cx - 0.35 * r, top + 1.7 * r, cx + 0.35 * r, shoulder_y + 2],
                   fill=ident.skin + (255,))
    head = [cx - r * (0.85 if side else 1.0), top, cx + r * (0.85 if side else 1.0), top + 2 * r]
    hair_all = view == "back" and ident.hairstyle in ("short", "long")
    draw.ellipse(head, fill=(ident.hair if hair_all else ident.skin) + (255,))
    if ident.hairstyle in ("short", "long") and not hair_all:
        draw.chord(head, 180, 360, fill=ident.hair + (255,))
    elif ident.hairstyle == "cap":
        draw.chord(head, 180, 360, fill=ident.cap + (255,))
        brim_dir = 1 if view != "back" else -1
        if side:
            draw.rectangle([cx, top + 0.8 * r, cx + brim_dir * 1.6 * r, top + 1.05 * r],
                           fill=ident.cap + (255,))
    return layer


def _affine(layer: Image.Image, scale: float, shear: float, tx: float, ty: float) -> Image.Image:
    """Scale about the canvas centre, shear horizontally, translate (output → input mapping)."""
    w, h = layer.size
    cx, cy = w / 2, h / 2
    a, b = 1 / scale, -shear / scale
    c = cx - (cx + tx) / scale + shear * (cy + ty) / scale
    e, f = 1 / scale, cy - (cy + ty) / scale
    return layer.transform((w, h), Image.Transform.AFFINE, (a, b, c, 0.0, e, f),
                           resample=Image.Resampling.BILINEAR)


# ----------------------------------------------------------------------------------------------
# composing one image
# ----------------------------------------------------------------------------------------------
def _finish(canvas: Image.Image, cam: _Camera, rng: np.random.Generator, out_w: int,
            out_h: int) -> Image.Image:
    """Camera blur, illumination, noise and the final resize."""
    blur = max(0.0, cam.blur + float(rng.normal(0, 0.2)))
    if blur > 0.05:
        canvas = canvas.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(canvas, dtype=np.float32)
    gains = np.asarray(cam.gains, dtype=np.float32) * np.exp(rng.normal(0, 0.04, 3)).astype(np.float32)
    bright = cam.brightness * float(np.exp(rng.normal(0, 0.1)))
    contrast = cam.contrast * float(np.exp(rng.normal(0, 0.05)))
    arr = ((arr - 128.0) * contrast + 128.0) * gains * bright
    arr += rng.normal(0.0, cam.noise, arr.shape).astype(np.float32)
    img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")
    return img.resize((out_w, out_h), Image.Resampling.LANCZOS)


def _background(cam: _Camera, rng: np.random.Generator, w: int, h: int) -> Image.Image:
    x = int(rng.integers(0, cam.scene.width - w + 1))
    bg = cam.scene.crop((x, 0, x + w, h))
    draw = ImageDraw.Draw(bg)
    for _ in range(int(rng.integers(0, 4))):  # transient clutter
        x0, y0 = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        draw.rectangle([x0, y0, x0 + rng.uniform(4, 0.5 * w), y0 + rng.uniform(4, 0.3 * h)],
                       fill=_muted(rng, 0.6))
    return bg


def _occlude(canvas: Image.Image, rng: np.random.Generator, seed: int, w: int, h: int) -> None:
    """Cover part of the figure with an object, a pole or another person."""
    kind = int(rng.integers(3))
    draw = ImageDraw.Draw(canvas)
    col = tuple(int(v * 0.85) for v in _clothes_colour(rng))
    if kind == 0:  # car, bench, railing from below
        y0 = float(rng.uniform(0.55, 0.8) * h)
        x0 = float(rng.uniform(-0.3, 0.3) * w)
        draw.rectangle([x0, y0, x0 + rng.uniform(0.7, 1.3) * w, h], fill=col)
    elif kind == 1:  # pole or door frame
        x0 = float(rng.uniform(0.05, 0.75) * w)
        draw.rectangle([x0, 0, x0 + rng.uniform(0.12, 0.3) * w, h], fill=col)
    else:  # a passer-by at one side
        other = _random_identity(_rng(seed, 23, int(rng.integers(1 << 30))))
        layer = _draw_person(other, _VIEWS[int(rng.integers(3))], rng, w, h, {})
        side = 1 if rng.random() < 0.5 else -1
        layer = _affine(layer, float(rng.uniform(0.95, 1.15)), 0.0,
                        side * float(rng.uniform(0.5, 0.7)) * w, float(rng.uniform(0, 0.05)) * h)
        canvas.paste(layer, (0, 0), layer)


def _render(spec: _Spec, ident: _Identity, cam: _Camera, seed: int, w: int, h: int,
            textures: dict[str, Image.Image]) -> tuple[Image.Image, str]:
    """Draw one image at twice the output size and finish it at ``w`` × ``h``.

    Returns the image and what it shows: the person's view (``front``/``back``/``side``), or for
    junk ``fragment`` (part of someone) or ``background``.
    """
    cw, ch = 2 * w, 2 * h
    rng = _rng(seed, 7, spec.pid + 1, spec.cam, spec.frame)
    canvas = _background(cam, rng, cw, ch)
    if spec.kind == "junk":
        # a false detection: background only, or a zoomed-in fragment of someone
        if rng.random() < 0.6:
            layer = _draw_person(ident, _VIEWS[int(rng.integers(3))], rng, cw, ch, textures)
            layer = _affine(layer, float(rng.uniform(1.8, 3.0)), 0.0,
                            float(rng.uniform(-0.4, 0.4)) * cw, float(rng.uniform(-0.9, 0.9)) * ch)
            canvas.paste(layer, (0, 0), layer)
            return _finish(canvas, cam, rng, w, h), "fragment"
        return _finish(canvas, cam, rng, w, h), "background"
    view = _VIEWS[int(rng.choice(3, p=np.asarray(cam.view_p)))]
    layer = _draw_person(ident, view, rng, cw, ch, textures)
    if rng.random() < cam.mirror_p:
        layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    scale = float(rng.uniform(*cam.scale))
    shear = cam.shear + float(rng.normal(0, 0.03))
    tx = float(rng.normal(0, cam.offset)) * cw
    ty = float(rng.normal(0, cam.offset * 0.6)) * ch + (1 - scale) * 0.3 * ch
    layer = _affine(layer, scale, shear, tx, ty)
    canvas.paste(layer, (0, 0), layer)
    if rng.random() < cam.occlusion_p:
        _occlude(canvas, rng, seed, cw, ch)
    return _finish(canvas, cam, rng, w, h), view


_JUNK_CAPTIONS = {
    "background": ("an empty street", "a street scene with nobody in it", "background with no person"),
    "fragment": ("a close-up of part of a person", "a cropped fragment of a pedestrian",
                 "part of someone's body"),
}


def _caption(spec: _Spec, ident: _Identity, shows: str, seed: int) -> str:
    rng = _rng(seed, 29, spec.pid + 1, spec.cam, spec.frame)
    if shows in _JUNK_CAPTIONS:
        options = _JUNK_CAPTIONS[shows]
        return options[int(rng.integers(len(options)))]
    return describe(ident.attributes(), shows, rng)


# ----------------------------------------------------------------------------------------------
# planning which images exist
# ----------------------------------------------------------------------------------------------
def _plan(seed: int, num_ids: int, images_per_id: int, num_cameras: int, num_distractors: int,
          num_junk: int, num_test: int) -> tuple[list[int], list[int], list[_Spec]]:
    rng = _rng(seed, 0xDA7A)
    max_pid = min(9999, max(1501, 2 * num_ids))
    pids = np.sort(rng.choice(np.arange(1, max_pid + 1), size=num_ids, replace=False))
    perm = rng.permutation(num_ids)
    n_train = num_ids - num_test
    train = sorted(int(p) for p in pids[perm[:n_train]])
    test = sorted(int(p) for p in pids[perm[n_train:]])
    test_set = set(test)

    specs: list[_Spec] = []
    spread = images_per_id // 4
    for pid in (int(p) for p in pids):
        n = int(rng.integers(max(4, images_per_id - spread), images_per_id + spread + 1))
        k_max = max(2, min(num_cameras, n // 2, 4))
        k = int(rng.integers(2, k_max + 1))
        cams = sorted(int(c) + 1 for c in rng.choice(num_cameras, size=k, replace=False))
        counts = np.full(k, 2)
        for j in rng.integers(0, k, size=n - 2 * k):
            counts[j] += 1
        index = 0
        for cam, cnt in zip(cams, counts):
            query_pick = int(rng.integers(cnt)) if pid in test_set else -1
            for j in range(int(cnt)):
                split = "train" if pid not in test_set else ("query" if j == query_pick else "gallery")
                specs.append(_Spec("id", pid, cam, split, index))
                index += 1
    for i in range(num_distractors):
        specs.append(_Spec("distractor", 0, int(rng.integers(1, num_cameras + 1)), "gallery", i))
    for i in range(num_junk):
        specs.append(_Spec("junk", -1, int(rng.integers(1, num_cameras + 1)), "gallery", i))

    # Market-like sequence / frame / box numbers, unique per camera
    frames = {c: int(rng.integers(50, 500)) for c in range(1, num_cameras + 1)}
    named = []
    for s in specs:
        frames[s.cam] += int(rng.integers(5, 80))
        named.append(_Spec(s.kind, s.pid, s.cam, s.split, s.index, frame=frames[s.cam],
                           seq=int(rng.integers(1, 7)), bbox=int(rng.integers(1, 9))))
    return train, test, named


def _same_dataset(out: Path, payload: dict[str, Any], num_images: dict[str, int]) -> bool:
    """Whether ``out`` holds a complete dataset written with the arguments behind ``payload``."""
    try:
        stored = json.loads((out / INFO_FILE).read_text())
    except (OSError, ValueError):
        return False
    if stored != json.loads(json.dumps(payload)):
        return False
    for split, folder in SPLIT_FOLDERS.items():
        try:
            with os.scandir(out / folder) as it:
                count = sum(1 for e in it if e.name.endswith(".jpg"))
        except OSError:
            return False
        if count != num_images[split]:
            return False
    return not payload["parameters"].get("captions") or (out / CAPTIONS_FILE).is_file()


def _validate(num_ids: int, images_per_id: int, num_cameras: int, height: int, width: int,
              num_distractors: int, num_junk: int, jpeg_quality: int) -> None:
    if not 2 <= num_ids <= 9999:
        raise ValueError(f"num_ids must be between 2 and 9999 (train and test ids), got {num_ids}")
    if images_per_id < 4:
        raise ValueError(
            f"images_per_id must be at least 4 (two cameras with two images each), got {images_per_id}"
        )
    if not 2 <= num_cameras <= 9:
        raise ValueError(f"num_cameras must be between 2 and 9 (Market names use one digit), "
                         f"got {num_cameras}")
    if height < 16 or width < 8:
        raise ValueError(f"image size must be at least 16x8 (height x width), got {height}x{width}")
    if num_distractors < 0 or num_junk < 0:
        raise ValueError(f"num_distractors and num_junk must be >= 0, got {num_distractors}, {num_junk}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")


#: below this many images a dataset is drawn in one thread (the others would have little to do)
_PARALLEL_MIN_IMAGES = 400


def _default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def _chunks(specs: list[_Spec], workers: int) -> list[list[_Spec]]:
    """``specs`` cut into about four pieces per worker, never inside one identity's images (they share
    a texture cache); one piece when ``workers`` is 1 or the dataset is small."""
    if workers <= 1 or len(specs) < _PARALLEL_MIN_IMAGES:
        return [specs]
    size = math.ceil(len(specs) / (4 * workers))
    chunks: list[list[_Spec]] = [[]]
    for spec in specs:
        last = chunks[-1]
        if len(last) >= size and not (spec.kind == "id" and last[-1].kind == "id" and last[-1].pid == spec.pid):
            chunks.append(last := [])
        last.append(spec)
    return chunks


def _render_chunk(job: tuple[Path, dict[int, _Camera], int, int, int, int, bool], specs: list[_Spec]) -> list[str]:
    """Draw and write ``specs`` under ``job``'s folder; their caption lines, in order (empty without captions).

    Every image follows from its own seeded generators, so pieces drawn in any thread, in any order,
    give the same files as one pass."""
    tmp, cameras, seed, width, height, jpeg_quality, captions = job
    current_pid, current = -2, None
    current_tex: dict[str, Image.Image] = {}
    lines: list[str] = []
    for spec in specs:
        if spec.kind == "id":  # planned contiguously per pid: one identity + texture cache
            if spec.pid != current_pid:
                current_pid = spec.pid
                current = _random_identity(_rng(seed, 11, spec.pid))
                current_tex = {}
            ident, tex = current, current_tex
        elif spec.kind == "distractor":
            ident, tex = _random_identity(_rng(seed, 13, spec.index)), {}
        else:
            ident, tex = _random_identity(_rng(seed, 19, spec.index)), {}
        img, shows = _render(spec, ident, cameras[spec.cam], seed, width, height, tex)
        rel = f"{SPLIT_FOLDERS[spec.split]}/{spec.filename}"
        img.save(tmp / rel, "JPEG", quality=jpeg_quality, subsampling=0, optimize=False, progressive=False)
        if captions:
            lines.append(json.dumps({
                "image": rel, "caption": _caption(spec, ident, shows, seed), "pid": spec.pid,
                "camid": spec.cam - 1, "split": spec.split, "shows": shows,
                "attributes": ident.attributes() if spec.kind != "junk" else None,
            }, sort_keys=True))
    return lines


def generate_synthetic_dataset(
    out: str | os.PathLike,
    num_ids: int = 80,
    images_per_id: int = 8,
    num_cameras: int = 6,
    height: int = 128,
    width: int = 64,
    seed: int = 0,
    *,
    num_distractors: int | None = None,
    num_junk: int | None = None,
    jpeg_quality: int = 90,
    overwrite: bool = False,
    skip_existing: bool = False,
    captions: bool = True,
    num_test_ids: int | None = None,
    workers: int | None = None,
) -> SyntheticDatasetInfo:
    """Write a synthetic Market-1501-style dataset to ``out``.

    Args:
        out: dataset root to create (its parent is created if needed).
        num_ids: identities in total; the first half (rounded up) trains, the rest is tested, like
            Market's 751 / 750 (unless ``num_test_ids`` says otherwise). Pids are random distinct
            numbers in 1..max(1501, 2·num_ids).
        images_per_id: mean images per identity (each gets ±25 %, at least 4), spread over 2–4
            cameras with at least 2 images per camera.
        num_cameras: cameras ``c1``..``cN`` (2–9).
        height, width: image size in pixels (drawn at twice the size, then downsampled).
        seed: everything follows from it; same arguments → byte-identical files.
        num_distractors: gallery images with pid 0 (people outside the test set); default about
            15 % of the test images.
        num_junk: gallery images with pid -1 (false detections); default about 8 % of the test
            images.
        jpeg_quality: fixed JPEG quality.
        overwrite: replace an existing dataset in ``out`` (only its split folders and
            ``synthetic.json`` are removed); otherwise an existing one is an error.
        skip_existing: if ``out`` already holds the dataset these arguments describe (its
            ``synthetic.json`` matches and every split folder has the planned number of files),
            write nothing and return its info with ``reused=True``.
        captions: also write ``captions.jsonl`` (see :data:`CAPTIONS_FILE`): one caption per image
            describing what was drawn (:func:`reid_pipeline.embedded.captions.describe`).
        num_test_ids: how many of the ``num_ids`` identities are tested (query and gallery); the
            rest train. Default: half, rounded down. More training than test identities keeps a
            small gallery while giving the model more people to learn from.
        workers: threads that draw the images (default: the usable CPU cores, at most 8; 1 draws
            them in this thread, as it does any dataset under 400 images). The files do not depend on it.

    Returns:
        A :class:`SyntheticDatasetInfo`, also written to ``out/synthetic.json``.

    Raises:
        ValueError: an argument is out of range.
        FileExistsError: ``out`` already holds a split folder and ``overwrite`` is false.
    """
    t0 = time.perf_counter()
    if num_test_ids is not None and not 1 <= num_test_ids < num_ids:
        raise ValueError(f"num_test_ids must be between 1 and num_ids - 1 = {num_ids - 1}, got {num_test_ids}")
    n_test = num_ids // 2 if num_test_ids is None else num_test_ids
    approx_test = n_test * images_per_id
    if num_distractors is None:
        num_distractors = max(1, round(0.15 * approx_test))
    if num_junk is None:
        num_junk = max(1, round(0.08 * approx_test))
    _validate(num_ids, images_per_id, num_cameras, height, width, num_distractors, num_junk,
              jpeg_quality)
    if workers is None:
        workers = _default_workers()
    elif workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output {str(out)!r} exists and is not a directory")

    train, test, specs = _plan(seed, num_ids, images_per_id, num_cameras, num_distractors, num_junk, n_test)
    num_images = {s: sum(1 for sp in specs if sp.split == s) for s in SPLIT_FOLDERS}
    num_identities = {
        s: len({sp.pid for sp in specs if sp.split == s and sp.pid != -1}) for s in SPLIT_FOLDERS
    }
    info = SyntheticDatasetInfo(
        root=str(out), seed=seed, num_cameras=num_cameras, height=height, width=width,
        train_pids=train, test_pids=test, num_images=num_images,
        num_identities=num_identities, num_junk=num_junk, num_distractors=num_distractors,
        parameters={"num_ids": num_ids, "images_per_id": images_per_id,
                    "jpeg_quality": jpeg_quality, "captions": bool(captions),
                    # recorded only when set, so that datasets written before the option keep their record
                    **({} if num_test_ids is None else {"num_test_ids": num_test_ids})},
    )
    payload = info.to_dict()
    for volatile in ("seconds", "root", "reused"):
        payload.pop(volatile)

    existing = [d for d in SPLIT_FOLDERS.values() if (out / d).exists()]
    if existing and skip_existing and _same_dataset(out, payload, num_images):
        info.reused = True
        info.seconds = time.perf_counter() - t0
        return info
    if existing and not overwrite:
        hint = " (it was written with other arguments)" if skip_existing else ""
        raise FileExistsError(
            f"{str(out)!r} already holds {existing}{hint}; pass overwrite=True (--overwrite) "
            "to replace them"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        for folder in SPLIT_FOLDERS.values():
            (tmp / folder).mkdir(parents=True)
        chunks = _chunks(specs, workers)
        cameras = {c: _make_camera(seed, c, 2 * width, 2 * height) for c in range(1, num_cameras + 1)}
        job = (tmp, cameras, seed, width, height, jpeg_quality, captions)
        lines: list[str] = []
        if len(chunks) == 1:
            lines = _render_chunk(job, chunks[0])
        else:  # threads: PIL's filters, resampling and JPEG encoder and numpy's array maths release the GIL
            # (1.6x on two cores); processes would have to re-import the caller's main module or fork its threads
            with ThreadPoolExecutor(min(len(chunks), workers)) as pool:
                for chunk_lines in pool.map(_render_chunk, [job] * len(chunks), chunks):
                    lines.extend(chunk_lines)
        if captions:
            (tmp / CAPTIONS_FILE).write_text("\n".join(lines) + "\n")
        (tmp / INFO_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")

        if not out.exists():
            os.replace(tmp, out)
        else:
            for folder in list(SPLIT_FOLDERS.values()) + [INFO_FILE, CAPTIONS_FILE]:
                target = out / folder
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
                if (tmp / folder).exists():
                    os.replace(tmp / folder, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    info.seconds = time.perf_counter() - t0
    return info


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m reid_pipeline.embedded.synthetic",
        description="Write a deterministic synthetic person re-id dataset in the Market-1501 layout.",
    )
    p.add_argument("out", help="dataset root to create")
    p.add_argument("--size", choices=sorted(PRESETS), default="small",
                   help="preset for --ids and --images-per-id (default: small = "
                        f"{PRESETS['small']['num_ids']} ids x {PRESETS['small']['images_per_id']})")
    p.add_argument("--ids", type=int, default=None, help="identities in total (half train, half test)")
    p.add_argument("--test-ids", type=int, default=None, help="of those, how many are tested (default half)")
    p.add_argument("--images-per-id", type=int, default=None, help="mean images per identity (>= 4)")
    p.add_argument("--cameras", type=int, default=6, help="number of cameras, 2..9 (default 6)")
    p.add_argument("--height", type=int, default=128, help="image height (default 128)")
    p.add_argument("--width", type=int, default=64, help="image width (default 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--distractors", type=int, default=None, help="pid-0 gallery images")
    p.add_argument("--junk", type=int, default=None, help="pid -1 gallery images")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in OUT")
    p.add_argument("--skip-existing", action="store_true",
                   help="do nothing if OUT already holds the dataset these arguments describe")
    p.add_argument("--workers", type=int, default=None,
                   help="threads drawing the images (default: the CPU cores, at most 8); the files do not depend on it")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    preset = PRESETS[args.size]
    try:
        info = generate_synthetic_dataset(
            args.out,
            num_ids=args.ids if args.ids is not None else preset["num_ids"],
            images_per_id=args.images_per_id if args.images_per_id is not None
            else preset["images_per_id"],
            num_cameras=args.cameras, height=args.height, width=args.width, seed=args.seed,
            num_distractors=args.distractors, num_junk=args.junk, jpeg_quality=args.quality,
            overwrite=args.overwrite, skip_existing=args.skip_existing, num_test_ids=args.test_ids,
            workers=args.workers,
        )
    except (ValueError, FileExistsError, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    verb = "kept existing" if info.reused else "wrote"
    print(f"{verb} {info.root} in {info.seconds:.1f} s (seed {info.seed}, {info.num_cameras} cameras)")
    for split, folder in SPLIT_FOLDERS.items():
        print(f"  {split:8s} {folder + '/':20s} {info.num_images[split]:6d} images "
              f"{info.num_identities[split]:5d} ids")
    print(f"  gallery includes {info.num_distractors} distractors (0000) and {info.num_junk} junk (-1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
