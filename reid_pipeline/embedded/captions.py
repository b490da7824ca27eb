"""Captions for the synthetic figures: what was drawn, in words, with synonyms and varied word order.

:func:`describe` turns one figure's attributes (colour names, top pattern and stripe width, sleeves, lower garment,
bag, hairstyle, shoes) and the view it was drawn from into a sentence such as "a pedestrian in a
scarlet t-shirt with white horizontal stripes and navy trousers, carrying a brown backpack". Every
choice (synonym, clause order, optional details) comes from the ``rng`` passed in, so the captions
of a seed are reproducible while the text tower sees many phrasings of one appearance.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["BUILD_WORDS", "COLOUR_WORDS", "HAIR_WORDS", "HEIGHT_WORDS", "SKIN_WORDS", "STRIPE_WORDS", "describe"]

#: colour name (as the generator records it) → words that may stand for it; the first is canonical.
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "black": ("black", "jet-black"),
    "dark grey": ("dark grey", "charcoal", "dark gray"),
    "grey": ("grey", "gray", "mid-grey"),
    "light grey": ("light grey", "silver", "light gray"),
    "white": ("white", "snow-white"),
    "navy": ("navy", "navy blue", "dark blue"),
    "blue": ("blue", "royal blue"),
    "light blue": ("light blue", "sky blue", "pale blue"),
    "red": ("red", "scarlet", "bright red"),
    "maroon": ("maroon", "burgundy", "dark red"),
    "green": ("green", "forest green"),
    "olive": ("olive", "olive green", "khaki"),
    "yellow": ("yellow", "mustard", "golden"),
    "orange": ("orange", "tangerine"),
    "pink": ("pink", "rose"),
    "purple": ("purple", "violet"),
    "beige": ("beige", "tan", "sand-coloured"),
    "brown": ("brown", "chocolate"),
}
#: hair colour name → words.
HAIR_WORDS: dict[str, tuple[str, ...]] = {
    "black": ("black", "jet-black"),
    "dark brown": ("dark brown", "brunette"),
    "brown": ("brown", "chestnut"),
    "blond": ("blond", "fair"),
    "grey": ("grey", "grey-white", "silver"),
    "red": ("red", "ginger", "auburn"),
}
#: skin tone name → words ("with pale skin", "pale-skinned").
SKIN_WORDS: dict[str, tuple[str, ...]] = {
    "pale": ("pale", "very pale"),
    "fair": ("fair", "light"),
    "medium": ("medium", "olive"),
    "tan": ("tanned", "sun-tanned"),
    "brown": ("brown", "mid-brown"),
    "dark": ("dark", "very dark"),
}
#: the thirds of height and of torso width the generator draws from; the middle ones are not named.
#: (no "short" or "thin": they name hair, sleeves and stripes.)
HEIGHT_WORDS: dict[str, tuple[str, ...]] = {"short": ("small", "petite"), "tall": ("tall",)}
BUILD_WORDS: dict[str, tuple[str, ...]] = {"slim": ("slim", "slender", "lean"), "broad": ("broad", "stocky", "heavy-set")}
#: stripe period: narrow (< 10 px at drawing size) or wide.
STRIPE_WORDS: dict[str, tuple[str, ...]] = {"narrow": ("narrow", "fine"), "wide": ("wide", "thick", "bold")}
_SUBJECTS = ("a person", "a pedestrian", "someone", "a passer-by", "a photo of a person", "a walker")
_LONG_TOPS = ("long-sleeved shirt", "sweater", "jacket", "long-sleeved top", "jumper")
_SHORT_TOPS = ("t-shirt", "short-sleeved shirt", "tee", "short-sleeved top", "polo shirt")
_BOTTOMS = {"trousers": ("trousers", "pants", "slacks"), "shorts": ("shorts",), "skirt": ("skirt",)}
_VIEWS = {
    "front": ("seen from the front", "facing the camera"),
    "back": ("seen from behind", "walking away from the camera"),
    "side": ("seen from the side", "in profile"),
}


def _one(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _top(a: Mapping[str, object], view: str, rng: np.random.Generator) -> str:
    c1 = _one(rng, COLOUR_WORDS[str(a["top"])])
    c2 = _one(rng, COLOUR_WORDS[str(a["top2"])])
    garment = _one(rng, _LONG_TOPS if a["long_sleeves"] else _SHORT_TOPS)
    pattern = str(a["pattern"])
    if pattern == "logo" and view != "front":  # the chest logo is drawn on the front only
        pattern = "solid"
    form = int(rng.integers(2))
    if pattern == "solid":
        return _article(f"{c1} {garment}") if form else _article(f"plain {c1} {garment}")
    if pattern in ("hstripes", "vstripes"):
        way = "horizontal" if pattern == "hstripes" else "vertical"
        width = _one(rng, STRIPE_WORDS[str(a["stripes"])]) if rng.random() < 0.7 else None
        if form:
            return _article(f"{c1} {garment} with {width + ' ' if width else ''}{c2} {way} stripes")
        return _article(f"{c1} and {c2} {way}ly striped {garment}") + (f" with {width} stripes" if width else "")
    if pattern == "checks":
        word = _one(rng, ("checked", "chequered", "plaid"))
        if form:
            return _article(f"{c1} and {c2} {word} {garment}")
        return _article(f"{c1} {garment} with a {c2} check pattern")
    if pattern == "twotone":
        if form:
            return _article(f"two-tone {c1} and {c2} {garment}")
        return _article(f"{c1} and {c2} two-tone {garment}")
    # logo, seen from the front
    word = _one(rng, ("logo", "print", "badge"))
    return _article(f"{c1} {garment} with {_article(c2 + ' ' + word)} on the chest")


def _bottom(a: Mapping[str, object], rng: np.random.Generator) -> str:
    kind = str(a["bottom_type"])
    words = f"{_one(rng, COLOUR_WORDS[str(a['bottom'])])} {_one(rng, _BOTTOMS[kind])}"
    return _article(words) if kind == "skirt" else words


def _bag(a: Mapping[str, object], rng: np.random.Generator) -> str | None:
    bag = str(a["bag"])
    if bag == "none":
        return _one(rng, ("with no bag", "carrying nothing", "without a bag")) if rng.random() < 0.3 else None
    colour = _one(rng, COLOUR_WORDS[str(a["bag_colour"])])
    if bag == "backpack":
        return f"{_one(rng, ('carrying', 'with', 'wearing'))} {_article(colour + ' ' + _one(rng, ('backpack', 'rucksack')))}"
    if bag == "handbag":
        return f"{_one(rng, ('holding', 'carrying', 'with'))} {_article(colour + ' handbag')}"
    return _one(rng, (f"with {_article(colour + ' shoulder bag')}", f"{_article(colour + ' bag')} over one shoulder"))


def _head(a: Mapping[str, object], rng: np.random.Generator) -> str:
    style = str(a["hairstyle"])
    if style == "bald":
        return _one(rng, ("bald", "with a shaved head"))
    if style == "cap":
        colour = _one(rng, COLOUR_WORDS[str(a["cap"])])
        return f"{_one(rng, ('wearing', 'in', 'with'))} {_article(colour + ' ' + _one(rng, ('cap', 'baseball cap')))}"
    hair = _one(rng, HAIR_WORDS[str(a["hair"])])
    return f"with {style} {hair} hair"


def _body(a: Mapping[str, object], rng: np.random.Generator) -> tuple[list[str], str | None]:
    """Adjectives for build and skin (may go before the subject) and a clause for what is not one."""
    words = [_one(rng, table[str(a[key])]) for key, table in (("height", HEIGHT_WORDS), ("build", BUILD_WORDS))
             if str(a[key]) in table]
    clause = None
    if not words and rng.random() < 0.5:
        clause = _one(rng, ("of average build", "of medium height and build"))
    if rng.random() < 0.3:
        words.reverse()
    if rng.random() < 0.6:
        skin = _one(rng, SKIN_WORDS[str(a["skin"])])
        if rng.random() < 0.5:
            words.append(f"{skin}-skinned")
        else:
            clause = f"with {skin} skin" if clause is None else f"{clause}, with {skin} skin"
    return words, clause


def _subject(adjectives: list[str], rng: np.random.Generator) -> tuple[str, str | None]:
    """The sentence's subject, with ``adjectives`` in it or, as a clause, beside it."""
    subject = _one(rng, _SUBJECTS)
    if not adjectives:
        return subject, None
    if subject != "someone" and rng.random() < 0.6:
        head, noun = subject.rsplit("a ", 1)
        return head + _article(" ".join(adjectives) + " " + noun), None
    return subject, " and ".join(adjectives)


