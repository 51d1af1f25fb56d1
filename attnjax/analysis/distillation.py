"""Attention distillation: MiniLM's self-attention and value-relation transfer, HASTE's attention alignment.

Both compare a teacher's softmax map with a student's over the same tokens, row by row. The blockwise forms
walk the query tiles with ``attnjax.analysis.blockwise.scan_query_tiles_pair``, which forms the same rows of
both maps side by side, so no ``[T, S]`` map of either model is formed. Per row,

    ``KL_i = Σ_j p^T_ij (log p^T_ij − log p^S_ij)``,  ``CE_i = −Σ_j p^T_ij log p^S_ij = KL_i + H(p^T_i)``.

MiniLM (Wang et al., "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained
Transformers", NeurIPS 2020, sec. 3.1): the student's last self-attention layer mimics the teacher's,

- eq. 7: ``L_AT = 1/(A_h|x|) Σ_a Σ_t KL(A^T_{L,a,t} ‖ A^S_{M,a,t})``, ``A = softmax(QKᵀ/√d_k)`` per head;
- eq. 8: the value relation ``VR = softmax(VVᵀ/√d_k)`` per head (teacher ``d_k``, student ``d'_k``);
- eq. 9: ``L_VR = 1/(A_h|x|) Σ_a Σ_t KL(VR^T_{L,a,t} ‖ VR^S_{M,a,t})``; the objective is ``L_AT + L_VR``.

It needs the same number of heads ``A_h`` in both models (head ``a`` is matched with head ``a``).

HASTE (Wang et al., "REPA Works Until It Doesn't: Early-Stopped, Holistic Alignment Supercharges Diffusion
Training", arXiv:2505.16792, 2025; "Holistic Alignment with Stage-wise Termination for Efficient training"):
phase I adds to the denoising loss an attention alignment (ATTA) term, the token-wise cross-entropy between the
teacher's (DINOv2-B) attention maps and the student's (SiT) in mid-level layers (sec. 2.1, 2.3), and REPA's
feature alignment, the negative cosine similarity between the teacher's patch features and a projection of the
student's hidden states; phase II drops both once a trigger fires at iteration ``τ`` (sec. 2.2, 2.4): a fixed
iteration (sec. 3.2: ``τ`` = 100K for SiT-B/2, 250K for SiT-L/XL on ImageNet 256) or the gradient-angle rule of
App. A.2 (stop when the cosine between the alignment and denoising gradients of one block, averaged over the
timesteps ``t ∈ {0.02, 0.1, 0.5, 0.8}``, falls below ``δ = −0.05``; checked every 10K iterations after 50K).
The details follow the official code (github.com/NUS-HPC-AI-Lab/HASTE, ``loss.py``, ``train.py``,
``modify_dinov2/layers/attention.py``), which agrees with the paper's text: ATTA is the mean over layer pairs,
heads and query rows of ``CE_i``, the teacher map taken over patch tokens only (the class token's rows and
columns removed from the logits before the softmax), the student's first ``H_teacher`` heads aligned, student
blocks 4-7 paired with teacher blocks 8-11 (0-based; Table 16: SiT-L/XL, DiT-XL; SiT-B uses student blocks
2-4), weights ``λ_A = λ_R = 0.5``, termination at step 250k (``L = L_denoise + 0.5·L_ATTA + 0.5·L_REPA`` before
it, ``L_denoise`` after). Verified against the paper's text (sec. 2-3, App. A.2, Table 16) and the official
code.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from attnjax.analysis.blockwise import dense_log_probabilities, scan_query_tiles_pair
from attnjax.bias import Bias
from attnjax.checks import check_scalar, describe
from attnjax.masks import Mask

HASTE_LAYER_PAIRS = ((4, 8), (5, 9), (6, 10), (7, 11))
"""``(student block, teacher block)`` pairs of HASTE's attention alignment, 0-based: SiT-XL/2 blocks 4-7 with
DINOv2-B blocks 8-11 (the official ``loss.py``)."""


def _divergence_terms(log_pt: jax.Array, log_ps: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per row ``KL(p_t ‖ p_s)``, ``−Σ p_t log p_s`` and "the teacher row has mass", with zero gradient
    through entries where either map is 0."""
    both = jnp.isfinite(log_pt) & jnp.isfinite(log_ps)
    lt = jnp.where(both, log_pt, 0.0)
    ls = jnp.where(both, log_ps, 0.0)
    pt = jnp.where(both, jnp.exp(lt), 0.0)
    return (jnp.sum(pt * (lt - ls), axis=-1), -jnp.sum(pt * ls, axis=-1),
            jnp.any(jnp.isfinite(log_pt), axis=-1))


