"""Public scaffolding shared by the Pallas kernels; no kernel imports a private name of another.

- ``statics``: ``KernelStatic`` (sizes every kernel call shares), ``FlashStatic`` (plus the weight
  function, mask plan, bias kind, sinks), ``next_power_of_2``, ``pick_block``.
- ``mask_plans``: ``plan_mask`` compiles an ``attnjax.masks`` value into a ``MaskPlan`` (plus its
  ``SegmentData``/``ExplicitData``) that ``eval_mask`` evaluates on a tile from ``tile_iotas``.
- ``scores``: ``alibi_tile``, T5's ``t5_bucket_tile``/``t5_tile``/``t5_table_grad`` (with its static
  ``T5Buckets``), ``apply_soft_cap``, ``soft_cap_grad`` on float32 tiles.
- ``calls``: ``pallas_call``, ``pl.pallas_call`` with outputs typed to vary like the operands
  (runs inside ``jax.shard_map`` with the default ``check_vma``).
- ``refusals``: ``refuse_unserved`` (head dims up to 256, float dtypes), raising NotImplementedError.
- ``interpret``: ``default_interpret`` (interpret mode exactly on CPU unless asked), warning
  ``InterpretModeWarning`` once per kernel.
- ``gpu``: Triton helpers (``MAX_BLOCK``, ``compiler_params``, ``dot``, ``switch_on_code``,
  ``full_spec``); ``gpu_flash``: the flash-family tile on Triton (``extras``/``Loader`` for sinks,
  bias and mask data; ``scores``, ``allowed``, ``recompute``), used by flash and block-sparse.
- ``tpu``: Mosaic helpers (``LANES``, ``SUBLANES``, ``tpu_tiles``, ``call``, ``tiled_spec``,
  ``heads_major``, ``row_stat``, ``stat_column``, ``mask_layout``, ``data_specs``); ``tpu_flash``:
  the flash-family tile on Mosaic (``split_refs``, ``t5_buckets``, ``logits``, ``allowed``, ``dlogits``).

The backend modules are exported as modules (their tile functions share names across backends).
"""

from pallas_kernels.common.calls import pallas_call
from pallas_kernels.common.interpret import InterpretModeWarning, default_interpret
from pallas_kernels.common.mask_plans import ExplicitData, MaskPlan, SegmentData, eval_mask, plan_mask, tile_iotas
from pallas_kernels.common.refusals import refuse_unserved
from pallas_kernels.common.scores import (T5Buckets, alibi_tile, apply_soft_cap, soft_cap_grad, t5_bucket_tile,
                                          t5_table_grad, t5_tile)
from pallas_kernels.common.statics import FlashStatic, KernelStatic, next_power_of_2, pick_block
from pallas_kernels.common import gpu, gpu_flash, tpu, tpu_flash

__all__ = [
    "KernelStatic", "FlashStatic", "next_power_of_2", "pick_block",
    "MaskPlan", "SegmentData", "ExplicitData", "plan_mask", "eval_mask", "tile_iotas",
    "alibi_tile", "T5Buckets", "t5_bucket_tile", "t5_tile", "t5_table_grad", "apply_soft_cap", "soft_cap_grad",
    "refuse_unserved", "pallas_call",
    "InterpretModeWarning", "default_interpret",
    "gpu", "gpu_flash", "tpu", "tpu_flash",
]
