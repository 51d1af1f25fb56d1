"""Static descriptions of one kernel call (hashable: custom_vjp nondiff arguments) and tile sizes.

``KernelStatic`` holds the sizes every attention kernel shares (flash, block-sparse,
stick-breaking); ``FlashStatic`` adds what the weight-function (flash-family) tile math reads: the
weight function, the mask plan, the bias kind and sinks. Block sizes come from ``pick_block``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from attnjax.blocked.weights import WeightFunction
from pallas_kernels.common.mask_plans import MaskPlan
from pallas_kernels.common.scores import T5Buckets


@dataclasses.dataclass(frozen=True)
class KernelStatic:
    """The static sizes every attention kernel call shares, and the tile counts derived from them.

    ``T, S``: true lengths; ``T_pad, S_pad``: padded to whole tiles; ``D_pad, Dv_pad``: padded head
    dims (GPU: powers of two).
    """

    T: int
    S: int
    T_pad: int
    S_pad: int
    num_q_heads: int
    num_kv_heads: int
    D: int
    Dv: int
    D_pad: int
    Dv_pad: int
    block_q: int
    block_kv: int
    scale: float
    logits_soft_cap: Optional[float]

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_q_heads // self.num_kv_heads

    @property
    def num_q_tiles(self) -> int:
        """Query tiles of the padded length."""
        return self.T_pad // self.block_q

    @property
    def num_kv_tiles(self) -> int:
        """Key tiles of the padded length."""
        return self.S_pad // self.block_kv


@dataclasses.dataclass(frozen=True)
class FlashStatic(KernelStatic):
    """Everything static about one flash-family kernel call: the shared sizes plus the weight
    function, the mask plan and the bias.

    ``bias_kind``: None; "alibi" (per-head slopes, the penalty computed in-kernel from positions);
    "t5" (``attnjax.positional.T5Bias``: a per-head ``[num_buckets]`` table read by the bucket of
    ``key − query`` computed in-kernel, with ``t5`` its static bucketing; the dQ pass returns the
    table's gradient); or "array" (a ``[Bx, Hx, T, S]`` array read per tile, GPU only).
    ``bias_bcast``: for "array", whether its batch and head axes broadcast.

    ``num_v_heads``: V's head count when it differs from K's (``num_kv_heads``), the "kv_heads"
    option (DiffQKV, Lin et al. 2025, "Sigma"); ``None`` = K's. Query head ``h`` reads K head
    ``h // group`` and V head ``h // v_group``. The key-major (dK/dV) pass runs ``head_blocks =
    gcd(Hk, Hv)`` programs per key tile and batch, each over ``block_heads`` consecutive query heads:
    whole K groups and whole V groups, so both sums stay inside one program (no atomics).
    """

    weight_fn: WeightFunction
    mask_plan: Optional[MaskPlan]
    bias_kind: Optional[str]
    bias_bcast: tuple = (False, False)
    t5: Optional[T5Buckets] = None
    has_sinks: bool = False
    interpret: bool = False
    num_warps: Optional[int] = None
    num_stages: Optional[int] = None
    num_v_heads: Optional[int] = None

    @property
    def v_heads(self) -> int:
        """V's head count (``num_kv_heads`` unless ``num_v_heads`` is given)."""
        return self.num_kv_heads if self.num_v_heads is None else self.num_v_heads

    @property
    def v_group(self) -> int:
        """Query heads per V head."""
        return self.num_q_heads // self.v_heads

    @property
    def head_blocks(self) -> int:
        """Programs per key tile and batch in the key-major pass: ``gcd(Hk, Hv)`` (``Hkv`` for GQA)."""
        return math.gcd(self.num_kv_heads, self.v_heads)

    @property
    def block_heads(self) -> int:
        """Consecutive query heads of one key-major program (``group`` for GQA)."""
        return self.num_q_heads // self.head_blocks


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def pick_block(block: int, length: int, minimum: int = 16, power_of_two: bool = True) -> int:
    """A tile size for a sequence of ``length``: ``block`` clipped so a short sequence isn't
    padded far past its length, never below ``minimum`` (Triton's ``tl.dot`` needs 16).
    With ``power_of_two`` (GPU), ``block`` must be one and the result is one."""
    if block <= 0:
        raise ValueError(f"block size must be positive, got {block}")
    if power_of_two:
        if block & (block - 1):
            raise ValueError(f"block size must be a power of two for this backend, got {block}")
        return max(minimum, min(block, next_power_of_2(length)))
    return max(minimum, min(block, length))


__all__ = ["KernelStatic", "FlashStatic", "next_power_of_2", "pick_block"]
