"""qlk's nn layers: :class:`QuantLinear` (quantized frozen base + optional QA-LoRA/LoRA adapter) and,
for mixture-of-experts models, :class:`QuantExperts` / :class:`QuantExpertProj` (:mod:`qlk.nn.experts`)."""
from .experts import QuantExpertProj, QuantExperts
from .linear import QuantLinear

__all__ = ["QuantLinear", "QuantExperts", "QuantExpertProj"]
