"""CLIP-ReID's stage-1 prompts and a text encoder that computes them exactly, but cheaper.

* :class:`PromptLearner` — "A photo of a X X X X person." with class-specific learnable tokens
  ``cls_ctx`` (num_classes, n_ctx, text_width) in place of the X's; the prefix (start token +
  "a photo of a") and suffix ("person." + end token + padding) are fixed token embeddings.
* :class:`TextEncoder` — CLIP's causal text transformer → ``ln_final`` → end-of-text (EOT) position
  → ``text_projection``, written over CLIP's own modules (their weights are used, never changed).
* :func:`encode_labels` / :func:`encode_all_classes` — text features per label / per class.

Three savings, each exact because CLIP's text transformer is causal (position ``i`` only sees
positions ``<= i``):

1. **Truncation.** Nothing after the EOT position influences it, so the context is cut to the
   template's length (EOT index + 1 = 12 tokens instead of 77).
2. **Distinct labels.** Each label in a batch is encoded once and indexed back.
3. **Shared prefix.** The prefix's hidden states depend on the fixed prefix only, so they are
   computed once per call (batch 1) and only their keys/values are shared with every prompt; in the
   last layer only the EOT query is computed.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from reid_pipeline.model.clip_loader import import_clip

__all__ = [
    "PromptError",
    "default_template",
    "PromptLearner",
    "TextEncoder",
    "encode_labels",
    "encode_all_classes",
    "prompt_state",
    "prompt_meta",
    "load_prompt_tokens",
]

PLACEHOLDER = "X"


class PromptError(ValueError):
    """A template, prompt-token file or CLIP model that does not fit the prompt learner."""


def default_template(n_ctx: int = 4, subject: str = "person") -> str:
    """CLIP-ReID's template: ``"A photo of a X X X X person."`` (``subject="vehicle"`` for vehicles)."""
    if n_ctx < 1:
        raise PromptError(f"n_ctx must be >= 1, got {n_ctx}")
    if not subject.strip():
        raise PromptError("subject must be a non-empty word such as 'person' or 'vehicle'")
    return f"A photo of a {' '.join([PLACEHOLDER] * n_ctx)} {subject.strip()}."


def _text_dims(clip_model: nn.Module) -> tuple[int, int, int]:
    """(text width, context length, embed dim) of an openai-clip model, with a clear error otherwise."""
    for name in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection"):
        if not hasattr(clip_model, name):
            raise PromptError(f"{type(clip_model).__name__} has no {name!r}: expected an openai-clip CLIP model")
    width = int(clip_model.token_embedding.weight.shape[1])
    context = int(clip_model.positional_embedding.shape[0])
    embed = int(clip_model.text_projection.shape[1])
    return width, context, embed


