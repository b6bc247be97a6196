"""Causal language models under a plan: sliding-window perplexity, a BPE tokenizer and token rows from text
files, and training from scratch or from a checkpoint (the ``lm`` run method).

    from sparseattn.lm import perplexity, LMConfig, train_lm
    result = train_lm(LMConfig(task="books", plan="all: global_tokens(4) | neighbour(128)"), out_dir="out/lm")

The command line is ``sparseattn perplexity`` and ``sparseattn train-lm`` (see docs/language-models.md);
Attention Pruning of a language model is the ``prune-lm`` method (``sparseattn.pruning.lm``).
"""

from .corpus import bpe_tokenizer, corpus_dir, corpus_files, cut_rows, encode_documents, read_text
from .perplexity import (Scored, check_context, check_plan_length, perplexity, plan_sparsity, rows_score,
                         score_document, windows)
from .train import LMConfig, build_lm, load_lm_data, train_lm

__all__ = [
    "bpe_tokenizer", "corpus_dir", "corpus_files", "cut_rows", "encode_documents", "read_text",
    "Scored", "check_context", "check_plan_length", "perplexity", "plan_sparsity", "rows_score", "score_document",
    "windows", "LMConfig", "build_lm", "load_lm_data", "train_lm",
]
