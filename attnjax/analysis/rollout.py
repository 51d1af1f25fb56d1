"""Attention rollout: how much each input token flows into each position through all layers.

Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020, sec. 3: the residual connection is
modelled by adding the identity to each layer's head-averaged map and renormalizing its rows,
``Â_l = norm_rows(mean_h A_l + I)`` (``= ½·mean_h A_l + ½·I`` when the rows of ``A_l`` sum to 1), and the
attention of layer ``L`` to the inputs is the product ``R = Â_L ··· Â_1`` (first layer rightmost). This is
the authors' ``compute_joint_attention`` (samiraabnar/attention_flow, ``attention_graph_util.py``). A query
row that attends to nothing (all zeros) becomes the identity row after the residual: it keeps its token.

The implementation is ``attnjax.vision.rollout`` (DCAL's global-local cross-attention uses it, and the vision
floor may not import analysis); this module re-exports it.
"""

from attnjax.vision.rollout import attention_rollout

__all__ = ["attention_rollout"]