class PromptLearner(nn.Module):
    """Class-specific learnable prompt tokens inside a fixed template.

    Args:
        num_classes: number of identities (rows of ``cls_ctx``).
        clip_model: an openai-clip ``CLIP``; its ``token_embedding`` gives the fixed prefix/suffix.
        n_ctx: learnable tokens per class (the template's X count).
        template: text with exactly ``n_ctx`` consecutive ``X`` words; default
            :func:`default_template(n_ctx, subject) <default_template>`.
        subject: the template's last word when ``template`` is None ("person", "vehicle").
        truncate: cut the context to the template's length (EOT index + 1); ``False`` keeps CLIP's
            full context (77) as CLIP-ReID does — same result at the EOT position, slower.
        dtype: dtype of the tokens and buffers (fp32 master weights; use autocast for speed).
        generator: RNG for the N(0, 0.02) initialisation (torch's global RNG when None).

    Attributes: ``cls_ctx`` (parameter), ``token_prefix`` (1, P, D) and ``token_suffix`` (1, S, D)
    (non-persistent buffers), ``prefix_length`` P, ``context_length`` L = P + n_ctx + S,
    ``eot_index`` (position of the end-of-text token), ``width`` D, ``template``.
    """

    def __init__(
        self,
        num_classes: int,
        clip_model: nn.Module,
        n_ctx: int = 4,
        template: str | None = None,
        *,
        subject: str = "person",
        truncate: bool = True,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if int(num_classes) < 1:
            raise PromptError(f"num_classes must be >= 1, got {num_classes}")
        if int(n_ctx) < 1:
            raise PromptError(f"n_ctx must be >= 1, got {n_ctx}")
        template = default_template(n_ctx, subject) if template is None else template
        width, full_context, _ = _text_dims(clip_model)
        clip = import_clip()
        try:
            tokens = clip.tokenize([template], context_length=full_context)[0].long()
        except RuntimeError as exc:
            raise PromptError(f"template {template!r} does not fit CLIP's {full_context}-token context ({exc})") from exc
        placeholder_id = clip.clip._tokenizer.encode(PLACEHOLDER)[0]
        positions = (tokens == placeholder_id).nonzero().flatten().tolist()
        if len(positions) != n_ctx or positions != list(range(positions[0], positions[0] + n_ctx)):
            raise PromptError(
                f"template {template!r} must hold exactly n_ctx={n_ctx} consecutive {PLACEHOLDER!r} words "
                f"(the learnable tokens); found {len(positions)} at token positions {positions}"
            )
        eot_index = int(tokens.argmax())  # the end-of-text token has the highest id
        start = positions[0]
        context_length = eot_index + 1 if truncate else full_context
        with torch.no_grad():
            embedding = clip_model.token_embedding(tokens[:context_length].to(clip_model.token_embedding.weight.device))
        embedding = embedding.detach().to("cpu", dtype).unsqueeze(0)

        self.num_classes = int(num_classes)
        self.n_ctx = int(n_ctx)
        self.width = width
        self.template = template
        self.truncate = bool(truncate)
        self.prefix_length = start
        self.eot_index = eot_index
        self.context_length = context_length
        self.register_buffer("token_prefix", embedding[:, :start].clone(), persistent=False)
        self.register_buffer("token_suffix", embedding[:, start + n_ctx :].clone(), persistent=False)
        ctx = torch.empty(self.num_classes, self.n_ctx, width, dtype=dtype)
        nn.init.normal_(ctx, mean=0.0, std=0.02, generator=generator)
        self.cls_ctx = nn.Parameter(ctx)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, n_ctx={self.n_ctx}, width={self.width}, "
            f"context_length={self.context_length}, eot_index={self.eot_index}, template={self.template!r}"
        )

    def _check_labels(self, labels: torch.Tensor) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
            raise PromptError(f"labels must be a 1-D tensor of class indices, got {getattr(labels, 'shape', labels)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise PromptError(f"labels must be integer class indices, got dtype {labels.dtype}")
        if labels.numel():
            lo, hi = (int(v) for v in torch.aminmax(labels))  # one host sync
            if lo < 0 or hi >= self.num_classes:
                raise PromptError(f"labels must lie in [0, {self.num_classes}); got values in [{lo}, {hi}]")
        return labels.to(self.cls_ctx.device, torch.long)

    def _gather(self, labels: torch.Tensor) -> torch.Tensor:
        ctx = self.cls_ctx.index_select(0, labels)
        return torch.cat([ctx, self.token_suffix.expand(len(labels), -1, -1)], dim=1)

    def body(self, labels: torch.Tensor) -> torch.Tensor:
        """The prompts after the fixed prefix: ``cls_ctx[labels]`` + suffix, shape (B, L - P, D)."""
        return self._gather(self._check_labels(labels))

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Prompt token embeddings for ``labels`` only: (B, L, D)."""
        body = self.body(labels)
        return torch.cat([self.token_prefix.expand(body.shape[0], -1, -1), body], dim=1)

    def all_prompts(self) -> torch.Tensor:
        """Prompt token embeddings of every class: (num_classes, L, D)."""
        return self(torch.arange(self.num_classes, device=self.cls_ctx.device))


class TextEncoder(nn.Module):
    """CLIP's text tower over prompt embeddings, evaluated at the end-of-text position.

    Holds references to ``clip_model``'s ``transformer``, ``ln_final``, ``positional_embedding`` and
    ``text_projection`` (shared, not copied; never modified). The forward is written over each
    residual block's components (``ln_1``, the attention's in/out projections, ``ln_2``, ``mlp``)
    with an L×L causal mask, so any context length up to CLIP's works.
    """

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        width, context, embed = _text_dims(clip_model)
        self.transformer = clip_model.transformer
        self.ln_final = clip_model.ln_final
        self.positional_embedding = clip_model.positional_embedding
        self.text_projection = clip_model.text_projection
        self.width = width
        self.context_length = context
        self.embed_dim = embed
        self.heads = int(self.transformer.resblocks[0].attn.num_heads)

    # -- one residual block: queries at some rows, keys/values at [prefix, all rows] ------------------

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def _block(
        self,
        block: nn.Module,
        x: torch.Tensor,
        prefix_kv: tuple[torch.Tensor, torch.Tensor] | None,
        query_row: int | None,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One of CLIP's residual attention blocks, from its own components.

        ``x`` (B, T, D): the rows after the prefix. ``prefix_kv``: the prefix's keys/values (1, H, P, d)
        at this layer, or None. ``query_row``: compute the output at that row only (keys and values
        still come from every row). ``mask``: boolean (queries, keys), True = may attend; None = all.
        Returns ``(output at the queries, keys, values)`` — the last two of ``x``'s rows, per head.
        """
        attn = block.attn
        d = self.width
        w, b = attn.in_proj_weight, attn.in_proj_bias
        y = block.ln_1(x)
        if query_row is None:  # queries at every row: one projection for q, k and v
            q, k, v = (self._heads(t) for t in F.linear(y, w, b).split(d, dim=-1))
        else:
            k, v = (self._heads(t) for t in F.linear(y, w[d:], None if b is None else b[d:]).split(d, dim=-1))
            x, y = x[:, query_row : query_row + 1], y[:, query_row : query_row + 1]
            q = self._heads(F.linear(y, w[:d], None if b is None else b[:d]))
        keys, values = k, v
        if prefix_kv is not None:
            pk, pv = prefix_kv
            keys = torch.cat([pk.to(k.dtype).expand(k.shape[0], -1, -1, -1), k], dim=2)
            values = torch.cat([pv.to(v.dtype).expand(v.shape[0], -1, -1, -1), v], dim=2)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], d)
        x = x + attn.out_proj(out)
        return x + block.mlp(block.ln_2(x)), k, v

    @staticmethod
    def _causal_mask(n_queries: int, first_query: int, prefix: int, n_rows: int, device: torch.device) -> torch.Tensor | None:
        """Query ``i`` sits at row ``first_query + i`` (absolute position ``prefix + row``); key ``j`` at
        absolute position ``j`` of ``prefix + n_rows``. None when every key is visible to every query."""
        if n_queries == 1 and first_query == n_rows - 1:
            return None
        full = torch.ones(n_rows, prefix + n_rows, dtype=torch.bool, device=device).tril(diagonal=prefix)
        return full[first_query : first_query + n_queries]

    def prefix_states(self, prefix: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values, per layer, of a fixed prefix (1, P, D): everything later positions need
        from it (causal attention: the prefix sees only itself). Reusable for as long as the text
        tower's weights do not change — e.g. across all steps of stage 1."""
        self._check_prefix(prefix)
        mask = self._causal_mask(prefix.shape[1], 0, 0, prefix.shape[1], prefix.device)
        h = prefix + self.positional_embedding[: prefix.shape[1]].to(prefix.dtype)
        states = []
        for block in self.transformer.resblocks:
            h, k, v = self._block(block, h, None, None, mask)
            states.append((k, v))
        return states

    def _check_prefix(self, prefix: torch.Tensor) -> None:
        if prefix.dim() != 3 or prefix.shape[0] != 1 or prefix.shape[-1] != self.width:
            raise PromptError(f"prefix must be (1, P, {self.width}), got {tuple(prefix.shape)}")

    def encode(
        self,
        body: torch.Tensor,
        eot_index: int | torch.Tensor,
        prefix: torch.Tensor | None = None,
        prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Text features of the sequences ``[prefix, body[i]]`` at ``eot_index`` (absolute position).

        Args:
            body: (B, T, D) token embeddings after the prefix.
            eot_index: the EOT position — one int for all rows or a (B,) tensor.
            prefix: (1, P, D) token embeddings shared by every row, or None. Its hidden states are
                computed once (batch 1); only its keys/values are broadcast to the rows.
            prefix_kv: :meth:`prefix_states` of the prefix, computed earlier (then ``prefix`` is
                not needed).
        Returns: (B, embed_dim).
        """
        if body.dim() != 3 or body.shape[-1] != self.width:
            raise PromptError(f"prompt embeddings must be (B, L, {self.width}) for this CLIP, got {tuple(body.shape)}")
        if prefix_kv is None and prefix is not None:
            prefix_kv = self.prefix_states(prefix)
        if prefix_kv is not None and len(prefix_kv) != len(self.transformer.resblocks):
            raise PromptError(f"prefix_kv has {len(prefix_kv)} layers, this CLIP has {len(self.transformer.resblocks)}")
        p = 0 if prefix_kv is None else prefix_kv[0][0].shape[2]
        n = body.shape[1]
        if p + n > self.context_length:
            raise PromptError(f"prompt length {p + n} exceeds CLIP's context length {self.context_length}")
        per_row = isinstance(eot_index, torch.Tensor)
        if not per_row and not p <= int(eot_index) < p + n:
            raise PromptError(f"eot_index {eot_index} is outside the body positions [{p}, {p + n})")
        device = body.device
        blocks = list(self.transformer.resblocks)
        x = body + self.positional_embedding[p : p + n].to(body.dtype)
        body_mask = self._causal_mask(n, 0, p, n, device)
        for i, block in enumerate(blocks):
            kv = None if prefix_kv is None else prefix_kv[i]
            if i == len(blocks) - 1 and not per_row:  # last layer: only the EOT query matters
                row = int(eot_index) - p
                x, _, _ = self._block(block, x, kv, row, self._causal_mask(1, row, p, n, device))
            else:
                x, _, _ = self._block(block, x, kv, None, body_mask)
        if per_row:
            x = x[torch.arange(x.shape[0], device=device), eot_index.to(device).long() - p]
        else:
            x = x[:, 0]
        x = self.ln_final(x)
        return x @ self.text_projection.to(x.dtype)

    def forward(self, prompts: torch.Tensor, eot_index: int | torch.Tensor) -> torch.Tensor:
        """Text features of full prompt embeddings (B, L, D) at ``eot_index``: (B, embed_dim)."""
        return self.encode(prompts, eot_index)


def _check_pair(prompt_learner: PromptLearner, text_encoder: TextEncoder) -> None:
    if prompt_learner.width != text_encoder.width:
        raise PromptError(
            f"text width mismatch: prompt tokens have width {prompt_learner.width}, "
            f"the CLIP text encoder expects {text_encoder.width}"
        )
    if prompt_learner.context_length > text_encoder.context_length:
        raise PromptError(
            f"prompt length {prompt_learner.context_length} exceeds CLIP's context length {text_encoder.context_length}"
        )


def encode_labels(
    prompt_learner: PromptLearner,
    text_encoder: TextEncoder,
    labels: torch.Tensor,
    *,
    distinct: bool = True,
    prefix_cache: bool = True,
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Text features (B, embed_dim) of the prompts of ``labels`` (gradients flow to ``cls_ctx``).

    ``distinct``: encode each distinct label once and index back. ``prefix_cache``: compute the fixed
    prefix once (see the module docstring). Both are exact; turn them off only to compare.
    ``prefix_kv``: ``text_encoder.prefix_states(prompt_learner.token_prefix)`` computed once
    beforehand (valid while CLIP's text weights stay frozen); else computed in this call.
    """
    _check_pair(prompt_learner, text_encoder)
    labels = prompt_learner._check_labels(labels)
    rows, inverse = torch.unique(labels, return_inverse=True) if distinct else (labels, None)
    body = prompt_learner._gather(rows)
    if prefix_cache:
        if prefix_kv is None:
            prefix_kv = text_encoder.prefix_states(prompt_learner.token_prefix)
        elif prefix_kv[0][0].shape[2] != prompt_learner.prefix_length:
            raise PromptError(
                f"prefix_kv covers {prefix_kv[0][0].shape[2]} positions, the template's prefix has {prompt_learner.prefix_length}"
            )
        features = text_encoder.encode(body, prompt_learner.eot_index, prefix_kv=prefix_kv)
    else:
        prefix = prompt_learner.token_prefix.expand(body.shape[0], -1, -1)
        features = text_encoder.encode(torch.cat([prefix, body], dim=1), prompt_learner.eot_index)
    return features if inverse is None else features[inverse]


@torch.no_grad()
def encode_all_classes(prompt_learner: PromptLearner, text_encoder: TextEncoder, batch_size: int = 256) -> torch.Tensor:
    """Text features of every class, (num_classes, embed_dim) float32, without gradients.

    Runs on the prompt learner's device; wrap the call in the device's autocast for speed on a GPU.
    """
    if batch_size < 1:
        raise PromptError(f"batch_size must be >= 1, got {batch_size}")
    _check_pair(prompt_learner, text_encoder)
    device = prompt_learner.cls_ctx.device
    prefix_kv = text_encoder.prefix_states(prompt_learner.token_prefix)
    out = []
    for start in range(0, prompt_learner.num_classes, batch_size):
        labels = torch.arange(start, min(start + batch_size, prompt_learner.num_classes), device=device)
        out.append(encode_labels(prompt_learner, text_encoder, labels, distinct=False, prefix_kv=prefix_kv).float())
    return torch.cat(out, dim=0)


def prompt_state(prompt_learner: PromptLearner) -> dict[str, torch.Tensor]:
    """The learnable tokens only: ``{"cls_ctx": (num_classes, n_ctx, width)}`` (detached, on the CPU)."""
    return {"cls_ctx": prompt_learner.cls_ctx.detach().to("cpu").clone()}


def prompt_meta(prompt_learner: PromptLearner) -> dict:
    """JSON-able description of the prompts (for a checkpoint's sidecar)."""
    return {
        "num_classes": prompt_learner.num_classes,
        "n_ctx": prompt_learner.n_ctx,
        "text_width": prompt_learner.width,
        "template": prompt_learner.template,
        "eot_index": prompt_learner.eot_index,
        "context_length": prompt_learner.context_length,
        "truncated": prompt_learner.truncate,
    }


def load_prompt_tokens(
    prompt_learner: PromptLearner, tokens: Mapping[str, torch.Tensor] | str | os.PathLike
) -> PromptLearner:
    """Copy learned tokens (what :func:`prompt_state` returned, or a safetensors file of it) in place."""
    source = "prompt tokens"
    if not isinstance(tokens, Mapping):
        from reid_pipeline.storage import load_tensors

        source = str(tokens)
        tokens, _ = load_tensors(tokens)
    if "cls_ctx" not in tokens:
        raise PromptError(f"{source}: no 'cls_ctx' tensor (found {sorted(tokens)})")
    ctx = tokens["cls_ctx"]
    expected = tuple(prompt_learner.cls_ctx.shape)
    if tuple(ctx.shape) != expected:
        what = []
        if ctx.dim() == 3 and ctx.shape[0] != expected[0]:
            what.append(f"{ctx.shape[0]} classes, expected {expected[0]}")
        if ctx.dim() == 3 and ctx.shape[1] != expected[1]:
            what.append(f"{ctx.shape[1]} tokens per class, expected n_ctx={expected[1]}")
        if ctx.dim() == 3 and ctx.shape[2] != expected[2]:
            what.append(f"text width {ctx.shape[2]}, expected {expected[2]}")
        raise PromptError(
            f"{source}: cls_ctx has shape {tuple(ctx.shape)}, expected {expected}"
            + (f" ({'; '.join(what)})" if what else "")
        )
    if not torch.isfinite(ctx).all():
        raise PromptError(f"{source}: cls_ctx holds non-finite values")
    with torch.no_grad():
        prompt_learner.cls_ctx.copy_(ctx.to(prompt_learner.cls_ctx.device, prompt_learner.cls_ctx.dtype))
    return prompt_learner
