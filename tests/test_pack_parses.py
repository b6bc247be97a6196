"""studies/pack_parses.py: a packed parse cache serves the same parses without spaCy."""

import importlib.util
import lzma
import sqlite3
from pathlib import Path

from sparseattn.text.parse import ParseCache, ParsedText

ROOT = Path(__file__).resolve().parents[1]


def test_packed_cache_serves_the_same_parses_without_a_parser(tmp_path):
    spec = importlib.util.spec_from_file_location("pack_parses", ROOT / "studies" / "pack_parses.py")
    pack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack)
    full = ParseCache(tmp_path / "full.sqlite", parser=None, pipeline="some_pipeline")
    texts = ["the cat sat .", "a dog ran home quickly ."]
    parses = [ParsedText.from_json('[[0, 4, 8, 12], [3, 7, 11, 13], ["the", "cat", "sat", "."], '
                                   '["the", "cat", "sit", "."], [1, 2, 2, 2], true]'),
              ParsedText.from_json('[[0, 2, 6, 10, 15, 23], [1, 5, 9, 14, 22, 24], ["a", "dog", "ran", "home", '
                                   '"quickly", "."], ["a", "dog", "run", "home", "quickly", "."], [1, 2, 2, 2, 2, 2], '
                                   'true]')]
    full._db.executemany("INSERT INTO parses VALUES (?, ?, ?, ?)",
                         [(full._key(t), "some_pipeline", t, p.to_json()) for t, p in zip(texts, parses)])
    full._db.commit()
    assert pack.main([str(tmp_path / "full.sqlite"), str(tmp_path / "packed.sqlite.xz")]) == 0
    (tmp_path / "there").mkdir()
    (tmp_path / "there" / "parses.sqlite").write_bytes(lzma.open(tmp_path / "packed.sqlite.xz").read())
    assert sqlite3.connect(tmp_path / "there" / "parses.sqlite").execute("SELECT text FROM parses").fetchall() == \
        [("",), ("",)]
    there = ParseCache(tmp_path / "there" / "parses.sqlite", parser=None, pipeline="some_pipeline")
    assert [p.to_json() for p in there.parse_many(texts)] == [p.to_json() for p in parses]
