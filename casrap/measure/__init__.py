"""Measurement used by every part of casrap: timing, perplexity, divergence."""

from casrap.measure.corpus import Corpus, load_corpus, offline_corpus
from casrap.measure.perplexity import (
    Divergence,
    PerplexityResult,
    divergence,
    mean_kl,
    next_token_logits,
    perplexity,
    teacher_forced_ppl,
    text_perplexity,
)
from casrap.measure.timing import (
    GenerationTiming,
    InterleavedComparison,
    check_prompt_fits,
    compare_interleaved,
    generate_fixed,
)

__all__ = [
    "Corpus", "load_corpus", "offline_corpus", "Divergence", "PerplexityResult", "divergence",
    "mean_kl", "next_token_logits", "perplexity", "teacher_forced_ppl", "text_perplexity",
    "GenerationTiming", "InterleavedComparison", "check_prompt_fits", "compare_interleaved",
    "generate_fixed",
]
