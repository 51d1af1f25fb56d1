"""Analysis tools for attention maps at any length: statistics computed blockwise from q and k.

Every per-query or per-key statistic is computed one query tile at a time (``blockwise``), with the
scale, bias, soft cap, masks and GQA layout of ``attnjax.attention``, so it runs at 32k-128k tokens
without a ``[T, S]`` map; the ``*_of_map`` forms take dense maps (small inputs, other libraries' models).
"""

from attnjax.analysis import blockwise, entropy, sinks
from attnjax.analysis.entropy import attention_entropy, entropy_of_map
from attnjax.analysis.sinks import attention_received, detect_sinks, sink_metric, sink_scores, sink_scores_of_map

__all__ = ["blockwise", "entropy", "sinks", "attention_entropy", "entropy_of_map", "attention_received",
           "sink_scores", "sink_scores_of_map", "sink_metric", "detect_sinks"]