def _pair_rows(q_t, k_t, q_s, k_s, **options) -> tuple[jax.Array, jax.Array, jax.Array]:
    def rows(log_pt, log_ps, q_idx, kv_idx):
        return _divergence_terms(log_pt, log_ps), None

    return scan_query_tiles_pair(q_t, k_t, q_s, k_s, rows, **options)[0]


def _row_mean(values: jax.Array, keep: jax.Array) -> jax.Array:
    count = jnp.sum(keep, dtype=jnp.float32)
    return jnp.where(count > 0, jnp.sum(jnp.where(keep, values, 0.0)) / jnp.maximum(count, 1.0), 0.0)


def attention_kl(q_t: jax.Array, k_t: jax.Array, q_s: jax.Array, k_s: jax.Array, *, mask: Optional[Mask] = None,
                 bias: Optional[Bias | jax.Array] = None, scale: Optional[float] = None,
                 logits_soft_cap: Optional[float] = None, block_q: int = 128) -> jax.Array:
    """``KL(teacher ‖ student)`` of each query's attention distribution, without a ``[T, S]`` map.

    Args:
      q_t, k_t: the teacher's ``[B, T, Hq, Dt]`` and ``[B, S, Hkv_t, Dt]``.
      q_s, k_s: the student's ``[B, T, Hq, Ds]`` and ``[B, S, Hkv_s, Ds]`` (the same ``Hq``: head ``h`` of one
        is compared with head ``h`` of the other).
      mask, bias, scale, logits_soft_cap, block_q: as ``scan_query_tiles_pair``.

    Returns:
      ``[B, Hq, T]`` float32 (0 for a query with no allowed key). Differentiable in all four inputs; wrap the
      teacher's in ``jax.lax.stop_gradient`` when it is frozen.
    """
    return _pair_rows(q_t, k_t, q_s, k_s, mask=mask, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap,
                      block_q=block_q)[0]


def attention_cross_entropy(q_t: jax.Array, k_t: jax.Array, q_s: jax.Array, k_s: jax.Array, *,
                            mask: Optional[Mask] = None, bias: Optional[Bias | jax.Array] = None,
                            scale: Optional[float] = None, logits_soft_cap: Optional[float] = None,
                            block_q: int = 128) -> jax.Array:
    """``−Σ_j p^T_ij log p^S_ij`` per query, ``[B, Hq, T]`` float32, blockwise; arguments as ``attention_kl``
    (the KL plus the teacher's entropy: the same gradient for the student)."""
    return _pair_rows(q_t, k_t, q_s, k_s, mask=mask, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap,
                      block_q=block_q)[1]


def attention_kl_of_maps(teacher: jax.Array, student: jax.Array) -> jax.Array:
    """``KL(teacher ‖ student)`` per row of dense maps ``[..., T, S] -> [..., T]`` (terms with ``p^T = 0``
    are 0; a student 0 where the teacher is not gives ``inf``)."""
    pt, ps = _check_maps(teacher, student, ("teacher", "student"))
    on = pt > 0
    return jnp.sum(jnp.where(on, pt * (jnp.log(jnp.where(on, pt, 1.0)) - jnp.log(jnp.where(on, ps, 1.0))), 0.0),
                   axis=-1)


def attention_cross_entropy_of_maps(teacher: jax.Array, student: jax.Array) -> jax.Array:
    """``−Σ_j p^T_ij log p^S_ij`` per row of dense maps ``[..., T, S] -> [..., T]``."""
    pt, ps = _check_maps(teacher, student, ("teacher", "student"))
    on = pt > 0
    return -jnp.sum(jnp.where(on, pt * jnp.log(jnp.where(on, ps, 1.0)), 0.0), axis=-1)


def _check_maps(a: jax.Array, b: jax.Array, names: tuple[str, str]) -> tuple[jax.Array, jax.Array]:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    if a.ndim < 2 or a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must be maps [..., T, S] of one shape, got {describe(a)} and "
                         f"{describe(b)}")
    return a, b


def _check_same_heads(teacher: jax.Array, student: jax.Array, what: str) -> None:
    if teacher.ndim == 4 and student.ndim == 4 and teacher.shape[2] != student.shape[2]:
        raise ValueError(f"MiniLM matches teacher and student {what} head by head, so they need the same number "
                         f"of heads (A_h): got {teacher.shape[2]} and {student.shape[2]} (teacher "
                         f"{list(teacher.shape)}, student {list(student.shape)}); MiniLMv2's relation "
                         "distillation lifts this")


