"""Per-example token structure that input-dependent patterns need, made at tokenization time.

`encode` tokenizes like a Hugging Face tokenizer and attaches a `BatchStructure`: for every token the
index of the word it belongs to (-1 for special tokens and padding) and, per example, word-level tables:
dependency hop distances and lemma / lower-case identity ids. A word is a parser token (spaCy) or,
without a parser, a run of word characters or one punctuation mark; sub-word pieces are mapped to
words through character offsets, so a word's pieces share its edges.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np
import torch

from .parse import ParseCache, ParsedText, segment_words

UNREACHABLE = 255  # hop distance between words of different sentences / segments


@dataclass
class ExampleStructure:
    """One example: ``word_ids`` per token; word-level tables over its W words."""

    word_ids: np.ndarray  # (T,) int64, -1 = no word
    word_dist: np.ndarray  # (W, W) uint8 dependency hops, UNREACHABLE across trees
    lemma_ids: np.ndarray  # (W,) int64, equal ids = equal lemma
    lower_ids: np.ndarray  # (W,) int64, equal ids = equal lower-cased form
    parsed: bool


@dataclass
class BatchStructure:
    """A padded batch of `ExampleStructure`s as tensors.

    word_ids: (B, L) int64, -1 for special tokens and padding.
    word_dist: (B, W, W) uint8 dependency hop distances between words (UNREACHABLE if none).
    lemma_ids, lower_ids: (B, W) int64; padding words have id -1.
    parsed: whether dependency heads are present (False: words were segmented without a parser).
    """

    word_ids: torch.Tensor
    word_dist: torch.Tensor
    lemma_ids: torch.Tensor
    lower_ids: torch.Tensor
    parsed: bool = True
    examples: list[ExampleStructure] = field(default_factory=list, repr=False)

    @classmethod
    def collate(cls, examples: list[ExampleStructure], length: int | None = None) -> "BatchStructure":
        """Pad examples to ``length`` tokens (default: the longest); left-aligned, like right padding."""
        if not examples:
            raise ValueError("cannot collate an empty list of example structures")
        T = max(len(e.word_ids) for e in examples)
        L = T if length is None else length
        if L < T:
            raise ValueError(f"cannot pad structures of {T} tokens to length {L}")
        W = max(1, max(len(e.lemma_ids) for e in examples))
        B = len(examples)
        word_ids = torch.full((B, L), -1, dtype=torch.long)
        word_dist = torch.full((B, W, W), UNREACHABLE, dtype=torch.uint8)
        lemma_ids = torch.full((B, W), -1, dtype=torch.long)
        lower_ids = torch.full((B, W), -1, dtype=torch.long)
        for b, e in enumerate(examples):
            n, w = len(e.word_ids), len(e.lemma_ids)
            word_ids[b, :n] = torch.from_numpy(e.word_ids)
            word_dist[b, :w, :w] = torch.from_numpy(e.word_dist)
            lemma_ids[b, :w] = torch.from_numpy(e.lemma_ids)
            lower_ids[b, :w] = torch.from_numpy(e.lower_ids)
        return cls(word_ids, word_dist, lemma_ids, lower_ids, all(e.parsed for e in examples), list(examples))

    def to(self, device=None, non_blocking: bool = False) -> "BatchStructure":
        """Move the tensors (BatchEncoding.to and the Trainer call this with keywords)."""
        mv = lambda t: t.to(device=device, non_blocking=non_blocking)  # noqa: E731
        return BatchStructure(mv(self.word_ids), mv(self.word_dist), mv(self.lemma_ids), mv(self.lower_ids),
                              self.parsed, self.examples)

    def select(self, rows) -> "BatchStructure":
        return BatchStructure(self.word_ids[rows], self.word_dist[rows], self.lemma_ids[rows],
                              self.lower_ids[rows], self.parsed)


def tree_distances(heads: list[int] | tuple[int, ...]) -> np.ndarray:
    """Hop distances between the words of a dependency forest (undirected), UNREACHABLE across trees.

    ``heads[i]`` is word i's head, ``i`` itself for a root. Distances come from depths and lowest common
    ancestors: d(u, v) = depth(u) + depth(v) - 2 depth(lca(u, v))."""
    W = len(heads)
    if W == 0:
        return np.zeros((0, 0), dtype=np.uint8)
    anc = np.zeros((W, W), dtype=bool)  # anc[u, a]: a is u or an ancestor of u
    for u in range(W):
        a, steps = u, 0
        while True:
            anc[u, a] = True
            h = heads[a]
            if h == a or h < 0:
                break
            a, steps = h, steps + 1
            if steps > W:
                raise ValueError(f"dependency heads contain a cycle: {list(heads)}")
    depth = anc.sum(1) - 1
    common = anc[:, None, :] & anc[None, :, :]
    lca_depth = np.where(common, depth[None, None, :], -1).max(-1)
    dist = depth[:, None] + depth[None, :] - 2 * lca_depth
    dist = np.where(lca_depth < 0, UNREACHABLE, np.minimum(dist, UNREACHABLE - 1))
    return dist.astype(np.uint8)


def _words_of_token(parsed: ParsedText, start: int, end: int) -> int:
    """Index of the word that contains character ``start`` (or overlaps [start, end)), -1 if none."""
    k = bisect.bisect_right(parsed.starts, start) - 1
    if k >= 0 and parsed.starts[k] <= start < parsed.ends[k]:
        return k
    k2 = k + 1  # a token that starts in whitespace before a word (rare): take the word it overlaps
    if k2 < len(parsed) and parsed.starts[k2] < end:
        return k2
    return -1


def _identity_ids(values: tuple[str, ...], vocab: dict[str, int]) -> np.ndarray:
    return np.array([vocab.setdefault(v, len(vocab)) for v in values], dtype=np.int64)


def example_structure(offsets, sequence_ids, segments: list[ParsedText]) -> ExampleStructure:
    """Build one example's structure from its token offsets/sequence ids and its parsed segments."""
    base = np.cumsum([0] + [len(s) for s in segments])
    word_ids = np.full(len(offsets), -1, dtype=np.int64)
    for t, ((a, b), s) in enumerate(zip(offsets, sequence_ids)):
        if s is None or b <= a:
            continue
        k = _words_of_token(segments[s], a, b)
        if k >= 0:
            word_ids[t] = base[s] + k
    W = int(base[-1])
    dist = np.full((W, W), UNREACHABLE, dtype=np.uint8)
    for s, seg in enumerate(segments):
        if seg.parsed:
            dist[base[s]:base[s + 1], base[s]:base[s + 1]] = tree_distances(seg.heads)
        else:
            np.fill_diagonal(dist[base[s]:base[s + 1], base[s]:base[s + 1]], 0)
    vocab_lemma: dict[str, int] = {}
    vocab_lower: dict[str, int] = {}
    lemmas = np.concatenate([_identity_ids(s.lemmas, vocab_lemma) for s in segments]) if W else np.zeros(0, np.int64)
    lowers = np.concatenate([_identity_ids(s.lowers, vocab_lower) for s in segments]) if W else np.zeros(0, np.int64)
    return ExampleStructure(word_ids, dist, lemmas, lowers, all(s.parsed for s in segments))


