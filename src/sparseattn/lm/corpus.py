"""Text for language models: plain-text files read with clear errors, a BPE tokenizer trained on them (cached),
and the token rows a causal LM trains on.

A *corpus* is a folder with ``train/``, ``valid/`` and ``test/`` sub-folders of ``.txt`` files, one document a
file (``../shared/data/books`` is one: ten public-domain books). A run names it by its folder name (``task:
books``); ``corpus_dir`` finds the folder (see there).

    tok = bpe_tokenizer(corpus_files(root, "train"), vocab_size=8192)    # trained once, then read from the cache
    docs = encode_documents(tok, corpus_files(root, "train"))          # one int64 array per file
    rows = cut_rows(docs, context=1024, separator=tok.eos_token_id)    # (N, 1024): documents end to end, EOS between
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..paths import cache_dir

SPLITS = ("train", "valid", "test")
EOS = "<|endoftext|>"
GUTENBERG_START, GUTENBERG_END = "*** START OF", "*** END OF"


def read_text(path) -> str:
    """A text file's contents (Project Gutenberg's header and footer left out where the markers are); an
    empty file, or one of only whitespace, is an error that names it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    text = path.read_text(encoding="utf-8", errors="replace")
    start = text.find(GUTENBERG_START)
    if start >= 0:
        text = text[text.find("\n", start) + 1:]
    end = text.find(GUTENBERG_END)
    if end >= 0:
        text = text[:end]
    if not text.strip():
        raise ValueError(f"{path} is empty: a text file for a language model needs some text")
    return text


def corpus_dir(name: str, glue_dir=None) -> Path:
    """The folder of the corpus ``name``: ``name`` itself when it is a folder; else ``$SPARSEATTN_DATA/<name>``,
    ``<glue_dir or $GLUE_DIR>/../<name>`` (the shared data folder holds glue/ and books/ side by side) or
    ``.bundle/<name>`` (the device bundle), the first that exists."""
    if Path(name).is_dir():
        return Path(name)
    tried = []
    if os.environ.get("SPARSEATTN_DATA"):
        tried.append(Path(os.environ["SPARSEATTN_DATA"]) / name)
    glue = glue_dir or os.environ.get("GLUE_DIR")
    if glue:
        tried.append(Path(glue).resolve().parent / name)
    tried.append(Path(".bundle") / name)
    for p in tried:
        if p.is_dir():
            return p
    raise FileNotFoundError(f"no corpus folder {name!r}: looked in {', '.join(map(str, tried))}; set "
                            "$SPARSEATTN_DATA to the folder that holds it, or give its path")


def corpus_files(root, split: str) -> list[Path]:
    """The ``.txt`` files of a corpus split, sorted by name."""
    if split not in SPLITS:
        raise ValueError(f"a corpus split is one of {', '.join(SPLITS)}, got {split!r}")
    folder = Path(root) / split
    files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{folder} holds no .txt files (a corpus has {'/, '.join(SPLITS)}/ folders of "
                                "text files)")
    return files


def files_digest(files) -> str:
    """A hash of the files' names and contents (what a tokenizer trained on them depends on)."""
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).name.encode() + b"\0" + Path(f).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def bpe_tokenizer(files, vocab_size: int = 8192, *, cache=None):
    """A byte-level BPE tokenizer (``tokenizers``) trained on ``files``, with one special token, EOS (also
    used for padding), as a transformers fast tokenizer. Cached under ``<cache>/lm-tokenizers/<hash of the
    files and vocab_size>``: trained once, then loaded."""
    from transformers import PreTrainedTokenizerFast

    files = [Path(f) for f in files]
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be at least 300 (256 bytes, the special token, some merges), got "
                         f"{vocab_size}")
    folder = Path(cache or cache_dir()) / "lm-tokenizers" / f"bpe{vocab_size}-{files_digest(files)}"
    if (folder / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([read_text(f) for f in files], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   model_max_length=int(1e9))
    tmp = folder.with_name(folder.name + f".partial{os.getpid()}")
    fast.save_pretrained(str(tmp))
    (tmp / "trained_on.json").write_text(json.dumps([f.name for f in files], indent=1) + "\n")
    try:
        os.replace(tmp, folder)
    except OSError:  # another process got there first: use its copy
        pass
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def encode_text(tokenizer, text: str, *, what: str = "text") -> np.ndarray:
    """The token ids of one document (int64), as the tokenizer makes them (a BOS where it adds one)."""
    ids = np.asarray(tokenizer(text, verbose=False)["input_ids"], dtype=np.int64)
    if ids.size == 0:
        raise ValueError(f"{what} has no tokens")
    return ids


def encode_documents(tokenizer, files) -> list[np.ndarray]:
    """Each file's token ids, in order."""
    return [encode_text(tokenizer, read_text(f), what=str(f)) for f in files]


def cut_rows(docs: list[np.ndarray], context: int, separator: int | None) -> torch.Tensor:
    """(N, context) int64: the documents end to end (``separator`` between them, when given) cut into rows of
    ``context`` tokens; the tokens after the last full row are left out. Too little text is an error."""
    if context < 2:
        raise ValueError(f"the context must be at least 2 tokens, got {context}")
    parts = []
    for d in docs:
        parts.append(d)
        if separator is not None:
            parts.append(np.asarray([separator], dtype=np.int64))
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    n = len(flat) // context
    if n == 0:
        raise ValueError(f"{len(flat)} tokens make no row of {context} tokens; give more text or a shorter context")
    return torch.from_numpy(flat[:n * context].reshape(n, context).copy())