def minilm_attention_loss(q_t: jax.Array, k_t: jax.Array, q_s: jax.Array, k_s: jax.Array, *,
                          mask: Optional[Mask] = None, bias: Optional[Bias | jax.Array] = None,
                          scale: Optional[float] = None, logits_soft_cap: Optional[float] = None,
                          block_q: int = 128) -> jax.Array:
    """MiniLM's ``L_AT`` (eq. 7): the mean over batch, heads and queries of ``KL(A^T ‖ A^S)``, blockwise.

    Args as ``attention_kl``; the teacher and the student need the same number of query heads. The mean runs
    over the rows that see at least one key (all of them without a mask, as in the paper's ``1/(A_h|x|)``).

    Returns:
      a float32 scalar.
    """
    _check_same_heads(q_t, q_s, "attention")
    kl, _, has_keys = _pair_rows(q_t, k_t, q_s, k_s, mask=mask, bias=bias, scale=scale,
                                 logits_soft_cap=logits_soft_cap, block_q=block_q)
    return _row_mean(kl, has_keys)


def minilm_value_relation_loss(v_t: jax.Array, v_s: jax.Array, *, mask: Optional[Mask] = None,
                               block_q: int = 128) -> jax.Array:
    """MiniLM's ``L_VR`` (eqs. 8-9): the mean over batch, heads and positions of
    ``KL(softmax(V^T V^Tᵀ/√d_k) ‖ softmax(V^S V^Sᵀ/√d'_k))``, blockwise (the value relation is the softmax
    map of ``V`` against itself).

    Args:
      v_t: the teacher's values ``[B, S, H, Dt]``; v_s: the student's ``[B, S, H, Ds]`` (same ``H``).
      mask: an ``attnjax.masks`` value for the ``[S, S]`` relation (default none, as in MiniLM's BERT models).
      block_q: rows per step.

    ``√d_k`` is each model's value head size (the attention head size in MiniLM's models).

    Returns:
      a float32 scalar.
    """
    _check_same_heads(v_t, v_s, "value")
    kl, _, has_keys = _pair_rows(v_t, v_t, v_s, v_s, mask=mask, block_q=block_q)
    return _row_mean(kl, has_keys)


def minilm_loss(teacher: Sequence[jax.Array], student: Sequence[jax.Array], *, mask: Optional[Mask] = None,
                bias: Optional[Bias | jax.Array] = None, scale: Optional[float] = None,
                logits_soft_cap: Optional[float] = None, block_q: int = 128) -> jax.Array:
    """MiniLM's distillation objective ``L_AT + L_VR`` for one layer pair (the teachers' and students' last
    self-attention layers in the paper).

    Args:
      teacher, student: ``(q, k, v)`` of each model's layer, ``q [B, T, H, D]``, ``k``/``v [B, T, Hkv, D]``
        (self-attention; ``H`` and ``Hkv`` equal across the two models).
      mask: applied to the attention maps and to the value relation.
      bias, scale, logits_soft_cap: the attention maps' options (``minilm_attention_loss``).
      block_q: rows per step.

    Returns:
      a float32 scalar.
    """
    if len(teacher) != 3 or len(student) != 3:
        raise ValueError("teacher and student must each be a (q, k, v) triple")
    (q_t, k_t, v_t), (q_s, k_s, v_s) = teacher, student
    return (minilm_attention_loss(q_t, k_t, q_s, k_s, mask=mask, bias=bias, scale=scale,
                                  logits_soft_cap=logits_soft_cap, block_q=block_q)
            + minilm_value_relation_loss(v_t, v_s, mask=mask, block_q=block_q))


def value_relation_map(v: jax.Array, *, mask: Optional[Mask] = None) -> jax.Array:
    """MiniLM's value relation (eq. 8) as a dense map: ``softmax(VVᵀ/√d) [B, H, S, S]`` from ``v [B, S, H, D]``
    (small inputs; the losses never form it)."""
    return jnp.exp(dense_log_probabilities(v, v, mask=mask))


