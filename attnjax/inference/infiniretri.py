"""InfiniRetri: read a long input in chunks and keep the tokens that the question's attention selects.

Ye, Wang & Wang, "Infinite Retrieval: Attention Enhanced LLMs in Long-Context Processing" (arXiv:2502.12962,
2025), the method's four stages (chunk, merge, inference, cache; its workflow figure). The input is split into
chunks that fit the model's window (*chunk*). Each step feeds the model the tokens retained so far, the next chunk
and the question (*merge*); the question tokens' last-layer attention (the softmax attention matrix, question
rows, context columns), summed over heads, scores every context token, cached and new (*inference*: "retrieval
in attention"); a 1-D convolution with an all-ones kernel of width ``pool_kernel`` turns token scores into phrase
scores (the paper's ``phrase_token_num``), the convolved rows are summed over the question tokens, and the
top-``K`` context tokens are selected. Between chunks the cache holds token IDs, not KV tensors (*cache*): the
retained text is re-read with fresh, contiguous positions at the next step, and only the ids (and here their
original positions) are carried. The paper's section and equation numbers could not be checked against its
text here, so the stages are cited by name.

Where the text leaves details open this follows code by the first author found by code search (a
``compute_phrase_scores`` function and a ``compress`` function; their repository could not be identified here;
the released ``infini_retri`` package's ``InfiniRetri`` wrapper passes ``answer_length``, default 8, as
``phrase_token_num``): the attention is the last layer's, summed over heads; the convolution is
``scipy.signal.convolve2d(rows, ones((1, p)), mode="same", fillvalue=0)`` over the context columns only, so a
window of even width ``p`` covers ``p // 2`` tokens on the left and ``(p − 1) // 2`` on the right; the top-``K``
are taken from the convolved scores. That code optionally weights each question row by the square of its
attention mass on the question tokens (``question2context *= question_weights`` twice, with ``question_weights``
the row sums over the question columns; always in ``compute_phrase_scores``, under ``score_type == 2`` in
``compress``): ``question_weighting=True`` here. Deviations: (1) the paper caches the whole *sentences* that
contain a top-``K`` token (sentence-level token IDs); sentence segmentation needs a tokenizer and per-sequence
variable-length caches, so ``infiniretri_read`` keeps exactly the top-``K`` tokens (fixed shapes), and chunks are
whatever the caller passes (the paper aligns them to sentences); (2) the question is the last ``Tq`` tokens of
each step's input (the authors' prompt template puts a few template tokens after it); (3) ties go to the earlier
position (``jax.lax.top_k``; the authors' ``np.argsort`` picks the later one).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from attnjax import masks
from attnjax.blocked.scores import allowed, raw_logits, score_spec, to_groups
from attnjax.checks import check_positive, check_qk, describe
from attnjax.inference.layer_checks import check_decoding_layer
from attnjax.nn.attention import MultiHeadAttention

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check_pool_kernel(pool_kernel: int) -> None:
    if not isinstance(pool_kernel, int) or isinstance(pool_kernel, bool):
        raise TypeError(f"pool_kernel must be a positive int, got {describe(pool_kernel)}")
    check_positive(pool_kernel=pool_kernel)


def _check_keep(keep: int) -> None:
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        raise ValueError(f"keep must be a positive int (tokens retained per sequence), got {describe(keep)}")


def infiniretri_scores(q_question: jax.Array, k: jax.Array, *, pool_kernel: int = 8,
                       question_weighting: bool = False, scale: Optional[float] = None) -> jax.Array:
    """InfiniRetri's phrase scores of the context tokens from the question's attention (Ye et al. 2025, "inference").

    The step's input is ``S`` tokens: ``C = S − Tq`` context tokens (retained + new chunk) followed by the
    ``Tq`` question tokens. ``A_h = softmax(scale·q_h·k_hᵀ)`` over all ``S`` keys for the question's queries
    (question query ``i`` sees keys ``<= C + i``); the score of context token ``j < C`` is
    ``s_j = Σ_i Σ_h Σ_{t = j − ⌊p/2⌋}^{j + ⌊(p−1)/2⌋} A_h[i, t]`` (``p = pool_kernel``; ``t`` outside
    ``[0, C)`` adds zero): the all-ones 1-D convolution of the question→context rows, summed over question
    tokens and query heads. With ``question_weighting`` (the authors' code, see the module docstring) question
    row ``i`` is first multiplied by ``w_i²``, ``w_i = Σ_h Σ_{t >= C} A_h[i, t]`` (its attention on the question).

    Args:
      q_question: ``[B, Tq, Hq, D]`` queries (RoPE applied) of the question tokens, the last ``Tq`` of the input
        (in the paper, the last layer's).
      k: ``[B, S, Hkv, D]`` keys (RoPE applied) of the whole input, context then question; ``Hq % Hkv == 0``
        (query head ``h`` reads KV head ``h // (Hq / Hkv)``), ``Tq < S``.
      pool_kernel: convolution width ``p`` (the paper's ``phrase_token_num``; 1: token scores). The default 8
        is the authors' package default (``answer_length``).
      question_weighting: weight question rows by their squared attention mass on the question (default off).
      scale: logit scale, default ``1/√D``.
    Returns:
      float32 ``[B, S − Tq]``. Costs ``O(B·Hq·Tq·S)`` time and memory: one ``[Tq, S]`` map per head, never
      ``[S, S]``.
    """
    check_qk(q_question, k)
    Tq, S, Hkv = q_question.shape[1], k.shape[1], k.shape[2]
    if Tq >= S:
        raise ValueError(f"k [B, S, Hkv, D] holds the context then the question, so the question length Tq of "
                         f"q_question [B, Tq, Hq, D] must be < S; got q_question {list(q_question.shape)}, k "
                         f"{list(k.shape)}")
    _check_pool_kernel(pool_kernel)
    if not isinstance(question_weighting, bool):
        raise TypeError(f"question_weighting must be a bool, got {describe(question_weighting)}")
    spec = score_spec(q_question, k, scale)
    q_idx, kv_idx = jnp.arange(Tq), jnp.arange(S)
    logits = raw_logits(to_groups(q_question.transpose(0, 2, 1, 3), Hkv), k.transpose(0, 2, 1, 3), q_idx, kv_idx,
                        None, spec)                                             # [B, Hkv, G, Tq, S]
    logits = jnp.where(allowed(masks.Causal(), q_idx, kv_idx, spec), logits, -jnp.inf)
    rows = jax.nn.softmax(logits, axis=-1).sum(axis=(1, 2))                    # [B, Tq, S], summed over heads
    if question_weighting:
        rows = rows * jnp.square(rows[:, :, S - Tq:].sum(axis=-1, keepdims=True))
    column = rows[:, :, :S - Tq].sum(axis=1)                                     # [B, C]
    padded = jnp.pad(column, ((0, 0), (pool_kernel // 2, (pool_kernel - 1) // 2)))
    return jax.lax.reduce_window(padded, 0.0, jax.lax.add, (1, pool_kernel), (1, 1), "VALID")


def _top_positions(scores: jax.Array, keep: int) -> jax.Array:
    return jnp.sort(jax.lax.top_k(scores, keep)[1], axis=-1).astype(jnp.int32)


def infiniretri_select(q_question: jax.Array, k: jax.Array, *, keep: int, pool_kernel: int = 8,
                       question_weighting: bool = False, scale: Optional[float] = None) -> jax.Array:
    """The context tokens InfiniRetri keeps: the top-``keep`` of ``infiniretri_scores`` (Ye et al. 2025).

    One selection per sequence, shared by all heads (the scores are summed over heads, as the paper's token
    selection is); ties go to the earlier position.

    Args:
      q_question, k, pool_kernel, question_weighting, scale: as ``infiniretri_scores``.
      keep: tokens kept, ``1 <= keep <= S − Tq``.
    Returns:
      int32 ``[B, keep]``: context positions in ``[0, S − Tq)``, ascending (the text order is kept).
    """
    _check_keep(keep)
    if keep > k.shape[1] - q_question.shape[1]:
        raise ValueError(f"keep ({keep}) must be <= the context length S - Tq = {k.shape[1]} - "
                         f"{q_question.shape[1]} of k {list(k.shape)} and q_question {list(q_question.shape)}")
    scores = infiniretri_scores(q_question, k, pool_kernel=pool_kernel, question_weighting=question_weighting,
                                scale=scale)
    return _top_positions(scores, keep)


def _check_ids(name: str, x: object, batch: Optional[int]) -> jax.Array:
    x = jnp.asarray(x) if hasattr(x, "shape") else x
    if not hasattr(x, "ndim") or x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.integer) or x.shape[1] < 1:
        raise ValueError(f"{name} must be int token ids [B, n] with n >= 1, got {describe(x)}")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"{name} must have batch {batch} (that of question), got {describe(x)}")
    return x


def infiniretri_read(attention_scores: ScoreFn, chunks: Sequence[jax.Array], question: jax.Array, *,
                     keep: int) -> tuple[jax.Array, jax.Array]:
    """Read ``chunks`` in order and keep the ``keep`` tokens the question attends to (Ye et al. 2025).

    Step ``c``: the context is the retained tokens (in text order) followed by chunk ``c``;
    ``attention_scores(context, question)`` scores every context token, and the top-``min(keep, len(context))``
    (ties to the earlier) are retained, with their positions in the original input (chunk ``c``'s tokens sit at
    ``Σ_{c' < c} n_{c'} + arange(n_c)``). The cache between chunks is token ids and positions only, so the caller's
    model re-reads the retained text each step, as the paper's sentence-id cache is re-read.

    The protocol: ``attention_scores(context [B, C] int, question [B, Tq] int) -> [B, C]`` float scores, higher
    is kept, e.g. ``infiniretri_layer_scorer(layer, embed)`` (the question's last-layer attention,
    ``infiniretri_scores``). Python loop over chunks; each step's call sees ``C <= keep + n_c`` tokens.

    Args:
      attention_scores: the scoring function above.
      chunks: non-empty sequence of int ``[B, n_c]`` token ids, the input in order (lengths may differ).
      question: int ``[B, Tq]`` token ids.
      keep: tokens retained per sequence (``>= 1``); with ``keep`` at least the input length, everything is.
    Returns:
      ``(tokens int [B, K], positions int32 [B, K])`` with ``K = min(keep, Σ n_c)``: the retained token ids
      and their positions in the input, ascending.
    """
    if not callable(attention_scores):
        raise TypeError(f"attention_scores must be callable (context, question) -> scores, got "
                        f"{type(attention_scores).__name__}")
    _check_keep(keep)
    question = _check_ids("question", question, None)
    B = question.shape[0]
    if isinstance(chunks, (str, bytes)) or not isinstance(chunks, Sequence) or len(chunks) == 0:
        raise ValueError(f"chunks must be a non-empty sequence of int [B, n] arrays, got {describe(chunks)}")
    chunks = [_check_ids(f"chunks[{c}]", chunk, B) for c, chunk in enumerate(chunks)]
    tokens = jnp.zeros((B, 0), chunks[0].dtype)
    positions = jnp.zeros((B, 0), jnp.int32)
    offset = 0
    for c, chunk in enumerate(chunks):
        n = chunk.shape[1]
        context = jnp.concatenate([tokens, chunk.astype(tokens.dtype)], axis=1)
        context_positions = jnp.concatenate(
            [positions, jnp.broadcast_to(offset + jnp.arange(n, dtype=jnp.int32), (B, n))], axis=1)
        offset += n
        scores = jnp.asarray(attention_scores(context, question))
        if scores.shape != context.shape:
            raise ValueError(f"attention_scores must return [B, C] = {list(context.shape)} scores for the context "
                             f"of chunk {c}, got {describe(scores)}")
        idx = _top_positions(scores, min(keep, context.shape[1]))
        tokens = jnp.take_along_axis(context, idx, axis=1)
        positions = jnp.take_along_axis(context_positions, idx, axis=1)
    return tokens, positions


def infiniretri_layer_scorer(layer: MultiHeadAttention, embed: Callable[[jax.Array], jax.Array], *,
                             pool_kernel: int = 8, question_weighting: bool = False) -> ScoreFn:
    """An ``attention_scores`` function for ``infiniretri_read`` from an ``attnjax.nn`` attention layer.

    ``x = embed(concat(context, question))`` (``[B, C + Tq, d_model]``: the input of the layer whose attention
    scores, the last layer in the paper); ``q = layer.query(x)`` (through the layer's ``scale_qv`` hook),
    ``k = layer.key(x)``, RoPE (if the layer has
    it) at the fresh positions ``arange(C + Tq)`` (the retained text is re-read), then
    ``infiniretri_scores(q[:, C:], k, pool_kernel=pool_kernel, question_weighting=question_weighting)``.

    Args:
      layer: a softmax ``MultiHeadAttention`` (``check_decoding_layer``: RoPE or no positions).
      embed: token ids ``[B, L]`` -> ``[B, L, d_model]`` hidden states entering ``layer``.
      pool_kernel, question_weighting: as ``infiniretri_scores``.
    Returns:
      ``(context [B, C], question [B, Tq]) -> float32 [B, C]``.
    """
    check_decoding_layer(layer, "infiniretri_layer_scorer")
    _check_pool_kernel(pool_kernel)

    def attention_scores(context: jax.Array, question: jax.Array) -> jax.Array:
        ids = jnp.concatenate([context, question.astype(context.dtype)], axis=1)
        x = embed(ids)
        if getattr(x, "shape", None) != ids.shape + (layer.d_model,):
            raise ValueError(f"embed must map ids [B, L] = {list(ids.shape)} to [B, L, d_model] = "
                             f"{list(ids.shape) + [layer.d_model]}, got {describe(x)}")
        positions = jnp.arange(x.shape[1])
        q, k = layer.query(x), layer.key(x)
        q, _ = layer.scale_qv(q, layer.value(x), positions)
        if layer.rope is not None:
            q, k = layer.rope(q, positions), layer.rope(k, positions)
        return infiniretri_scores(q[:, context.shape[1]:], k, pool_kernel=pool_kernel,
                                  question_weighting=question_weighting)

    return attention_scores


__all__ = ["ScoreFn", "infiniretri_scores", "infiniretri_select", "infiniretri_read", "infiniretri_layer_scorer"]