def describe(attributes: Mapping[str, object], view: str, rng: np.random.Generator) -> str:
    """One caption for a figure with ``attributes`` seen from ``view`` (``front``/``back``/``side``).

    ``attributes`` is what :mod:`.synthetic` records per image in ``captions.jsonl``: colour
    names ``top``, ``top2``, ``bottom``, ``bag_colour``, ``cap``, ``hair``, ``shoes`` and
    ``pattern``, ``long_sleeves``, ``bottom_type``, ``bag``, ``hairstyle``, and the build: ``skin``
    (:data:`SKIN_WORDS`), ``height``, ``build`` (thirds: short/average/tall, slim/average/broad) and
    ``stripes`` (narrow/wide).
    """
    if view not in _VIEWS:
        raise ValueError(f"view must be one of {sorted(_VIEWS)}, got {view!r}")
    clothes = [_top(attributes, view, rng), _bottom(attributes, rng)]
    if rng.random() < 0.3:
        clothes.reverse()
    extras = [e for e in (_bag(attributes, rng),) if e]
    if rng.random() < 0.6:
        extras.append(_head(attributes, rng))
    if rng.random() < 0.35:
        extras.append(f"{_one(rng, ('and', 'with', 'in'))} {_one(rng, COLOUR_WORDS[str(attributes['shoes'])])} "
                      f"{_one(rng, ('shoes', 'sneakers', 'trainers'))}")
    adjectives, body = _body(attributes, rng) if rng.random() < 0.8 else ([], None)
    subject, beside = _subject(adjectives, rng)
    extras += [e for e in (beside, body) if e]
    order = rng.permutation(len(extras))
    extras = [extras[i] for i in order]
    verb = _one(rng, ("wearing", "in", "dressed in"))
    text = f"{subject} {verb} {clothes[0]} and {clothes[1]}"
    if extras:
        text += ", " + ", ".join(extras)
    if rng.random() < 0.5:
        where = _one(rng, _VIEWS[view])
        text = f"{where}, {text}" if rng.random() < 0.4 else f"{text}, {where}"
    return text
