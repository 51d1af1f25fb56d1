"""Rotary position embedding (RoPE) and its context-extension scalings.

Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding" (2021). Scalings: linear
position interpolation (Chen et al. 2023), NTK-aware base scaling (bloc97, 2023), and Llama 3's
frequency-dependent scaling (Meta, 2024).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

RopeScaling = Literal["none", "linear", "ntk", "llama3"]


@dataclasses.dataclass(frozen=True)
class RoPE:
    """Rotary position embedding in the rotate-half (GPT-NeoX / Llama) layout.

    Feature pairs ``(x[r], x[r + R/2])`` for ``r < R/2`` rotate by angle ``pos · θ_r`` with
    ``θ_r = base^(-2r/R)``, where ``R = rotary_dim`` (default: the whole head dim).

    Args:
      base: the frequency base (10000 in RoFormer; 500000 in Llama 3).
      scaling: "none"; "linear" divides positions by ``factor`` (position interpolation);
        "ntk" raises the base to ``base · factor^(R/(R-2))``; "llama3" divides only the low
        frequencies by ``factor``, blending between ``low_freq_factor`` and ``high_freq_factor``
        wavelengths of ``original_max_position``.
      factor: context extension factor for the scalings.
      rotary_dim: rotate only the first ``rotary_dim`` features (partial rotary); even.
    """

    base: float = 10000.0
    scaling: RopeScaling = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    rotary_dim: Optional[int] = None

    def __post_init__(self):
        if self.scaling not in ("none", "linear", "ntk", "llama3"):
            raise ValueError(f"RoPE.scaling must be one of none/linear/ntk/llama3, got {self.scaling!r}")
        if not isinstance(self.factor, (int, float)) or self.factor <= 0:
            shown = self.factor if isinstance(self.factor, (int, float)) else type(self.factor).__name__
            raise ValueError(f"RoPE.factor must be a positive number, got {shown!r}")

    def frequencies(self, head_dim: int) -> np.ndarray:
        """Angular frequencies ``θ_r`` (float32, ``[R/2]``) after scaling."""
        dim = self.rotary_dim or head_dim
        if dim % 2 or dim > head_dim:
            raise ValueError(f"rotary_dim must be even and <= head_dim={head_dim}, got {dim}")
        base = self.base
        if self.scaling == "ntk":
            base = base * self.factor ** (dim / (dim - 2))
        freqs = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
        if self.scaling == "linear":
            freqs = freqs / self.factor
        elif self.scaling == "llama3":
            freqs = self._llama3(freqs)
        return freqs.astype(np.float32)

    def _llama3(self, freqs: np.ndarray) -> np.ndarray:
        wavelen = 2 * math.pi / freqs
        low_wavelen = self.original_max_position / self.low_freq_factor
        high_wavelen = self.original_max_position / self.high_freq_factor
        smooth = (self.original_max_position / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor)
        blended = (1 - smooth) * freqs / self.factor + smooth * freqs
        return np.where(wavelen < high_wavelen, freqs, np.where(wavelen > low_wavelen, freqs / self.factor, blended))

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """Rotate ``x`` [B, T, H, D] at integer ``positions`` [B, T] or [T]; same dtype out."""
        if x.ndim != 4:
            raise ValueError(f"RoPE expects x of shape [B, T, H, D], got {x.shape}")
        head_dim = x.shape[-1]
        freqs = jnp.asarray(self.frequencies(head_dim))
        dim = 2 * freqs.shape[0]
        positions = jnp.asarray(positions)
        if positions.ndim == 1:
            positions = positions[None]
        if positions.shape[-1] != x.shape[1]:
            raise ValueError(f"positions has shape {positions.shape}, expected [B, T] or [T] with T={x.shape[1]}")
        angle = positions.astype(jnp.float32)[..., None, None] * freqs  # [B, T, 1, R/2]
        cos, sin = jnp.cos(angle), jnp.sin(angle)
        xr = x[..., :dim].astype(jnp.float32)
        x1, x2 = xr[..., : dim // 2], xr[..., dim // 2:]
        rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        return jnp.concatenate([rotated.astype(x.dtype), x[..., dim:]], axis=-1)


__all__ = ["RoPE", "RopeScaling"]
