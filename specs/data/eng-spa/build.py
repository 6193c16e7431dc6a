#!/usr/bin/env python3
"""Builds eng-spa.tsv: short real English sentences and their Spanish translations.

The English side is sentences cut from Debian's `fortunes` and `fortunes-min` packages (the
fortune cookie files: quotations, proverbs, jokes); the Spanish side is what Debian's
`apertium-eng-spa` (Apertium's rule-based English→Spanish engine) makes of each. Kept: sentences
of 3 to 9 words of plain letters, ending in `.`, `!` or `?`, that Apertium translates without an
unknown or ungenerated word (it marks those with `*`, `#` or `@`). One pair per line, tab
between; the order is fixed (sorted, then shuffled with a fixed seed) so the file is the same on
every machine with the same package versions.

    apt-get install apertium apertium-eng-spa fortunes fortunes-min
    python3 specs/data/eng-spa/build.py
"""

import random
import re
import subprocess
import sys
from pathlib import Path

FORTUNES = Path("/usr/share/games/fortunes")
OUT = Path(__file__).resolve().parent / "eng-spa.tsv"
WORD = re.compile(r"^[A-Za-z][a-z']*[,;]?$")


def sentences(text):
    for cookie in text.split("\n%\n"):
        # Attributions and indented verse are not prose.
        lines = [l.strip() for l in cookie.splitlines() if l.strip() and not l.lstrip().startswith(("--", "-"))]
        prose = " ".join(lines)
        for s in re.split(r"(?<=[.!?])\s+", prose):
            words = s[:-1].split() if s and s[-1] in ".!?" else []
            if 3 <= len(words) <= 9 and all(WORD.match(w) for w in words):
                yield " ".join(words) + s[-1]


def main():
    english = set()
    for path in sorted(FORTUNES.iterdir()):
        if path.is_file() and not path.suffix and path.name != "off":
            english.update(sentences(path.read_text(encoding="utf-8", errors="replace")))
    english = sorted(english)
    # Apertium translates line by line; a marker line keeps the output aligned.
    joined = "\n".join(english) + "\n"
    out = subprocess.run(["apertium", "eng-spa"], input=joined, capture_output=True, text=True, check=True).stdout
    spanish = out.rstrip("\n").split("\n")
    if len(spanish) != len(english):
        sys.exit(f"apertium returned {len(spanish)} lines for {len(english)}")
    pairs = [(e, s.strip()) for e, s in zip(english, spanish) if not re.search(r"[*#@]", s) and s.strip()]
    random.Random(20261202).shuffle(pairs)
    OUT.write_text("".join(f"{e}\t{s}\n" for e, s in pairs), encoding="utf-8")
    print(f"{len(pairs)} pairs of {len(english)} English sentences -> {OUT}")


if __name__ == "__main__":
    main()
