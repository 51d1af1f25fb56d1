"""Whole-model capture: the q and k of every attention layer of an ``attnjax.nn`` model, in one call.

``capture_attention(model, x, mask=masks.Causal())`` runs the model once and returns its outputs
and one ``AttentionInputs`` per attention call (layer path, ``q [B, T, Hq, D]``, ``k [B, S, Hkv,
D]``, mask, bias, scale), in call order, without editing the model; ``apply_to_layers`` runs any
blockwise tool of ``attnjax.analysis`` (``attention_entropy``, ``sink_scores``, ...) on each, and
``attention_maps`` gives the dense maps at small T.

One mechanism records every layer: a layer calls ``attnjax.nn.capture.sow_attention_inputs`` right before its
softmax attention call, with the q, k, mask, bias and scale of that call. Layers that record:

* ``MultiHeadAttention`` and every layer that runs its ``__call__`` (``SelectiveAttention``: q after the
  temperatures; ``SlidingWindowAttention``: the window mask combined with the call's mask; a position-bias rule
  such as T5's as the entry's ``bias``; the sliding-window half of ``BasedBlock``; ``MultiHeadAttention`` mixers
  inside other blocks such as ``MetaFormerBlock``); ``RCMHA`` (content queries ``q + u``, Transformer-XL's
  position rule as the bias) and ``RelativeAttention`` (Music Transformer, its ``q·E_r`` rule as the bias: the
  tools evaluate rules that read the queries); ``ComplexMultiHeadAttention`` (the transformed ``q̃, k̃`` of
  ``cmha_attention``, its scale); ``Aaren`` (its learned query per head broadcast to every position, mask
  ``Causal``: the prefix softmax it computes); ``EchoAttentionStack`` (the anchor's map once per sublayer, under
  each sublayer's path, since every sublayer applies it) and ``EchoAttention`` (the anchor's ``q_e, k_e`` it is
  given);
* cross-attention: ``BoxRPBCrossAttention`` (Plain-DETR, the BoxRPB rule as the bias), ``CrossViTCrossAttention``
  (one CLS query), ``GlobalLocalCrossAttention`` (the selected queries), ``PairwiseCrossAttention`` (keys
  ``[K_1; K_2]``), ``FITLayer`` / ``FITCrossAttention`` (groups as the batch), ``AttentiveProbe`` (its learned
  queries, one head of width D);
* image modules: ``MOATBlock``, Swin's ``WindowAttention`` (``SwinBlock``, ``MaxViTBlock``), DaViT's
  ``SpatialWindowAttention`` and ``ChannelAttention``, L²ViT's ``LocalWindowAttention``, ``CrossFormerBlock``
  (SDA windows or LDA groups, the DPB table as the bias), ``HaloAttention``, ``StripSelfAttention`` (pixels over
  the reduced grid), ``DANetPositionAttention`` (one head, scale 1). Window and group layers record the windows
  (or groups, or HaloNet's blocks) as the batch axis, ``q, k [B·nW, tokens, heads, D]``, with the padding or
  shifted-region mask and the relative position bias, exactly the call ``attnjax.vision.window`` (or
  ``halo_attention_xla``) makes: the padding queries of partial windows or blocks are rows of the map too. DaViT's channel attention records its channel tokens, ``q, k [B, C_g, G, N]``
  (``C_g`` channels per group attend over ``C_g`` channels, the ``N = H·W`` pixels the head dimension, scale
  ``C_g^-½``): its maps are ``[B, G, C_g, C_g]``, over channels, not positions; so does
  ``DANetChannelAttention``, ``q, k [B, C, 1, H·W]`` (scale 1; ``energy="max_minus"``, the official
  ``softmax(max − A·Aᵀ) = softmax(−A·Aᵀ)``, records ``q = −A``). ``CrissCrossAttention`` (and each of the R loops
  of ``RecurrentCrissCrossAttention``) records ``q, k`` over all ``H·W`` pixels with
  ``masks.Explicit(criss_cross_mask(H, W))`` (row and column, the pixel itself once, as the layer counts it),
  scale 1; ``PartialSelfAttention`` (PAT_sf, and ``PATBlock(mixer="self")``) its heads over the ``H·W`` positions
  of the attended channels with the iRPE bias;
* Titans: ``TitansMAG`` (queries of x, keys of the persistent-token prefix ‖ x, the sliding-window-or-prefix
  mask), ``TitansMAL`` (queries of the memory outputs after the prefix, keys of all of them, the sliding window)
  and ``TitansMAC`` (its segments as the batch, ``q [B·N, L, Hq, D]``, ``k [B·N, N_p + 2L, Hkv, D]`` over
  ``[P ‖ h ‖ S]``, ``masks.Explicit`` of its segment mask; the padding queries of a partial last segment are rows
  too); the neural memory inside each records nothing (no attention map) and is covered by the variant.

Refused, clearly: a registered ``attnjax.nn`` module (``attnjax.nn.registry``, any kind) that ran no recording
call, nor has one below it or above it, makes ``capture_attention`` raise ``NotImplementedError`` naming its path,
class and the documented reason from ``REFUSED`` (pass ``uncaptured="ignore"`` to capture the others): the linear
family (maps of ``φ(q)·φ(k)ᵀ`` ratios), gates that scale features (squeeze-excite and the other conv attention
gates), maps that are not one ``q·kᵀ`` softmax (2-simplicial attention, mixtures and routed heads, memories,
k-means assignments), TransNeXt's aggregated attention (learnable tokens added to its softmax weights) and
ConDaFormer (three window layouts, a key-reading position term).
Modules in ``NO_ATTENTION_MAP`` (convolutions, MLPs, norms, embeddings, position-bias makers) and everything
below them hold no attention map and are not asked to record. ``URPEAttention`` (its map is a softmax times a
learned Toeplitz matrix, not row-stochastic) and sequence-parallel layers refuse by themselves while capturing;
decoding steps (``decode``) record nothing. Stacks of layers run by ``nnx.scan``/``nnx.vmap`` are not supported
(untested).

Under jit, capture inside an ``nnx.jit`` function that takes the model as an argument (the capture
flag is read while tracing; a ``jax.jit`` function that closes over the model cannot record into it
and raises flax's ``TraceContextError``)::

    @nnx.jit
    def entropies(model, x):
        _, captured = capture_attention(model, x, mask=masks.Causal())
        return apply_to_layers(attention_entropy, captured)

``AttentionInputs`` is a pytree (arrays, masks and biases as leaves, path and scale static), so the captured
list itself can also be returned from ``nnx.jit``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.analysis.blockwise import dense_log_probabilities
from attnjax.nn.capture import AttentionInputs, capture_attention_state
from attnjax.nn.registry import modules

RECORDING_KINDS = ("layer", "block", "image", "other")
"""Registry kinds whose modules must record (or sit under or over one that does) for a capture to be complete,
unless their class is in ``NO_ATTENTION_MAP``."""

NO_ATTENTION_MAP = {
    "MBConv": "an inverted-residual convolution block (its squeeze-excite is a channel gate of the convolution)",
    "ConvPosEnc": "a depth-wise convolution (DaViT's position encoding)",
    "LocalConcentration": "depth-wise convolutions (L²ViT's local concentration)",
    "ConvGLU": "a convolutional GLU (TransNeXt's channel mixer)",
    "FFNetChannelMixer": "a convolutional channel mixer",
    "TransformerMLP": "an MLP",
    "SGLU": "a gated MLP",
    "LearnedPositionEmbedding": "a position embedding",
    "BaseConv": "a gated short convolution (Zoology's BaseConv)",
    "BaseConvBlock": "a gated short convolution (Zoology's BaseConv) and an MLP",
    "SparsifinerPredictor": "a low-rank predictor of which keys each query keeps (its scores are not a value average)",
    "LRPE": "a position encoding (rotations of q and k)",
    "T5RelativeBias": "a position-bias rule (recorded as the bias of the layer that uses it)",
    "DynamicPositionBias": "a position-bias MLP (recorded as the bias of the layer that uses it)",
    "BoxRPBMLP": "a position-bias MLP (recorded as the bias of the layer that uses it)",
    "CausalDepthwiseConv": "a causal depth-wise convolution",
    "CrossScaleEmbedding": "a patch embedding (convolutions)",
    "LocalStructureEnhancement": "convolutions (ConDaFormer's local structure enhancement)",
    "RepBatchNorm": "a normalization",
    "ProgressiveRepBatchNorm": "a normalization",
    "AttnGate": "a gate that predicts another layer's block attention, not a layer's attention",
    "GatedAttentionLogits": "the logits of an attention-pooling score network (no softmax)",
    "KMaXMaskHead": "cluster-pixel mask logits (no softmax)",
}
"""Registered classes (by name) that hold no attention map: they and the modules below them are not asked to
record. Values say what they are."""

LINEAR = "linear attention: its map is a ratio of feature-map products φ(q)·φ(k)ᵀ, not a softmax of q·kᵀ"
GATE = "a gate: it scales features by weights computed from pooled or convolved features, no query-key softmax map"
TRANSNEXT = ("TransNeXt's aggregated attention: its softmax A over each pixel's k×k window and the pooled keys "
             "(logits (q̂ + QE)·softplus(t)·log N·k̂ plus window and pooled biases) is one masked softmax, but "
             "the weights it applies to the window values are A + q̂·T + b_T (learnable tokens), not that map nor "
             "row-stochastic; not wired: q̂, k̂ and the biases are formed inside aggregated_attention")
REFUSED = {
    # linear family
    "FlowAttention": LINEAR, "TransNormerAttention": LINEAR, "TransNormerBlock": LINEAR,
    "BasedLinearAttention": LINEAR, "KernelizedRPEAttention": LINEAR, "LinearGlobalAttention": LINEAR,
    "L2ViTBlock": LINEAR + " (the attention='global' block; the local block records)",
    "SimplifiedLinearAttention": LINEAR, "SLABBlock": LINEAR, "RALAttention": LINEAR, "RAVLTBlock": LINEAR,
    "InLineAttention": LINEAR, "ScatterFormerLayer": LINEAR + " (scattered within voxel windows)",
    # gates
    "SqueezeExcite": GATE, "SpatialSqueezeExcite": GATE, "ConcurrentSqueezeExcite": GATE,
    "PolarizedSelfAttention": GATE, "EfficientLocalAttention": GATE, "LargeKernelAttention": GATE,
    "VANSpatialAttention": GATE, "FocalModulation": GATE, "PartialChannelAttention": GATE,
    "PartialSpatialAttention": GATE, "SentenceAttentionBlock": GATE, "DomainConditionedAttention": GATE,
    "FFNifiedAttention": "FFNified attention: depth-wise convolutions and GELU in place of q·kᵀ and softmax",
    "FFNetBlock": "FFNified attention: depth-wise convolutions and GELU in place of q·kᵀ and softmax",
    "MetaFormerBlock": "a token mixer that is not softmax attention (pooling, ...); with an attention mixer it "
                       "records",
    # not one q·kᵀ softmax
    "SimplicialAttention": "2-simplicial attention: a softmax over key pairs of a trilinear form, not q·kᵀ",
    "BAMAttention": "a mixture of expert attention maps weighted by a router",
    "MoHAttention": "routed heads weighted per token (mixture of heads)",
    "SelectiveMultiHeadAttention": "routed expert heads (union of experts)",
    "GINAttention": "a graph network over the attention matrix (GIN aggregation and MLPs), not a value average",
    "GraphMoE": "a mixture of experts routed over an attention graph",
    "GraphMoEBlock": "a mixture of experts routed over an attention graph",
    "LowRankAttention": "a softmax of tanh((p·c)(q·x)) pooling scores with a global context, not q·kᵀ",
    "GPSA": "a gated sum of a content softmax and a positional softmax",
    "ConViTBlock": "GPSA: a gated sum of a content softmax and a positional softmax",
    "PolylinePathAttention": "the mean of two softmax maps over different path masks",
    "AgentAttention": "two chained softmax maps through agent tokens",
    "KMeansCrossAttention": "a k-means assignment (argmax over clusters), not a softmax",
    "AttentionMILPooling": "attention pooling: a softmax of score-network logits, not q·kᵀ",
    "PointerAttention": "additive attention vᵀtanh(W1 e + W2 d) whose log-softmax over the inputs is the output, "
                        "not q·kᵀ",
    "ACMILPooling": "several masked attention-pooling branches of score-network logits, not q·kᵀ",
    "URPEAttention": "its map softmax(q·kᵀ/√D + B) ⊙ C is a softmax times a learned Toeplitz matrix, not "
                     "row-stochastic",
    "PMIMemory": "a memory: competitive top-k writes and several reads, not one softmax",
    "RAT": "chunk attention merged with a per-token recurrent state (the own state is a per-query key)",
    "NeuralMemoryLayer": "a neural memory read M_t(q_t), no attention map",
    # content-routed sparse attention: the map is a softmax over each query's selected keys, not over all keys
    "RoutingAttention": "softmax within each query's routing cluster (and local windows), not over all keys",
    "DynamicMaskAttention": "softmax over each head's top-k keys with a learned per-key bias, not over all keys",
    "SparsifinerAttention": "softmax over each query's predicted top-k keys, not over all keys",
    "SptAttention": "softmax over each query's top-L keys estimated from product-quantization codes",
    # softmax maps not expressible as one entry, or not wired
    "PATBlock": "with mixer='channel', PAT_ch, a gate of partial channels, no query-key softmax map (with mixer='self' "
                "its PartialSelfAttention records; a PAT_sp gate at the end of its MLP, spatial=True, is refused "
                "by itself)",
    "AggregatedAttention": TRANSNEXT, "TransNeXtBlock": TRANSNEXT,
    "ConDaFormerBlock": "three head groups, each over the w×w windows of another plane orientation (xy, xz, yz: "
                        "three window layouts, so no one [B, T, H, D] entry per call), and logits with the "
                        "contextual position term k_j·Σ Tk[Δ], a bias that reads the keys (a Bias rule reads only "
                        "queries); the values are shifted per offset too (v_j + Σ Tv[Δ])",
}
"""Why a registered class (by name) records nothing, for the ``NotImplementedError`` of ``capture_attention``.
Classes that record in some configurations (``L2ViTBlock``, ``MetaFormerBlock``) are listed for the others."""

UNCAPTURED = ("raise", "ignore")
"""What ``capture_attention`` does about registered attention modules that recorded nothing."""


def _root(model: nnx.Module | Callable) -> nnx.Module:
    return model.__self__ if hasattr(model, "__self__") and isinstance(model.__self__, nnx.Module) else model


def uncaptured_modules(model: nnx.Module | Callable, recorded: Sequence[tuple]) -> list[tuple[tuple, str]]:
    """``(path, class name)`` of every module of ``model`` whose class is registered in ``attnjax.nn`` with a
    kind in ``RECORDING_KINDS`` and that recorded nothing: no module at, below or above its path is in
    ``recorded`` (the paths of the modules that sowed). Modules of a ``NO_ATTENTION_MAP`` class and those below
    them are left out. Only the outermost of nested ones is listed."""
    recording = {spec.module for spec in modules() if spec.kind in RECORDING_KINDS}
    recorded = {tuple(p) for p in recorded}
    found = [(tuple(path), m) for path, m in nnx.iter_modules(_root(model))]
    exempt = [path for path, m in found if type(m).__name__ in NO_ATTENTION_MAP]

    def related(path: tuple, other: tuple) -> bool:
        n = min(len(path), len(other))
        return path[:n] == other[:n]

    silent = [(path, type(m).__name__) for path, m in found
              if type(m) in recording and not any(path[:len(e)] == e for e in exempt)
              and not any(related(path, r) for r in recorded)]
    return [(path, name) for path, name in silent
            if not any(other != path and path[:len(other)] == other for other, _ in silent)]


def capture_attention(model: nnx.Module | Callable, *args: Any, uncaptured: str = "raise",
                      **kwargs: Any) -> tuple[Any, list[AttentionInputs]]:
    """Run ``model(*args, **kwargs)`` and capture what each of its attention layers attended with.

    Args:
      model: an ``nnx.Module`` (called) or a bound method of one (e.g. ``model.encode``).
      *args, **kwargs: the call's arguments.
      uncaptured: "raise" (default): ``NotImplementedError`` naming the registered attention modules of the
        model that recorded nothing (``uncaptured_modules``); "ignore": capture the others.

    Returns:
      ``(outputs, captured)``: the call's outputs, and one ``AttentionInputs`` per attention call in call
      order (a layer called twice appears twice, with the same ``path``). The model's state is unchanged.
    """
    if uncaptured not in UNCAPTURED:
        raise ValueError(f"uncaptured must be one of {UNCAPTURED}, got {uncaptured!r}")
    outputs, state = capture_attention_state(model, *args, **kwargs)
    entries = [(tuple(path[:-1]), c) for path, variable in nnx.to_flat_state(state) for c in variable.get_value()]
    if uncaptured == "raise":
        silent = uncaptured_modules(model, [path for path, _ in entries])
        if silent:
            names = "; ".join(f"{'/'.join(map(str, path)) or '<model>'} ({name}): "
                              f"{REFUSED.get(name, 'not wired to attnjax.nn.capture.sow_attention_inputs')}"
                              for path, name in silent)
            raise NotImplementedError(
                f"capture_attention records softmax attention through q·kᵀ; these attention modules recorded "
                f"nothing (each with the reason why): {names}. Pass uncaptured='ignore' to capture the others")
    captured = [dataclasses.replace(c, path=path) for path, c in entries]
    return outputs, sorted(captured, key=lambda c: c.index)


def apply_to_layers(tool: Callable[..., Any], captured: Sequence[AttentionInputs], **kwargs: Any) -> list[Any]:
    """``[tool(c.q, c.k, mask=c.mask, scale=c.scale, bias=c.bias, **kwargs) for c in captured]`` (``bias`` only
    where the layer had one).

    ``tool`` is any blockwise tool with ``attnjax.attention``'s ``mask``/``scale``/``bias`` arguments
    (``attention_entropy``, ``sink_scores``, ``attention_received``, ``windowed_attention_distance``, ...);
    ``kwargs`` go to every call (e.g. ``block_q=512``). Results keep each layer's head count, so they
    come as a list in the order of ``captured``.

    Raises:
      ValueError: a layer's mechanism is not "softmax" (the tools compute softmax maps); filter the list,
        e.g. ``[c for c in captured if c.mechanism == "softmax"]``.
    """
    for c in captured:
        if not isinstance(c, AttentionInputs):
            raise TypeError(f"captured must hold AttentionInputs (from capture_attention), got {type(c).__name__}")
        if c.mechanism != "softmax":
            raise ValueError(f"layer {c.path} (call {c.index}) uses mechanism {c.mechanism!r}; the analysis tools "
                             "compute softmax maps: filter captured to mechanism == 'softmax'")
    return [tool(c.q, c.k, mask=c.mask, scale=c.scale, **({} if c.bias is None else {"bias": c.bias}), **kwargs)
            for c in captured]


def attention_maps(captured: Sequence[AttentionInputs]) -> list[jax.Array]:
    """The dense softmax map ``[B, Hq, T, S]`` (float32, 0 where masked) of each captured layer: small T only."""
    return [jnp.exp(log_p) for log_p in apply_to_layers(dense_log_probabilities, captured)]


__all__ = ["AttentionInputs", "RECORDING_KINDS", "NO_ATTENTION_MAP", "REFUSED", "UNCAPTURED", "capture_attention",
           "uncaptured_modules", "apply_to_layers", "attention_maps"]
