"""Everything that exists only for the demo and the tests — not part of the ReID library.

* :mod:`.synthetic` — a deterministic synthetic person re-id dataset in the Market-1501 layout, with
  a caption per image (:mod:`.captions`);
* :mod:`.tiny_clip` — the small ``clip.model.CLIP`` in OpenAI's architecture;
* :mod:`.build` — ``python -m reid_pipeline.embedded``: the demo/CI datasets and the small CLIP
  pre-trained on captioned synthetic people, under ``data/embedded``.

The package imports none of its modules, so ``python -m reid_pipeline.embedded.synthetic`` runs its
module fresh.
"""
