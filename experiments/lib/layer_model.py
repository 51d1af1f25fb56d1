"""``experiments.lib.model.LanguageModel`` with any registered causal layer (``attnjax.nn.LAYERS``) as its mixer.

``LanguageModel`` picks its token mixer from the mechanism registry (through ``MultiHeadAttention``) or from
``attnjax.nn.BLOCKS``. ``LayerLanguageModel`` is the same model (embedding, optional short convolutions, final
LayerNorm, tied head, the same ``__call__``) whose blocks are ``LayerBlock``: the pre-norm block of
``experiments.lib.model.AttentionBlock`` with a registered layer in place of ``MultiHeadAttention``. A layer is
built from its constructor's own defaults with the model's width and heads (``layer_kwargs``), so a layer
registered later (say ``"titans_mac"``) plugs in by name, with no code change here.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional

import jax
from flax import nnx

from attnjax import masks
from attnjax.nn.registry import LAYERS, ModuleSpec, modules
from attnjax.positional import RoPE
from experiments.lib.model import MLP, LanguageModel, ModelConfig, ShortConv


def causal_layer_names() -> list[str]:
    """Every registered layer that promises causality (``ModuleSpec.causal``), in registry order."""
    return [s.name for s in modules("layer") if s.causal]


def layer_spec(name: str) -> ModuleSpec:
    """The registry spec of the causal layer ``name``; ``ValueError`` naming the causal layers otherwise."""
    spec = next((s for s in modules("layer") if s.name == name), None)
    if spec is None or not spec.causal:
        what = "is not causal" if spec is not None else "is not a registered layer"
        raise ValueError(f"layer {name!r} {what}; causal layers: {causal_layer_names()}")
    return spec


def layer_kwargs(spec: ModuleSpec, config: ModelConfig, options: Optional[Mapping[str, Any]] = None) -> dict:
    """Constructor kwargs (``rngs`` excluded) of ``spec``'s layer in a model of shape ``config``.

    The layer's own defaults, plus: ``d_model``; ``num_heads`` and ``head_dim`` (``config.head_dim``, if set)
    where the constructor takes them; ``rope=RoPE()`` where it takes ``rope`` (or its example does) and
    ``config.rope``; ``causal=True`` where it takes ``causal``; each other argument without a default, from the
    spec's tiny example (e.g. ``GraphMoE``'s ``num_experts``); then ``options``, which win.
    """
    params = inspect.signature(spec.module.__init__).parameters
    kwargs: dict[str, Any] = {"d_model": config.d_model}
    if "num_heads" in params:
        kwargs["num_heads"] = config.num_heads
    if "head_dim" in params and config.head_dim is not None:
        kwargs["head_dim"] = config.head_dim
    if config.rope and ("rope" in params or "rope" in spec.kwargs):
        kwargs["rope"] = RoPE()
    if "causal" in params:
        kwargs["causal"] = True
    for name, p in params.items():
        if (name not in kwargs and name not in ("self", "rngs") and p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name in spec.kwargs):
            kwargs[name] = spec.kwargs[name]
    return {**kwargs, **(options or {})}


class LayerBlock(nnx.Module):
    """Pre-norm block ``h = x + layer(LN(x), mask=Causal())``, ``y = h + MLP(LN(h))`` (``mlp_dim=0``: ``y = h``)."""

    def __init__(self, layer: nnx.Module, d_model: int, *, mlp_dim: int, rngs: nnx.Rngs):
        self.norm_mixer = nnx.LayerNorm(d_model, rngs=rngs)
        self.mixer = layer
        self.norm_mlp = nnx.LayerNorm(d_model, rngs=rngs) if mlp_dim else None
        self.mlp = MLP(d_model, mlp_dim, rngs=rngs) if mlp_dim else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``, causal."""
        h = x + self.mixer(self.norm_mixer(x), mask=masks.Causal())
        return h if self.mlp is None else h + self.mlp(self.norm_mlp(h))


class LayerLanguageModel(LanguageModel):
    """``LanguageModel`` whose ``config.num_layers`` blocks are ``LayerBlock(LAYERS[layer])``.

    ``config`` gives the vocabulary, width, depth, heads, MLP ratio, RoPE, short convolutions and tying; its
    ``mixer_options`` go to the layer's constructor (``layer_kwargs``); its ``mixer`` is not used. Same
    ``__call__`` as ``LanguageModel``: ``tokens [B, T]`` int -> float32 logits ``[B, T, vocab_size]``.
    """

    def __init__(self, layer: str, config: ModelConfig, *, rngs: nnx.Rngs):
        spec = layer_spec(layer)
        kwargs = layer_kwargs(spec, config, config.mixer_options)
        d = config.d_model
        self.embed = nnx.Embed(config.vocab_size, d, embedding_init=nnx.initializers.normal(d ** -0.5), rngs=rngs)
        self.convs = nnx.List([ShortConv(d, config.short_conv, rngs=rngs) for _ in range(config.num_layers)]
                              if config.short_conv else [])
        self.blocks = nnx.List([LayerBlock(LAYERS[layer](**kwargs, rngs=rngs), d, mlp_dim=config.mlp_ratio * d,
                                           rngs=rngs) for _ in range(config.num_layers)])
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.head = None if config.tie_embeddings else nnx.Linear(d, config.vocab_size, use_bias=False, rngs=rngs)