def encode(tokenizer, texts: list[str], pairs: list[str] | None = None, *, parses: ParseCache | None = None,
           max_length: int | None = None, truncation: bool = False, padding: bool | str = True,
           structure: bool = True, return_tensors: str | None = "pt", pack: bool | int = False):
    """Tokenize ``texts`` (and optional second segments ``pairs``) and attach their structure.

    Returns the tokenizer's BatchEncoding with ``sparse_structure`` (a BatchStructure when padded to
    tensors, else a list of ExampleStructure). ``parses`` gives dependency parses (needed by
    ``syntax``); without it words are segmented by a regular expression. Over-long input is an error
    unless ``truncation=True`` is asked for explicitly; empty input is always an error.

    pack: instead of one padded row per example, several examples per row, as transformers' flattening
    collator makes them: True puts every example in one row; an integer is the row length (examples are
    placed in order, a new row where the next does not fit; the rest of a row is padding). Returns a
    BatchEncoding of ``input_ids`` (rows, length), ``position_ids`` restarting at 0 in each example, ``cu_seq_lens_q`` /
    ``cu_seq_lens_k`` (int32 offsets of the examples over the flattened rows), ``max_length_q`` /
    ``max_length_k`` (and ``attention_mask`` where rows end in padding); its attribute ``example_starts`` holds
    each example's first token in the flattened rows (where a classifier reads it). A sparsified
    model then applies its plan within each example, as if each ran alone (its layout reads
    ``cu_seq_lens_q``); a model that is not sparsified keeps examples apart only as transformers does, in one
    row without an attention mask (pack=True). Patterns of positions only: packed rows carry no word structure.
    """
    texts, pairs = _checked_texts(texts, pairs)
    if pack:
        if structure and parses is not None:
            raise ValueError("encode(pack=...) makes no word structure (syntax and lexical patterns need one padded "
                             "row per example); leave parses out, or pack=False")
        return _packed(tokenizer, texts, pairs, pack, max_length=max_length, truncation=truncation)
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer; sparseattn needs character "
                        "offsets to map words to tokens (load with use_fast=True)")
    limit = max_length or getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit > 1_000_000:
        limit = None
    enc = tokenizer(texts, pairs, padding=padding, truncation=truncation, max_length=limit if truncation else None,
                    return_offsets_mapping=True, return_special_tokens_mask=True, return_tensors=return_tensors)
    lengths = [int(sum(m)) for m in enc["attention_mask"]]
    if limit is not None and not truncation:
        for i, n in enumerate(lengths):
            if n > limit:
                raise ValueError(f"example {i} is {n} tokens long, more than max_length={limit}; shorten it, "
                                 "raise max_length, or pass truncation=True to cut it explicitly")
    offsets = enc.pop("offset_mapping")
    enc.pop("special_tokens_mask")  # special tokens are the real tokens without a word (word_ids == -1)
    if structure:
        if parses is not None:
            seg_a = parses.parse_many(texts)
            seg_b = parses.parse_many(list(pairs)) if pairs is not None else None
        else:
            seg_a = [segment_words(t) for t in texts]
            seg_b = [segment_words(t) for t in pairs] if pairs is not None else None
        examples = []
        for i in range(len(texts)):
            n = lengths[i]
            seq_ids = enc.sequence_ids(i)
            # right padding: the real tokens are the first n; left padding: the last n
            real = [j for j, m in enumerate(enc["attention_mask"][i]) if m]
            segs = [seg_a[i]] + ([seg_b[i]] if seg_b is not None else [])
            ex = example_structure([tuple(map(int, offsets[i][j])) for j in real], [seq_ids[j] for j in real], segs)
            assert len(ex.word_ids) == n
            examples.append(ex)
        if return_tensors == "pt":
            L = enc["input_ids"].shape[1]
            left = getattr(tokenizer, "padding_side", "right") == "left"
            bs = BatchStructure.collate(examples, L)
            if left:  # move each row's tokens to the right end, like the tokenizer did
                for b, e in enumerate(examples):
                    n = len(e.word_ids)
                    bs.word_ids[b] = -1
                    bs.word_ids[b, L - n:] = torch.from_numpy(e.word_ids)
            enc["sparse_structure"] = bs
        else:
            enc["sparse_structure"] = examples
    return enc


