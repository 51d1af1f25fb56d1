"""A small causal language model of ``attnjax.nn`` blocks, picked by mixer name.

The model is a decoder-only transformer (Vaswani et al. 2017; GPT-2's pre-norm layout, Radford et al.
2019): token embedding, ``num_layers`` residual blocks, a final LayerNorm and a tied (or untied)
output head. The token mixer is picked by name (``ModelConfig.mixer``):

- any ``attnjax.registry`` name (``"softmax"``, ``"lightning"``, ``"based_linear"``, ...): a pre-norm
  block ``h = x + MHA(LN(x))``, ``y = h + MLP(LN(h))`` with ``attnjax.nn.MultiHeadAttention(mechanism=name)``,
  causal mask and RoPE;
- a name in ``attnjax.nn.BLOCKS`` (``"transnormer"``, ``"based"``): that block as published
  (TransNormerLLM: SRMSNorm, gated Lightning attention, SGLU; BASED: Taylor linear attention, then
  sliding-window softmax, then MLP), with ``ModelConfig.mixer_options`` passed to its constructor;
- ``"layer:<name>"`` for a causal layer of ``attnjax.nn.LAYERS`` (``"layer:titans_mac"``, ``"layer:rat"``):
  ``LayerBlock``, the pre-norm block above with that layer in place of ``MultiHeadAttention``, the layer
  built from its constructor's own defaults with the model's width and heads (``layer_kwargs``), so a layer
  registered later plugs in by name.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax import masks, nn as ajnn, registry
from attnjax.linear import linear_attention
from attnjax.nn.registry import LAYERS, ModuleSpec, modules
from attnjax.positional import RoPE


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of a ``LanguageModel``.

    Attributes:
      vocab_size: tokens ``V``.
      mixer: a registry mechanism name, a name in ``attnjax.nn.BLOCKS`` or ``"layer:<name>"`` for a causal
        ``attnjax.nn.LAYERS`` layer (see the module docstring).
      d_model: residual width.
      num_layers: residual blocks.
      num_heads: attention heads per block.
      head_dim: features per head of the registry-mechanism and layer blocks (default ``d_model // num_heads``);
        for a feature-map mechanism it is also the dimension the feature map expands (BASED's ``feature_dim``).
      mlp_ratio: MLP hidden width ``mlp_ratio · d_model`` of the registry-mechanism blocks (and BASED);
        ``0`` drops the MLP from the registry-mechanism blocks (BASED then uses its default ``4·d_model``).
      rope: rotary positions in the ``MultiHeadAttention`` (and BASED sliding-window) layers.
      tie_embeddings: the head is the transposed embedding; else a separate ``[d_model, V]`` matrix.
      short_conv: kernel size of a causal depthwise convolution sublayer before each block (``0``: none).
      mixer_options: extra keyword arguments of the ``attnjax.nn.BLOCKS`` block (e.g. BASED's
        ``feature_dim``, ``window``), of the layer's constructor, or of the registry config (e.g.
        ``{"chunk_size": 32}``).
    """

    vocab_size: int
    mixer: str = "softmax"
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    head_dim: Optional[int] = None
    mlp_ratio: int = 4
    rope: bool = True
    tie_embeddings: bool = True
    short_conv: int = 0
    mixer_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.mixer.startswith(LAYER_PREFIX):
            layer_spec(self.mixer[len(LAYER_PREFIX):])
        elif self.mixer not in mixer_names():
            raise ValueError(f"unknown mixer {self.mixer!r}; known: {mixer_names()}")
        for name in ("vocab_size", "d_model", "num_layers", "num_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.short_conv < 0:
            raise ValueError(f"ModelConfig.short_conv must be >= 0, got {self.short_conv}")
        if self.mlp_ratio < 0:
            raise ValueError(f"ModelConfig.mlp_ratio must be >= 0, got {self.mlp_ratio}")

    def mechanism(self) -> Optional[registry.Mechanism]:
        """The registry config of a registry mixer (with ``mixer_options``); ``None`` for an nn block or layer."""
        if self.mixer in ajnn.BLOCKS or self.mixer.startswith(LAYER_PREFIX):
            return None
        return registry.get(self.mixer)(**self.mixer_options)


LAYER_PREFIX = "layer:"
"""``ModelConfig.mixer = LAYER_PREFIX + name`` picks the causal layer ``name`` of ``attnjax.nn.LAYERS`` (layer names
can coincide with mechanism and block names: ``"based"``, ``"routing"``)."""


def mixer_names() -> list[str]:
    """Every name ``ModelConfig.mixer`` accepts: registry mechanisms, ``attnjax.nn.BLOCKS``, then
    ``"layer:<name>"`` for every causal layer."""
    return ([e.name for e in registry.entries()] + sorted(ajnn.BLOCKS)
            + [LAYER_PREFIX + n for n in causal_layer_names()])


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


def layer_kwargs(spec: ModuleSpec, config: ModelConfig) -> dict:
    """Constructor kwargs (``rngs`` excluded) of ``spec``'s layer in a model of shape ``config``.

    The layer's own defaults, plus: ``d_model``; ``num_heads`` and ``head_dim`` (``config.head_dim``, if set)
    where the constructor takes them; ``rope=RoPE()`` where it takes ``rope`` (or its example does) and
    ``config.rope``; ``causal=True`` where it takes ``causal``; each other argument without a default, from the
    spec's tiny example (e.g. ``GraphMoE``'s ``num_experts``); then ``config.mixer_options``, which win.
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
    return {**kwargs, **config.mixer_options}


class MLP(nnx.Module):
    """``y = W_2 gelu(W_1 x)``, hidden width ``hidden``."""

    def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs):
        self.up, self.down = nnx.Linear(d_model, hidden, rngs=rngs), nnx.Linear(hidden, d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [..., d_model] -> [..., d_model]``."""
        return self.down(jax.nn.gelu(self.up(x)))


class AttentionBlock(nnx.Module):
    """Pre-norm block ``h = x + MHA(LN(x))``, ``y = h + MLP(LN(h))`` with causal ``MultiHeadAttention``.

    ``mlp_dim=0`` leaves the MLP out (``y = h``), as Zoology's MQAR models do (identity state mixer).
    ``causal=False`` makes it an encoder block (no mask: every token attends to every token; no ``decode``).
    """

    def __init__(self, d_model: int, num_heads: int, *, mechanism: registry.Mechanism, mlp_dim: int, rope: bool,
                 rngs: nnx.Rngs, head_dim: Optional[int] = None, causal: bool = True):
        self.causal = causal
        self.norm_attention = nnx.LayerNorm(d_model, rngs=rngs)
        self.attention = ajnn.MultiHeadAttention(d_model, num_heads, head_dim=head_dim, mechanism=mechanism,
                                                 rope=RoPE() if rope else None, rngs=rngs)
        self.norm_mlp = nnx.LayerNorm(d_model, rngs=rngs) if mlp_dim else None
        self.mlp = MLP(d_model, mlp_dim, rngs=rngs) if mlp_dim else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``, causal unless built with ``causal=False``."""
        h = x + self.attention(self.norm_attention(x), mask=masks.Causal() if self.causal else None)
        return h if self.mlp is None else h + self.mlp(self.norm_mlp(h))

    def init_cache(self, batch: int, max_len: int) -> Any:
        """The attention layer's empty cache (``MultiHeadAttention.init_cache``) for ``decode``."""
        return self.attention.init_cache(batch, max_len)

    def decode(self, x_t: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
        """One step ``x_t [B, 1, d_model] -> [B, 1, d_model]``, equal to ``self(x)`` at the token's position."""
        return self._cached(x_t, *self.attention.decode(self.norm_attention(x_t), cache))

    def prefill(self, x: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
        """``x [B, T, d_model]`` at the cache's next ``T`` positions in one attention call
        (``MultiHeadAttention.prefill``), equal to ``T`` calls of ``decode``."""
        return self._cached(x, *self.attention.prefill(self.norm_attention(x), cache))

    def _cached(self, x: jax.Array, a: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
        h = x + a
        return (h if self.mlp is None else h + self.mlp(self.norm_mlp(h))), cache


class LayerBlock(nnx.Module):
    """Pre-norm block ``h = x + layer(LN(x), mask=Causal())``, ``y = h + MLP(LN(h))`` (``mlp_dim=0``: ``y = h``),
    with a registered causal layer as the mixer (no ``init_cache``/``decode``: the layers decode on their own)."""

    def __init__(self, layer: nnx.Module, d_model: int, *, mlp_dim: int, rngs: nnx.Rngs):
        self.norm_mixer = nnx.LayerNorm(d_model, rngs=rngs)
        self.mixer = layer
        self.norm_mlp = nnx.LayerNorm(d_model, rngs=rngs) if mlp_dim else None
        self.mlp = MLP(d_model, mlp_dim, rngs=rngs) if mlp_dim else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``, causal."""
        h = x + self.mixer(self.norm_mixer(x), mask=masks.Causal())
        return h if self.mlp is None else h + self.mlp(self.norm_mlp(h))


class ShortConv(nnx.Module):
    """Residual causal depthwise convolution ``y_t = x_t + Σ_{i<k} w_i ⊙ LN(x)_{t−i} + b``.

    The short convolutions of H3/Hyena/BASED (Zoology's ``BaseConv``, Mamba's ``conv1d``): each token
    sees the previous ``k − 1`` tokens, so a mixer can bind a value to the key just before it without
    first learning a previous-token attention head.
    """

    def __init__(self, d_model: int, kernel_size: int, *, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.conv = nnx.Conv(d_model, d_model, kernel_size=(kernel_size,), feature_group_count=d_model,
                             padding=((kernel_size - 1, 0),), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``, causal."""
        return x + self.conv(self.norm(x))

    def init_cache(self, batch: int, max_len: int) -> jax.Array:
        """The last ``k − 1`` normalized inputs, ``[batch, k − 1, d_model]`` zeros (the causal zero padding);
        ``max_len`` is unused (the buffer rolls)."""
        k = self.conv.kernel_size[0]
        return jnp.zeros((batch, k - 1, self.conv.in_features), self.conv.kernel[...].dtype)

    def decode(self, x_t: jax.Array, cache: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One step ``x_t [B, 1, d_model] -> [B, 1, d_model]``: the convolution over the buffer and ``LN(x_t)``,
        equal to ``self(x)`` at the token's position; the buffer drops its oldest token."""
        return self.prefill(x_t, cache)

    def prefill(self, x: jax.Array, cache: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``x [B, T, d_model]`` after the buffered tokens, equal to ``T`` calls of ``decode``; the buffer keeps
        the last ``k − 1`` normalized inputs."""
        window = jnp.concatenate([cache, self.norm(x).astype(cache.dtype)], axis=1)
        return x + self.conv(window)[:, -x.shape[1]:], window[:, window.shape[1] - cache.shape[1]:]


def make_block(config: ModelConfig, layer_idx: int, rngs: nnx.Rngs) -> nnx.Module:
    """Residual block ``layer_idx`` of a model: ``[B, T, d_model] -> [B, T, d_model]``, causal."""
    d, heads, mlp_dim = config.d_model, config.num_heads, config.mlp_ratio * config.d_model
    if config.mixer.startswith(LAYER_PREFIX):
        spec = layer_spec(config.mixer[len(LAYER_PREFIX):])
        return LayerBlock(LAYERS[spec.name](**layer_kwargs(spec, config), rngs=rngs), d, mlp_dim=mlp_dim, rngs=rngs)
    if config.mixer == "transnormer":
        return ajnn.BLOCKS["transnormer"](d, heads, layer_idx=layer_idx, num_layers=config.num_layers, rngs=rngs,
                                          **config.mixer_options)
    if config.mixer == "based":
        return ajnn.BLOCKS["based"](d, heads, mlp_dim=mlp_dim or None, rope=RoPE() if config.rope else None, rngs=rngs,
                                    **config.mixer_options)
    if config.mixer in ajnn.BLOCKS:
        return ajnn.BLOCKS[config.mixer](d, heads, rngs=rngs, **config.mixer_options)
    return AttentionBlock(d, heads, mechanism=config.mechanism(), mlp_dim=mlp_dim, rope=config.rope, rngs=rngs,
                          head_dim=config.head_dim)


class LMCache(NamedTuple):
    """What ``LanguageModel.decode`` keeps between steps: each block's cache (``blocks``) and each
    ``ShortConv``'s buffer (``convs``, empty without short convolutions)."""

    blocks: tuple
    convs: tuple


class LanguageModel(nnx.Module):
    """Causal LM: ``logits = head(LN(block_L(... block_1(embed(tokens)))))``.

    With ``config.short_conv``, a ``ShortConv`` sublayer runs before each block.
    The embedding is initialized with standard deviation ``1/√d_model`` so that, tied, initial
    logits have unit scale. ``rngs`` only initializes parameters (the model has no dropout).
    ``init_cache``/``decode`` run it token by token (the protocol of ``attnjax.inference.generate``).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d = config.d_model
        self.embed = nnx.Embed(config.vocab_size, d, embedding_init=nnx.initializers.normal(d ** -0.5), rngs=rngs)
        self.convs = nnx.List([ShortConv(d, config.short_conv, rngs=rngs) for _ in range(config.num_layers)]
                              if config.short_conv else [])
        self.blocks = nnx.List([make_block(config, i, rngs) for i in range(config.num_layers)])
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.head = None if config.tie_embeddings else nnx.Linear(d, config.vocab_size, use_bias=False, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """``tokens [B, T]`` int -> float32 ``logits [B, T, vocab_size]`` (position ``t`` predicts ``t + 1``)."""
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an int array [B, T], got {tokens.dtype} {tokens.shape}")
        h = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            h = block(self.convs[i](h) if self.convs else h)
        return self._logits(h)

    def _logits(self, h: jax.Array) -> jax.Array:
        h = self.norm(h)
        logits = self.embed.attend(h) if self.head is None else self.head(h)
        return logits.astype(jnp.float32)

    def init_cache(self, batch: int, max_len: int) -> LMCache:
        """An empty ``LMCache`` for ``decode`` of up to ``max_len`` tokens per sequence.

        ``NotImplementedError`` naming the block when a block has no ``init_cache``/``decode`` (or its
        mixer cannot decode).
        """
        for block in self.blocks:
            if not (hasattr(block, "init_cache") and hasattr(block, "decode")):
                raise NotImplementedError(f"{type(block).__name__} blocks have no init_cache/decode, so this "
                                          f"{type(self).__name__} cannot decode token by token")
        return LMCache(tuple(block.init_cache(batch, max_len) for block in self.blocks),
                       tuple(conv.init_cache(batch, max_len) for conv in self.convs))

    def decode(self, tokens_t: jax.Array, cache: LMCache) -> tuple[jax.Array, LMCache]:
        """One step: ``tokens_t [B, 1]`` int (the token at position ``t``) -> float32 ``logits_t [B, 1, vocab_size]``
        and the cache with position ``t`` added; equal to ``self(tokens)[:, t:t+1]`` for the tokens decoded so far."""
        if tokens_t.ndim != 2 or tokens_t.shape[1] != 1 or not jnp.issubdtype(tokens_t.dtype, jnp.integer):
            raise ValueError(f"tokens_t must be an int array [B, 1], got {tokens_t.dtype} {tokens_t.shape}")
        return self._cached(tokens_t, cache, "decode")

    def prefill(self, tokens: jax.Array, cache: LMCache) -> tuple[jax.Array, LMCache]:
        """``tokens [B, T]`` int at the cache's next ``T`` positions -> float32 ``logits [B, T, vocab_size]`` and
        the cache with them added, in one pass per block: equal to ``T`` calls of ``decode``.
        ``NotImplementedError`` naming the block when a block has no ``prefill`` (decode token by token)."""
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an int array [B, T], got {tokens.dtype} {tokens.shape}")
        for block in self.blocks:
            if not hasattr(block, "prefill"):
                raise NotImplementedError(f"{type(block).__name__} blocks have no prefill: decode token by token")
        return self._cached(tokens, cache, "prefill")

    def _cached(self, tokens: jax.Array, cache: LMCache, method: str) -> tuple[jax.Array, LMCache]:
        h = self.embed(tokens)
        blocks, convs = [], []
        for i, block in enumerate(self.blocks):
            if self.convs:
                h, conv_cache = getattr(self.convs[i], method)(h, cache.convs[i])
                convs.append(conv_cache)
            h, block_cache = getattr(block, method)(h, cache.blocks[i])
            blocks.append(block_cache)
        return self._logits(h), LMCache(tuple(blocks), tuple(convs))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def logits(model: LanguageModel, tokens: jax.Array) -> jax.Array:
    """``model(tokens)`` compiled once per model structure and shape: float32 ``[B, T, vocab_size]``."""
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, jnp.asarray(tokens))


def num_params(model: nnx.Module) -> int:
    """Number of scalars in the model's ``nnx.Param`` leaves."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _cache_size(module: nnx.Module, max_len: int) -> int:
    cache = jax.eval_shape(lambda: module.init_cache(1, max_len))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(cache) if x.ndim > 0)


def decode_state_size(config: ModelConfig, seq_len: int) -> Optional[int]:
    """Floats per sequence that the model keeps to decode token ``seq_len + 1``, summed over blocks.

    Softmax-family mechanisms keep keys and values, ``2 · seq_len · H · D`` per block (it grows);
    feature-map linear attention keeps the state ``S = Σ φ(k_t)ᵀ v_t`` (plus the normalizer column),
    whose size does not depend on ``seq_len``; ``attnjax.nn.BLOCKS`` report their ``init_cache(1, seq_len)``
    (BASED: a linear state and a ``min(window, seq_len)``-token KV buffer). This is the "recurrent state size"
    axis of Zoology (Arora et al. 2023) and BASED (Arora et al. 2024). ``None`` for a mechanism of another kind.
    """
    model = nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0)))
    mechanism = config.mechanism()
    total = 0
    for block in model.blocks:
        if not isinstance(block, AttentionBlock):
            total += _cache_size(block, seq_len)
            continue
        mha = block.attention
        if hasattr(mechanism, "feature_map"):
            q = jax.ShapeDtypeStruct((1, 1, mha.num_heads, mha.head_dim), jnp.float32)
            kv = jax.ShapeDtypeStruct((1, 1, mha.num_kv_heads, mha.head_dim), jnp.float32)
            _, state = jax.eval_shape(lambda q, k, v: linear_attention(
                q, k, v, feature_map=mechanism.feature_map, normalize=mechanism.normalize, return_state=True),
                q, kv, kv)
            total += int(np.prod(state.shape))
        elif mechanism.family == "softmax":
            total += 2 * seq_len * mha.num_kv_heads * mha.head_dim
        else:
            return None
    return total
