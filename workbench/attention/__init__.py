"""Attention-heads lens: patterns, head scores, causal checks, probes."""

from workbench.attention.ablation import HeadAblation, HeadEffects, PruneCurve, ablate_heads, prune_curve, scan_heads
from workbench.attention.patterns import AttentionPatterns, attention_patterns, token_strings
from workbench.attention.probes import ProbeScores, probe
from workbench.attention.scores import KINDS, HeadScores, head_scores

__all__ = [
    "KINDS", "AttentionPatterns", "HeadAblation", "HeadEffects", "HeadScores", "ProbeScores", "PruneCurve",
    "ablate_heads", "attention_patterns", "head_scores", "probe", "prune_curve", "scan_heads", "token_strings",
]
