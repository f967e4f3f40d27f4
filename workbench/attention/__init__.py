"""Attention-heads lens: patterns, head scores, retrieval heads, causal checks, probes,
token attribution."""

from workbench.attention.ablation import HeadAblation, HeadEffects, PruneCurve, ablate_heads, prune_curve, scan_heads
from workbench.attention.attribution import TokenAttribution, token_attribution
from workbench.attention.patterns import AttentionPatterns, attention_patterns
from workbench.attention.probes import ProbeScores, probe
from workbench.attention.retrieval import RetrievalScores, head_overlap, needle_prompts, retrieval_scores
from workbench.attention.scores import KINDS, HeadScores, head_scores
from workbench.tokens import token_strings

__all__ = [
    "KINDS", "AttentionPatterns", "HeadAblation", "HeadEffects", "HeadScores", "ProbeScores", "PruneCurve",
    "RetrievalScores", "TokenAttribution", "ablate_heads", "attention_patterns", "head_overlap", "head_scores",
    "needle_prompts", "probe", "prune_curve", "retrieval_scores", "scan_heads", "token_attribution", "token_strings",
]
