"""Linear attention: feature maps, decay (Lightning), states, packed segments; registry entries
"linear", "lightning", "performer", "based_linear", "flow" (Flowformer), "inline" (InLine), "kernelized_rpe"
(kernelized attention with relative positions through the FFT) and "rala" (rank-augmented), one file each."""

from attnjax.linear import feature_maps
from attnjax.linear.feature_maps import FEATURE_MAPS, Performer
from attnjax.linear.linear_attention import (
    NORMALIZER_EPS, linear_attention, linear_attention_step, segment_ids_from_cu_seqlens)
from attnjax.linear.linear import LinearAttention  # noqa: I001 - registration order is the README's order
from attnjax.linear.lightning import Lightning
from attnjax.linear.performer import PerformerAttention
from attnjax.linear.based_linear import BasedLinear
from attnjax.linear.flow import (Flow, FlowState, flow_attention, flow_attention_reference, flow_attention_step,
                                 flow_initial_state)
from attnjax.linear.inline import InLine, inline_attention, inline_attention_reference
from attnjax.linear.kernelized_rpe import KernelizedRPE, kernelized_rpe_attention, kernelized_rpe_attention_reference
from attnjax.linear.rala import RALA, rala, rala_reference, rala_rotary

__all__ = [
    "feature_maps", "FEATURE_MAPS", "Performer", "linear_attention", "linear_attention_step",
    "segment_ids_from_cu_seqlens", "NORMALIZER_EPS", "LinearAttention", "Lightning",
    "PerformerAttention", "BasedLinear", "Flow", "FlowState", "flow_attention", "flow_attention_reference",
    "flow_attention_step", "flow_initial_state", "InLine", "inline_attention", "inline_attention_reference",
    "KernelizedRPE", "kernelized_rpe_attention", "kernelized_rpe_attention_reference", "RALA", "rala",
    "rala_reference", "rala_rotary",
]
