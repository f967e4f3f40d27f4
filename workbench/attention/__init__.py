"""Attention-heads lens: patterns, head scores, causal checks, probes."""

from workbench.attention.patterns import AttentionPatterns, attention_patterns, token_strings

__all__ = ["AttentionPatterns", "attention_patterns", "token_strings"]