def _checked_texts(texts, pairs) -> tuple[list[str], list[str] | None]:
    """``encode``'s texts (and second segments) as lists; errors for none, a count mismatch, an empty text."""
    if isinstance(texts, str):
        texts = [texts]
        pairs = [pairs] if isinstance(pairs, str) else pairs
    texts = list(texts)
    if not texts:
        raise ValueError("encode() got no texts")
    if pairs is not None and len(pairs) != len(texts):
        raise ValueError(f"encode() got {len(texts)} texts but {len(pairs)} second segments")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"text {i} is empty ({t!r}); every example needs at least one word")
    return texts, pairs


def _packed(tokenizer, texts, pairs, pack, *, max_length, truncation) -> dict:
    if pack is not True and (isinstance(pack, bool) or not isinstance(pack, int) or pack < 1):
        raise ValueError(f"pack must be True or a row length >= 1, got {pack!r}")
    enc = tokenizer(texts, pairs, padding=False, truncation=truncation, max_length=max_length if truncation else None)
    seqs = [list(ids) for ids in enc["input_ids"]]
    width = sum(len(x) for x in seqs) if pack is True else pack
    for i, x in enumerate(seqs):
        if len(x) > width:
            raise ValueError(f"example {i} is {len(x)} tokens long, more than the packed row length {width}; "
                             "raise pack, or pass truncation=True with max_length <= pack")
    rows, row, used = [], [], 0
    for i, x in enumerate(seqs):  # in order; a new row where the next example does not fit
        if row and used + len(x) > width:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += len(x)
    rows.append(row)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    starts, bounds = [0] * len(seqs), [0]
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            n = len(seqs[i])
            ids[r, at:at + n] = torch.tensor(seqs[i])
            pos[r, at:at + n] = torch.arange(n)
            mask[r, at:at + n] = 1
            starts[i] = r * width + at
            at += n
            bounds.append(r * width + at)
        if at < width:  # the row's padding: a segment of its own in the offsets, masked out as padding
            pos[r, at:] = torch.arange(width - at)
            bounds.append((r + 1) * width)
    cu = torch.tensor(bounds, dtype=torch.int32)
    longest = max(len(x) for x in seqs)
    from transformers import BatchEncoding

    data = {"input_ids": ids, "position_ids": pos, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
            "max_length_q": longest, "max_length_k": longest}
    if not bool(mask.all()):
        data["attention_mask"] = mask
    out = BatchEncoding(data)
    out.example_starts = torch.tensor(starts)  # not a model input: each example's first token, flattened
    return out
