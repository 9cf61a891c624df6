"""tinker.types.provenance_spans: gradwire's PromptProvenanceSpan, SampledProvenanceSpan."""
from gradwire.types import PromptProvenanceSpan, SampledProvenanceSpan

__all__ = ["PromptProvenanceSpan", "SampledProvenanceSpan"]
