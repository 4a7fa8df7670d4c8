"""``nn.MultiheadAttention`` as K-FAC layers: its input projections and its output projection.

``nn.MultiheadAttention`` applies its weights inside ``F.multi_head_attention_forward``, where
no module hook can see them. While a preconditioner is attached, a training forward with
gradients enabled runs an equivalent unfused forward instead (eval-mode and no-grad forwards
keep torch's own, fast path):

1. the input projections run as modules the capture hooks: ``<name>.in_proj`` (the packed
   ``in_proj_weight``, ``E -> 3E``, when ``query is key is value``, i.e. self-attention, the
   case of ``nn.TransformerEncoderLayer``), or ``<name>.q_proj``, ``<name>.k_proj``,
   ``<name>.v_proj`` for a module built with ``kdim``/``vdim`` (separate weights);
2. ``F.multi_head_attention_forward`` then runs on the projected tensors with identity
   projections (a product with an exact identity is exact in floating point, so the output
   is torch's to the last bit of the attention itself), masks, dropout, ``bias_k``/``bias_v``
   and ``add_zero_attn`` included;
3. ``out_proj`` (an ``nn.Linear`` child, registered like any Linear layer) is called as a
   module on batch-first rows.

Packed weights with different ``query`` and ``key``/``value`` tensors (cross-attention, as in
``nn.TransformerDecoderLayer``'s second attention) would need one Kronecker pair per slice of
one parameter; that forward raises, naming the module (skip it with ``skip_layers``).

The sample dimension is the batch dimension (``batch_first`` or not): the projections' rows
are taken batch-major, so ``n`` counts sequences and ``tau`` positions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._layers import LinearLayer, register_layer

__all__ = ["AttentionProjection", "attention_layers", "restore"]


class AttentionProjection(nn.Module):
    """One input projection of an attention module: ``F.linear`` with the module's own
    parameters (held, not owned: it is not registered in the model, so the model's
    ``state_dict`` and ``parameters()`` are unchanged)."""

    def __init__(
        self, owner: str, weight: nn.Parameter, bias: nn.Parameter | None, batch_first: bool
    ) -> None:
        super().__init__()
        self.owner = owner
        self.weight = weight
        self.bias = bias
        self.batch_first = batch_first

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


@register_layer(AttentionProjection)
class AttentionProjectionLayer(LinearLayer):
    """An attention input projection: a Linear layer whose sample dimension is the batch
    dimension of the attention's inputs (dimension 1 of sequence-first tensors)."""

    def __init__(self, name: str, module: AttentionProjection) -> None:
        super().__init__(name, module)  # type: ignore[arg-type]
        self.owner = module.owner
        self.owner_module: nn.Module | None = None
        self.batch_first = module.batch_first

    def _batch_major(self, t: Tensor) -> Tensor:
        if t.ndim == 2:  # an unbatched sequence: one sample
            return t.unsqueeze(0)
        return t if self.batch_first else t.transpose(0, 1)

    def input_rows(self, x: Tensor) -> tuple[Tensor, int]:
        return super().input_rows(self._batch_major(x))

    def output_rows(self, g: Tensor) -> Tensor:
        return super().output_rows(self._batch_major(g))


def _projections(name: str, module: nn.MultiheadAttention) -> dict[str, AttentionProjection]:
    bf = module.batch_first
    if module._qkv_same_embed_dim:
        assert module.in_proj_weight is not None
        return {
            f"{name}.in_proj": AttentionProjection(
                name, module.in_proj_weight, module.in_proj_bias, bf
            )
        }
    if module.in_proj_bias is not None:
        raise ValueError(
            f"Unsupported layer '{name}' (MultiheadAttention): separate q/k/v weights share "
            "one packed in_proj_bias, which K-FAC cannot split between three layers; build it "
            f"with bias=False or exclude it with skip_layers=['{name}']"
        )
    return {
        f"{name}.{part}_proj": AttentionProjection(
            name, getattr(module, f"{part}_proj_weight"), None, bf
        )
        for part in ("q", "k", "v")
    }


def attention_layers(name: str, module: nn.MultiheadAttention) -> dict[str, LinearLayer]:
    """The input-projection layers of ``module`` (registered under ``name``), after
    installing the forward that calls them (undone by :func:`restore`)."""
    projections = _projections(name, module)
    layers = {key: AttentionProjectionLayer(key, proj) for key, proj in projections.items()}
    for layer in layers.values():
        layer.owner_module = module
    module.__dict__["_kfac_projections"] = projections
    module.__dict__["forward"] = _UnfusedForward(name, module, projections)
    return dict(layers)


def restore(module: nn.Module) -> None:
    """Give ``module`` back its own forward."""
    module.__dict__.pop("forward", None)
    module.__dict__.pop("_kfac_projections", None)


class _UnfusedForward:
    """The training forward of an attention module while a preconditioner is attached (an
    object, not a closure: a deepcopy or a pickle of the model carries one bound to the
    copy's own module and projections, whose hooks do nothing)."""

    def __init__(
        self, name: str, module: nn.MultiheadAttention, projections: dict[str, AttentionProjection]
    ) -> None:
        self.name = name
        self.module = module
        self.projections = projections

    def __call__(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        name, module, projections = self.name, self.module, self.projections
        E = module.embed_dim
        arguments = (key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
        if not (module.training and torch.is_grad_enabled()):
            return type(module).forward(module, query, key, value, *arguments)
        if module._qkv_same_embed_dim:
            if not (query is key and key is value):
                raise RuntimeError(
                    f"MultiheadAttention '{name}' was called with different query and "
                    "key/value tensors (cross-attention) and a packed in_proj_weight: K-FAC "
                    "preconditions its packed projection for self-attention only; exclude it "
                    f"with skip_layers=['{name}'] (its parameters then take the base update)"
                )
            q, k, v = projections[f"{name}.in_proj"](query).chunk(3, dim=-1)
        else:
            q = projections[f"{name}.q_proj"](query)
            k = projections[f"{name}.k_proj"](key)
            v = projections[f"{name}.v_proj"](value)
        batched = query.dim() == 3
        if module.batch_first and batched:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        eye = torch.eye(E, dtype=q.dtype, device=q.device)
        attn, weights = F.multi_head_attention_forward(
            q,
            k,
            v,
            E,
            module.num_heads,
            None,
            None,
            module.bias_k,
            module.bias_v,
            module.add_zero_attn,
            module.dropout,
            eye,
            None,
            training=module.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            use_separate_proj_weight=True,
            q_proj_weight=eye,
            k_proj_weight=eye,
            v_proj_weight=eye,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        if batched:
            out = module.out_proj(attn.transpose(0, 1))  # batch-major rows for the capture
            out = out if module.batch_first else out.transpose(0, 1)
        else:
            out = module.out_proj(attn.unsqueeze(0)).squeeze(0)  # one sample
        return out, weights