def minilm_loss_of_maps(attention_teacher: jax.Array, attention_student: jax.Array,
                        value_relation_teacher: jax.Array, value_relation_student: jax.Array) -> jax.Array:
    """``L_AT + L_VR`` from dense maps ``[B, H, T, S]`` and ``[B, H, S, S]`` (e.g. another library's attention
    probabilities and ``value_relation_map``): means of the row KLs over rows where the teacher has mass."""
    parts = []
    for teacher, student in ((attention_teacher, attention_student), (value_relation_teacher, value_relation_student)):
        kl = attention_kl_of_maps(teacher, student)
        parts.append(_row_mean(kl, jnp.any(jnp.asarray(teacher) > 0, axis=-1)))
    return parts[0] + parts[1]


def haste_attention_loss(teacher_layers: Sequence[tuple[jax.Array, jax.Array]],
                         student_layers: Sequence[tuple[jax.Array, jax.Array]], *, mask: Optional[Mask] = None,
                         bias: Optional[Bias | jax.Array] = None, scale: Optional[float] = None,
                         logits_soft_cap: Optional[float] = None, block_q: int = 128) -> jax.Array:
    """HASTE's attention alignment ``L_ATTA``: the mean over layer pairs, batch, heads and query rows of the
    cross-entropy ``−Σ_j p^T_ij log p^S_ij`` between the teacher's and the student's maps, blockwise.

    Args:
      teacher_layers: ``(q, k)`` per aligned teacher layer, ``[B, T, H, Dt]`` / ``[B, T, Hkv_t, Dt]``, over the
        tokens both models share (HASTE drops DINOv2's class token from q and k: the same as its softmax
        over patch logits).
      student_layers: ``(q, k)`` of the paired student layers, the same length, ``[B, T, H, Ds]``; to align
        the first ``H`` of a student's larger number of heads, as HASTE does, slice its ``q`` (and ``k``).
      mask, bias, scale, logits_soft_cap, block_q: as ``attention_cross_entropy``, for every pair.

    Returns:
      a float32 scalar, differentiable in the student's q and k.
    """
    if len(teacher_layers) != len(student_layers) or not teacher_layers:
        raise ValueError(f"teacher_layers and student_layers must be non-empty and pair up one to one, got "
                         f"{len(teacher_layers)} and {len(student_layers)} layers")
    losses = []
    for (q_t, k_t), (q_s, k_s) in zip(teacher_layers, student_layers):
        _, ce, has_keys = _pair_rows(q_t, k_t, q_s, k_s, mask=mask, bias=bias, scale=scale,
                                     logits_soft_cap=logits_soft_cap, block_q=block_q)
        losses.append(_row_mean(ce, has_keys))
    return jnp.mean(jnp.stack(losses))


def feature_alignment_loss(teacher_features: jax.Array, student_features: jax.Array) -> jax.Array:
    """REPA's feature alignment as HASTE uses it: ``−mean_n cos(y_n, h_φ(z_n))`` over all tokens and the batch.

    Args:
      teacher_features: the teacher's patch features ``[..., C]``.
      student_features: the student's projected hidden states ``h_φ(z)``, the same shape.

    Returns:
      a float32 scalar in ``[−1, 1]`` (a zero vector has cosine 0).
    """
    y = jnp.asarray(teacher_features, jnp.float32)
    z = jnp.asarray(student_features, jnp.float32)
    if y.ndim < 1 or y.shape != z.shape:
        raise ValueError(f"teacher_features and student_features must be features [..., C] of one shape, got "
                         f"{describe(y)} and {describe(z)}")

    def unit(x):
        norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
        return x / jnp.maximum(norm, 1e-12)

    return -jnp.mean(jnp.sum(unit(y) * unit(z), axis=-1))


HASTE_TRIGGER_THRESHOLD = -0.05
"""``δ`` of HASTE's gradient-angle trigger (App. A.2): alignment stops when the mean cosine falls below it."""

HASTE_TRIGGER_TIMESTEPS = (0.02, 0.1, 0.5, 0.8)
"""The diffusion timesteps ``t`` at which App. A.2 evaluates the gradient cosine (averaged over them)."""


