"""Pack a parse cache small enough to carry to a GPU machine without spaCy (the device tool's 64 MiB).

The cache keeps each text beside its parse; lookups use only the key (a hash of pipeline and text), so
the copy drops the texts and is xz-compressed: GLUE's five study tasks (train + dev, 102k texts) go from
61 MB to 8 MB. Unpack there with `xz -d -c parses.sqlite.xz > $SPARSEATTN_CACHE/parses.sqlite`.

    python studies/pack_parses.py ~/.cache/sparseattn/parses.sqlite .runs/parses.sqlite.xz
"""

import argparse
import lzma
import sqlite3
import tempfile
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache", help="the parse cache (SQLite) written by `sparseattn parse`")
    p.add_argument("out", help="the packed copy, e.g. parses.sqlite.xz")
    args = p.parse_args(argv)
    src = sqlite3.connect(f"file:{args.cache}?mode=ro", uri=True)
    with tempfile.TemporaryDirectory() as tmp:
        slim = Path(tmp) / "parses.sqlite"
        dst = sqlite3.connect(slim)
        dst.execute("CREATE TABLE parses (key TEXT PRIMARY KEY, pipeline TEXT, text TEXT, parse TEXT)")
        dst.executemany("INSERT INTO parses VALUES (?, ?, '', ?)", src.execute("SELECT key, pipeline, parse FROM parses"))
        dst.commit()
        n = dst.execute("SELECT COUNT(*) FROM parses").fetchone()[0]
        dst.execute("VACUUM")
        dst.close()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(slim, "rb") as f, lzma.open(args.out, "wb", preset=9 | lzma.PRESET_EXTREME) as g:
            while chunk := f.read(1 << 20):
                g.write(chunk)
    print(f"{n} parses -> {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
