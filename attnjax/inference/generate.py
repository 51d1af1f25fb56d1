"""Autoregressive generation from a causal language model: greedy or sampled, with its decode cache.

The model protocol (any ``nnx.Module`` that has it works; ``experiments.lib.model.LanguageModel`` does):

- ``model.init_cache(batch, max_len) -> cache``: an empty cache (any pytree) for up to ``max_len`` tokens;
- ``model.decode(tokens_t, cache) -> (logits_t, cache)``: ``tokens_t [B, 1]`` int, the token at the next
  position ``t`` -> ``logits_t [B, 1, V]`` (the distribution of token ``t + 1``) and the cache with ``t`` added;
  equal, position by position, to the parallel ``model(tokens)[:, t:t+1]``;
- optionally ``model.prefill(tokens, cache) -> (logits, cache)``: ``tokens [B, T]`` at the next ``T`` positions in
  one pass, equal to ``T`` calls of ``decode`` (``NotImplementedError`` when the model cannot);
- ``model(tokens [B, T]) -> logits [B, T, V]``, causal (only ``generate_by_recomputing`` needs it).

``generate`` prefills the cache with the prompt in one ``prefill`` pass where the model has one, else by decoding
it token by token (a ``lax.scan``), then draws the new tokens in a ``lax.scan`` of decode steps, all in one
``nnx.jit`` program (compiled once per model structure, shapes and sampling options). A step costs one token's
pass against the cache, against a full forward over the sequence for ``generate_by_recomputing``.

Sampling (``sample_token``): ``temperature = 0`` is greedy (argmax); otherwise the logits are divided by the
temperature, cut to the ``top_k`` largest (Fan et al. 2018, "Hierarchical Neural Story Generation") and to the
smallest set of tokens whose probability reaches ``top_p`` (nucleus sampling, Holtzman et al. 2020, "The Curious
Case of Neural Text Degeneration", Sec. 3.1), and a token is drawn with ``jax.random.categorical``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.checks import check_positive, describe


def sample_token(logits: jax.Array, rng: Optional[jax.Array], *, temperature: float = 0.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None) -> jax.Array:
    """One token per row of ``logits [B, V]`` -> int32 ``[B]``.

    ``temperature == 0``: ``argmax`` (``rng``, ``top_k``, ``top_p`` unused). Else ``ℓ / temperature``; with
    ``top_k`` every logit below the ``k``-th largest is dropped; with ``top_p`` the tokens are sorted by
    probability and those after the first whose cumulative probability reaches ``top_p`` are dropped (the most
    likely token always stays); then ``jax.random.categorical(rng, ℓ)``. Ties at the cut stay in.
    """
    _check_sampling(temperature, top_k, top_p, rng, logits.shape[-1])
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        cut = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cut, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(model: nnx.Module, prompt: jax.Array, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, rng: Optional[jax.Array] = None,
             max_len: Optional[int] = None) -> jax.Array:
    """``prompt [B, P]`` int -> ``tokens [B, P + max_new_tokens]`` int32: the prompt, then the generated tokens.

    The model follows the protocol in the module docstring. Prefill: the ``P`` prompt tokens go into
    ``model.init_cache(B, max_len)`` by ``model.prefill(prompt, cache) -> (logits [B, P, V], cache)`` when the model
    has it (and it does not raise ``NotImplementedError``), else by ``decode`` one token at a time; then each
    new token is drawn by ``sample_token`` from the last logits (``temperature``, ``top_k``, ``top_p``; step ``i``
    uses ``jax.random.fold_in(rng, i)``) and decoded.
    ``max_len`` (default ``P + max_new_tokens``) is the cache size, at least ``P + max_new_tokens``.
    One ``nnx.jit`` program; greedy generation equals ``generate_by_recomputing`` token for token (up to
    ties in float rounding).
    """
    prompt, max_len = _check_generate(prompt, max_new_tokens, max_len)
    _check_sampling(temperature, top_k, top_p, rng, None)
    if max_new_tokens == 0:
        return prompt
    return _generate(model, prompt, rng, max_new_tokens, max_len, temperature, top_k, top_p)


def generate_by_recomputing(model: nnx.Module, prompt: jax.Array, max_new_tokens: int, *, temperature: float = 0.0,
                            top_k: Optional[int] = None, top_p: Optional[float] = None,
                            rng: Optional[jax.Array] = None) -> jax.Array:
    """The cache-free baseline of ``generate``: each step runs the full parallel ``model(tokens)``.

    The tokens live in a ``[B, P + max_new_tokens]`` buffer (unwritten slots hold 0; the model is causal, so
    they do not change the logits at the last written position, which predict the next token). Same sampling
    (and rng use) as ``generate``; one ``nnx.jit`` program with a ``lax.fori_loop`` over the new tokens, each
    step a forward over all ``P + max_new_tokens`` positions. Returns ``[B, P + max_new_tokens]`` int32.
    """
    prompt, _ = _check_generate(prompt, max_new_tokens, None)
    _check_sampling(temperature, top_k, top_p, rng, None)
    if max_new_tokens == 0:
        return prompt
    return _recompute(model, prompt, rng, max_new_tokens, temperature, top_k, top_p)


@nnx.jit(static_argnames=("max_new_tokens", "max_len", "temperature", "top_k", "top_p"))
def _generate(model, prompt, rng, max_new_tokens, max_len, temperature, top_k, top_p):
    batch = prompt.shape[0]

    def step(cache, token):
        logits, cache = model.decode(token[:, None], cache)
        return cache, logits[:, 0]

    cache = model.init_cache(batch, max_len)
    try:  # one pass over the prompt where the model offers it, else token by token
        prompt_logits, cache = model.prefill(prompt, cache)
        prompt_logits = prompt_logits.swapaxes(0, 1)
    except (AttributeError, NotImplementedError):
        cache, prompt_logits = jax.lax.scan(step, cache, prompt.T)

    def draw(i, logits):
        return sample_token(logits, None if rng is None else jax.random.fold_in(rng, i), temperature=temperature,
                            top_k=top_k, top_p=top_p)

    first = draw(0, prompt_logits[-1])

    def new_token(carry, i):
        cache, token = carry
        cache, logits = step(cache, token)
        nxt = draw(i, logits)
        return (cache, nxt), nxt

    _, rest = jax.lax.scan(new_token, (cache, first), jnp.arange(1, max_new_tokens))
    return jnp.concatenate([prompt, first[:, None], rest.T], axis=1)


@nnx.jit(static_argnames=("max_new_tokens", "temperature", "top_k", "top_p"))
def _recompute(model, prompt, rng, max_new_tokens, temperature, top_k, top_p):
    batch, length = prompt.shape
    tokens = jnp.zeros((batch, length + max_new_tokens), jnp.int32).at[:, :length].set(prompt)

    def body(i, tokens):
        logits = jax.lax.dynamic_index_in_dim(model(tokens), length + i - 1, axis=1, keepdims=False)
        token = sample_token(logits, None if rng is None else jax.random.fold_in(rng, i), temperature=temperature,
                             top_k=top_k, top_p=top_p)
        return jax.lax.dynamic_update_slice(tokens, token[:, None], (0, length + i))

    return jax.lax.fori_loop(0, max_new_tokens, body, tokens)


def _check_generate(prompt, max_new_tokens, max_len):
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer) or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be a non-empty int array [B, P], got {describe(prompt)}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {describe(max_new_tokens)}")
    total = prompt.shape[1] + max_new_tokens
    if max_len is None:
        max_len = total
    check_positive(max_len=max_len)
    if max_len < total:
        raise ValueError(f"max_len={max_len} is shorter than the prompt ({prompt.shape[1]}) plus max_new_tokens "
                         f"({max_new_tokens}) = {total}")
    return prompt.astype(jnp.int32), max_len


def _check_sampling(temperature, top_k, top_p, rng, vocab):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {describe(temperature)}")
    if temperature == 0:
        return
    if rng is None:
        raise ValueError(f"temperature={temperature} samples, so it needs rng (a jax.random key)")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1
                              or (vocab is not None and top_k > vocab)):
        raise ValueError(f"top_k must be None or an int in [1, vocab_size={vocab}], got {describe(top_k)}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {describe(top_p)}")