def gradient_cosine(a, b) -> jax.Array:
    """``⟨a, b⟩ / (‖a‖ ‖b‖)`` of two gradient pytrees of the same structure, all leaves flattened together
    (float32 scalar; 0 if either is zero)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if jax.tree.structure(a) != jax.tree.structure(b) or any(x.shape != y.shape for x, y in zip(la, lb)):
        raise ValueError("the two gradients must be pytrees of the same structure and leaf shapes")
    dot = sum(jnp.vdot(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)) for x, y in zip(la, lb))
    na = jnp.sqrt(sum(jnp.vdot(jnp.asarray(x, jnp.float32), jnp.asarray(x, jnp.float32)) for x in la))
    nb = jnp.sqrt(sum(jnp.vdot(jnp.asarray(y, jnp.float32), jnp.asarray(y, jnp.float32)) for y in lb))
    return jnp.where((na > 0) & (nb > 0), dot / jnp.maximum(na * nb, 1e-30), 0.0)


def haste_gradient_trigger(alignment_grads: Sequence, denoising_grads: Sequence,
                           threshold: float = HASTE_TRIGGER_THRESHOLD) -> tuple[jax.Array, jax.Array]:
    """HASTE's gradient-angle termination rule (App. A.2): ``ρ = mean_t cos(∇L_align(t), ∇L_denoise(t))``.

    Args:
      alignment_grads: one gradient pytree per evaluated timestep ``t`` (App. A.2: ``HASTE_TRIGGER_TIMESTEPS``,
        each over a batch of images), of the holistic alignment loss ``0.5·L_ATTA + 0.5·L_REPA`` with respect
        to one block's parameters (the 5th SiT-B/2 block in the paper's example).
      denoising_grads: the denoising loss's gradients at the same timesteps and parameters.
      threshold: ``δ`` (−0.05 in the paper).

    Returns:
      ``(ρ, fired)``: the mean cosine (float32) and ``ρ < δ``; when it fires at step ``n``, continue with
      ``dataclasses.replace(schedule, stop_step=n)`` (a ``HasteSchedule``).
    """
    check_scalar("threshold", threshold)
    if len(alignment_grads) != len(denoising_grads) or not alignment_grads:
        raise ValueError(f"alignment_grads and denoising_grads must pair up one gradient per timestep, got "
                         f"{len(alignment_grads)} and {len(denoising_grads)}")
    rho = jnp.mean(jnp.stack([gradient_cosine(a, d) for a, d in zip(alignment_grads, denoising_grads)]))
    return rho, rho < threshold


@dataclasses.dataclass(frozen=True)
class HasteSchedule:
    """HASTE's two phases: alignment weights until ``stop_step``, then the denoising loss alone.

    ``loss(step, denoising, attention, features) = denoising + [step < stop_step]·(attention_weight·attention
    + feature_weight·features)`` (the official ``train.py``: ``--attn-coeff 0.5 --proj-coeff 0.5
    --early-stop-point 250000`` on ImageNet 256, 150k on MS-COCO; sec. 3.2: 100k for SiT-B/2). For the
    gradient-angle trigger, see ``haste_gradient_trigger``. ``step`` may be a Python int or a traced
    array; to stop paying for the teacher's forward pass after the trigger, branch in Python on
    ``active(step)`` with an int step (as the official code does).
    """

    attention_weight: float = 0.5
    feature_weight: float = 0.5
    stop_step: int = 250_000

    def __post_init__(self):
        for name in ("attention_weight", "feature_weight"):
            check_scalar(name, getattr(self, name))
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not isinstance(self.stop_step, int) or isinstance(self.stop_step, bool) or self.stop_step < 0:
            raise ValueError(f"stop_step must be a non-negative int, got {describe(self.stop_step)}")

    def active(self, step: int | jax.Array) -> bool | jax.Array:
        """Whether phase I (alignment) is on at ``step``: ``step < stop_step``."""
        return step < self.stop_step

    def weights(self, step: int | jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(attention weight, feature weight)`` at ``step``: the configured ones in phase I, zeros after."""
        on = jnp.asarray(self.active(step), jnp.float32)
        return on * self.attention_weight, on * self.feature_weight

    def loss(self, step: int | jax.Array, denoising: jax.Array, attention: jax.Array,
             features: jax.Array) -> jax.Array:
        """The total loss at ``step`` from the three scalar terms."""
        w_attention, w_features = self.weights(step)
        return denoising + jnp.where(w_attention > 0, w_attention * attention, 0.0) + jnp.where(
            w_features > 0, w_features * features, 0.0)


__all__ = ["HASTE_LAYER_PAIRS", "attention_kl", "attention_cross_entropy",
           "attention_kl_of_maps", "attention_cross_entropy_of_maps", "minilm_attention_loss",
           "minilm_value_relation_loss", "minilm_loss", "value_relation_map", "minilm_loss_of_maps",
           "haste_attention_loss", "feature_alignment_loss", "HASTE_TRIGGER_THRESHOLD", "HASTE_TRIGGER_TIMESTEPS",
           "gradient_cosine", "haste_gradient_trigger", "HasteSchedule"]
