"""Spanish-English Bible corpus from the SWORD modules of Debian's sword-text-sparv and sword-text-web.

Reads the Reina-Valera 1909 (spaRV1909eb) and the World English Bible (engWEB2015eb) verse by verse
with pysword and cleans the raw OSIS markup itself: footnotes, cross references and editorial
headings go without joining the words around them (canonical psalm titles, which the Spanish
text also carries, stay); the glossary that the WEB module appends to Revelation 22:21 and the
subscriptions after Paul's letters in the RV1909 are cut; quotes and whitespace are normalised.
Verses are paired per book by reference and length, which repairs the stretches where the two
modules number verses differently; verses empty on either side or without a partner are dropped
and counted. The split is by book:

    test  John, Proverbs
    dev   Ruth, Jonah, James, Titus
    train every other book of the Protestant canon

    python data_scripts/bible.py [--out data/bible-es-en]
"""

from __future__ import annotations

import argparse
import functools
import html
import math
import os
import re
import sys
import unicodedata
from collections import Counter
from typing import Any

from nmt.corpus import CorpusError, FilterStats, filter_pairs, write_corpus

SRC_MODULE, TGT_MODULE = "spaRV1909eb", "engWEB2015eb"
SRC_LANG, TGT_LANG = "es", "en"
DEBIAN_PACKAGES = "sword-text-sparv sword-text-web"
SPLIT_BOOKS = {"test": ("John", "Prov"), "dev": ("Ruth", "Jonah", "Jas", "Titus")}  # OSIS ids
SWORD_PATHS = ("~/.sword", "/usr/share/sword", "/usr/local/share/sword")
Key = tuple[str, int, int]  # (OSIS book id, chapter, verse)

# --- OSIS markup ---------------------------------------------------------------------------------

# Everything from the start of the WEB glossary on (it hangs off the last verse of Revelation).
_GLOSSARY = re.compile(r'<div\b[^>]*\btype="glossary".*', re.S)
# Elements dropped with their content: notes (footnotes, cross references, with nested markup),
# editorial headings (titles that are not canonical) and the speaker labels of the Song of Songs.
_DROP_ELEMENTS = [
    re.compile(r"<note\b[^>]*/>|<note\b[^>]*>.*?</note>", re.S),
    re.compile(r'<title\b(?![^>]*canonical="true")[^>]*>.*?</title>', re.S),
    re.compile(r"<speaker\b[^>]*>.*?</speaker>", re.S),
]
# Inline elements whose tags vanish without a trace (they wrap words or parts of words).
_INLINE = re.compile(
    r"</?(?:w|q|name|seg|hi|divineName|foreign|rdg|catchWord|mentioned|abbr|reference)\b[^>]*>"
)
# Words the translators added (italics in print). In the RV1909 module these tags often sit
# between two words with no space (`engendró</w><transChange>un hijo`) but sometimes inside a
# word (`díjo</w><transChange>le</transChange>`): they become a junction, decided later.
_ADDED = re.compile(r"</?transChange\b[^>]*>")
JUNCTION = "\x00"
_ANY_TAG = re.compile(r"<[^>]*>")  # every other tag separates text: it becomes a space
_SPACE_BEFORE = re.compile(r"\s+([,.;:!?)\]”’»])")
_SPACE_AFTER = re.compile(r"([(\[“‘¿¡«])\s+")
_QUOTES = str.maketrans({"“": '"', "”": '"', "„": '"', "«": '"', "»": '"', "‘": "'", "’": "'"})
_WORD = re.compile(r"\w+")
_JOINED = re.compile(r"(\w+)\x00+(?=(\w+))")  # the right part stays for the next junction
_AT_JUNCTION = re.compile(r"\w*\x00+\w*")


def strip_markup(raw: str) -> str:
    """One verse of OSIS markup as text, with JUNCTION where an added-words tag touched text."""
    text = _GLOSSARY.sub("", raw)
    for pattern in _DROP_ELEMENTS:
        text = pattern.sub(" ", text)  # a note between two words must not join them
    text = _INLINE.sub("", text)
    text = _ADDED.sub(JUNCTION, text)
    text = _ANY_TAG.sub(" ", text)
    return html.unescape(text)


def tidy(text: str) -> str:
    """Collapses whitespace, removes spaces inside punctuation and straightens quotes;
    junctions left over become spaces."""
    text = re.sub(r"\s+", " ", text.replace(JUNCTION, " "))
    text = _SPACE_BEFORE.sub(r"\1", text)
    text = _SPACE_AFTER.sub(r"\1", text)
    return text.translate(_QUOTES).strip()


def clean_osis(raw: str) -> str:
    """Plain text of one verse of OSIS markup, words kept apart where notes or tags sat."""
    return tidy(strip_markup(raw))


_PRONOUNS = ("me", "te", "se", "nos", "os", "le", "les", "lo", "los", "la", "las")
ENCLITICS = frozenset(
    _PRONOUNS + tuple(a + b for a in _PRONOUNS[:5] for b in _PRONOUNS[5:])  # díjo|selo
)


def join_words_at_junctions(texts: dict[Key, str]) -> int:
    """Resolves junctions in place; returns how many joined two word parts.

    Only a pronoun attached to a verb is joined (`díjo|le` -> `díjole`, `vengar|le` ->
    `vengarle`): when the joined form is a word found elsewhere, when the left part never stands
    alone (`protésto|lo`), or when it is a lower-case infinitive or imperative (`-r`, `-d`).
    Everything else is two words (`engendró|un hijo`, `Jehová|los`).
    """
    vocabulary: Counter[str] = Counter()  # words away from junctions
    for text in texts.values():
        vocabulary.update(_WORD.findall(_AT_JUNCTION.sub(" ", text)))
    joined = 0

    def join(match: re.Match[str]) -> str:
        nonlocal joined
        left, right = match.group(1), match.group(2)
        verb_form = left[0].islower() and left[-1] in "rd"
        if right in ENCLITICS and (vocabulary[left + right] or not vocabulary[left] or verb_form):
            joined += 1
            return left
        return f"{left} "

    for key, text in texts.items():
        if JUNCTION in text:
            texts[key] = _JOINED.sub(join, text).replace(JUNCTION, "")
    return joined


# --- reading SWORD modules -------------------------------------------------------------------


def find_sword_path(modules: tuple[str, ...], paths: list[str]) -> str:
    """The first SWORD data folder that holds all `modules` (a clear error naming where it looked)."""
    from pysword.modules import SwordModules

    looked = []
    for path in paths:
        path = os.path.expanduser(path)
        if not os.path.isdir(os.path.join(path, "mods.d")):
            looked.append(f"{path} (no mods.d folder)")
            continue
        found = SwordModules(path).parse_modules()
        missing = [m for m in modules if m not in found]
        if not missing:
            return path
        looked.append(f"{path} (has {', '.join(sorted(found)) or 'no modules'})")
    raise CorpusError(
        f"SWORD modules {' and '.join(modules)} not found; looked in: {'; '.join(looked)}. "
        f"Install them with: sudo apt-get install {DEBIAN_PACKAGES}"
    )


def read_module(sword_path: str, module: str, books: set[str] | None = None) -> dict[Key, str]:
    """Raw OSIS text of every verse (of the given OSIS book ids), keyed by (book, chapter, verse)."""
    from pysword.modules import SwordModules

    modules = SwordModules(sword_path)
    modules.parse_modules()
    bible = modules.get_bible_from_module(module)
    if hasattr(bible, "_decompressed_text"):
        # pysword inflates the whole compressed book again for every verse; keep a few books
        bible._decompressed_text = functools.lru_cache(maxsize=4)(bible._decompressed_text)
    verses: dict[Key, str] = {}
    for testament in bible.get_structure().get_books().values():
        for book in testament:
            if books is not None and book.osis_name not in books:
                continue
            for chapter, count in enumerate(book.chapter_lengths, start=1):
                texts = list(bible.get_iter(books=[book.name], chapters=[chapter], clean=False))
                if len(texts) != count:
                    raise CorpusError(
                        f"{module}: {book.osis_name} {chapter} has {len(texts)} verses, "
                        f"its versification says {count}"
                    )
                for verse, text in enumerate(texts, start=1):
                    verses[(book.osis_name, chapter, verse)] = text
    return verses


def book_order(verses: dict[Key, str]) -> list[str]:
    return list(dict.fromkeys(book for book, _, _ in verses))


def fix_chapter_capitals(verses: dict[Key, str]) -> None:
    """Gives the capitalised opening words of chapters (`Y ACONTECIÓ`, `EN el principio`) the
    casing they have most often elsewhere; a word that starts the verse keeps a capital."""
    openings = {key: list(_WORD.finditer(text))[:2] for key, text in verses.items() if key[2] == 1}
    wanted = {m.group(0).lower() for matches in openings.values() for m in matches}
    casings: dict[str, Counter[str]] = {word: Counter() for word in wanted}
    for (_, _, verse), text in verses.items():
        if verse != 1:
            for word in _WORD.findall(text):
                if word.lower() in casings:
                    casings[word.lower()][word] += 1
    for key, matches in openings.items():
        text = verses[key]
        # only the first two words: later capitals are inscriptions (REY DE LOS JUDÍOS)
        for match in reversed(matches):
            word = match.group(0)
            if len(word) < 2 or not word.isupper():
                continue
            seen = casings.get(word.lower())
            form = seen.most_common(1)[0][0] if seen else word.capitalize()
            if not text[: match.start()].strip("¡¿([ "):
                form = form[0].upper() + form[1:]
            text = text[: match.start()] + form + text[match.end() :]
        verses[key] = text


# --- aligning verses -------------------------------------------------------------------------
#
# The two modules number some chapters differently (the RV1909 module follows the Hebrew
# numbering in places: its Jonah 2:1 is the English 1:17), and each leaves out verses the other
# has. Verses are therefore aligned per book, Gale & Church (1993) style, on three kinds of
# evidence: lengths, proper names found on both sides (Ornán/Ornan), and a bonus for pairing
# verses that share a reference. Same-numbered verses pair up wherever the evidence agrees, and a
# shifted stretch re-pairs with its true partners. Verses merged on one side become one pair
# (2-1, 1-2); verses without a partner are dropped and counted.

_BEADS = {(1, 1): 0.89, (1, 0): 0.005, (0, 1): 0.005, (2, 1): 0.045, (1, 2): 0.045}
_BEAD_COST = {bead: -math.log(p) for bead, p in _BEADS.items()}
SAME_REFERENCE_BONUS = math.log(20)  # how much likelier a 1-1 pair with the same reference is
NAME_WEIGHT = 1.0  # cost per proper name on one side only, bonus per name on both
BAND = 8  # how far (in verses) an alignment may stray from the reference numbering
# The most frequent names that the two translations spell differently (after name_key).
_NAME_EQUIVALENTS = {"ieob": "iawe", "dios": "god", "seno": "lord", "mois": "mose"}
_NAME = re.compile(r"(?<=[^.:;?!¿¡\"\s]\s)[A-ZÁÉÍÓÚÑ][a-záéíóúñâêîôûü]{2,}")  # not sentence-initial
_SPELLING = [("ch", "c"), ("th", "t"), ("ph", "f"), ("sh", "s"), ("y", "i"), ("j", "i"), ("h", ""),
             ("k", "c"), ("z", "s"), ("v", "b")]  # fmt: skip


@functools.cache
def name_key(word: str) -> str:
    """A rough spelling-independent key for a proper name: `Ornán`, `Ornan` -> `orna`."""
    word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if c.isascii())
    for old, new in _SPELLING:
        word = word.replace(old, new)
    return re.sub(r"(.)\1", r"\1", word)[:4]


def verse_names(texts: dict[Key, str], equivalents: dict[str, str]) -> dict[Key, frozenset[str]]:
    """The name keys of every verse (capitalised words that do not start a sentence)."""
    return {
        key: frozenset(equivalents.get(k, k) for k in map(name_key, _NAME.findall(text)))
        for key, text in texts.items()
    }


def _length_cost(len_a: int, len_b: int, ratio: float, variance: float = 6.8) -> float:
    """-log P(lengths | translation): Gale & Church (1993), eq. 2-4, for characters."""
    mean = (len_a + len_b / ratio) / 2
    delta = (ratio * len_a - len_b) / math.sqrt(max(mean, 1.0) * variance)
    return -math.log(max(math.erfc(abs(delta) / math.sqrt(2)), 1e-300))


def align_verses(
    src: list[tuple[Key, str, frozenset[str]]],
    tgt: list[tuple[Key, str, frozenset[str]]],
    ratio: float,
) -> list[tuple[list[int], list[int]]]:
    """Aligns two lists of (reference, text, names) verses of one book; returns index beads."""
    n, m = len(src), len(tgt)
    cum_a, cum_b = [0], [0]
    for _, text, _ in src:
        cum_a.append(cum_a[-1] + len(text))
    for _, text, _ in tgt:
        cum_b.append(cum_b[-1] + len(text))
    where_b = {key: j for j, (key, _, _) in enumerate(tgt)}
    centre, last = [], 0
    for key, _, _ in src:  # the target position each source verse is expected near
        last = where_b.get(key, last + 1)
        centre.append(last)
    centre.append(m)

    def bead_cost(i: int, j: int, a: int, b: int) -> float:
        cost = _length_cost(cum_a[i] - cum_a[i - a], cum_b[j] - cum_b[j - b], ratio)
        names_a = src[i - 1][2] if a == 1 else src[i - 2][2] | src[i - 1][2]
        names_b = tgt[j - 1][2] if b == 1 else tgt[j - 2][2] | tgt[j - 1][2]
        if names_a or names_b:
            cost += NAME_WEIGHT * (len(names_a ^ names_b) - len(names_a & names_b))
        if a == b == 1 and src[i - 1][0] == tgt[j - 1][0]:
            cost -= SAME_REFERENCE_BONUS
        return cost

    cost: dict[tuple[int, int], float] = {(0, 0): 0.0}
    back: dict[tuple[int, int], tuple[int, int]] = {}
    for i in range(n + 1):
        for j in range(max(0, centre[i] - BAND), min(m, centre[i] + BAND) + 1):
            best, best_bead = math.inf, None
            for (a, b), prior in _BEAD_COST.items():
                previous = cost.get((i - a, j - b))
                if previous is None:
                    continue
                total = previous + prior + (bead_cost(i, j, a, b) if a and b else 0.0)
                if total < best:
                    best, best_bead = total, (a, b)
            if best_bead is not None:
                cost[(i, j)], back[(i, j)] = best, best_bead
    if (n, m) not in back and (n, m) != (0, 0):
        raise CorpusError("verse alignment failed: the two texts drift too far apart")
    beads = []
    i, j = n, m
    while (i, j) != (0, 0):
        a, b = back[(i, j)]
        beads.append((list(range(i - a, i)), list(range(j - b, j))))
        i, j = i - a, j - b
    return beads[::-1]


# --- the corpus ------------------------------------------------------------------------------

_SUBSCRIPTION = re.compile(r"(Amén\.)\s+[^.]*\b(?:escrita|enviada)\b.*$", re.I)


def drop_subscriptions(verses: dict[Key, str]) -> int:
    """Cuts the RV1909 subscriptions after the last verse of Paul's letters
    (`Amén. Fué escrita de Corinto á los Romanos...`); the WEB has none. Returns how many."""
    last: dict[str, Key] = {}
    for key, text in verses.items():
        if text:
            last[key[0]] = key
    cut = 0
    for key in last.values():
        text = _SUBSCRIPTION.sub(r"\1", verses[key])
        cut += text != verses[key]
        verses[key] = text
    return cut


def split_of(book: str) -> str:
    for split, books in SPLIT_BOOKS.items():
        if book in books:
            return split
    return "train"


def clean_texts(
    src: dict[Key, str], tgt: dict[Key, str]
) -> tuple[dict[Key, str], dict[Key, str], dict[str, int]]:
    """Both modules as plain text, with counts of the repairs made."""
    src_clean = {key: strip_markup(text) for key, text in src.items()}
    tgt_clean = {key: strip_markup(text) for key, text in tgt.items()}
    joined = join_words_at_junctions(src_clean) + join_words_at_junctions(tgt_clean)
    src_clean = {key: tidy(text) for key, text in src_clean.items()}
    tgt_clean = {key: tidy(text) for key, text in tgt_clean.items()}
    fix_chapter_capitals(src_clean)
    subscriptions = drop_subscriptions(src_clean)
    return (
        src_clean,
        tgt_clean,
        {"words_joined_at_markup": joined, "subscriptions_cut": subscriptions},
    )


def align_books(
    src: dict[Key, str], tgt: dict[Key, str]
) -> tuple[dict[str, list[tuple[str, str]]], Counter[str]]:
    """Aligned verse pairs per split, in canonical order, and counts of what was left out."""
    ratio = sum(map(len, tgt.values())) / max(1, sum(map(len, src.values())))
    names = [verse_names(src, _NAME_EQUIVALENTS), verse_names(tgt, {})]
    # only names seen on both sides are evidence for an alignment
    shared = frozenset().union(*names[0].values()) & frozenset().union(*names[1].values())
    by_book: dict[str, tuple[list[tuple[Key, str, frozenset[str]]], ...]] = {}
    for side, verses in enumerate((src, tgt)):
        for key, text in verses.items():
            by_book.setdefault(key[0], ([], []))[side].append(
                (key, text, names[side][key] & shared)
            )
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "dev": [], "test": []}
    counts: Counter[str] = Counter()
    for book in book_order(src):  # books of the Spanish (Protestant) canon
        a = [verse for verse in by_book[book][0] if verse[1]]
        b = [verse for verse in by_book[book][1] if verse[1]]
        counts[f"empty_{SRC_LANG}"] += len(by_book[book][0]) - len(a)
        counts[f"empty_{TGT_LANG}"] += len(by_book[book][1]) - len(b)
        for ia, ib in align_verses(a, b, ratio):
            if not ia or not ib:
                counts[f"unaligned_{SRC_LANG}" if ia else f"unaligned_{TGT_LANG}"] += 1
                continue
            if len(ia) > 1 or len(ib) > 1:
                counts["merged"] += 1
            elif a[ia[0]][0] != b[ib[0]][0]:
                counts["renumbered"] += 1
            pair = (" ".join(a[x][1] for x in ia), " ".join(b[y][1] for y in ib))
            splits[split_of(book)].append(pair)
    return splits, counts


def build_pairs(
    src: dict[Key, str], tgt: dict[Key, str]
) -> tuple[dict[str, list[tuple[str, str]]], dict[str, Any]]:
    """Verse pairs per split (in canonical order) and a report of what was changed or left out."""
    src_clean, tgt_clean, repairs = clean_texts(src, tgt)
    splits, counts = align_books(src_clean, tgt_clean)
    stats = FilterStats()
    for name, pairs in splits.items():  # NFC and whitespace; nothing is empty by now
        splits[name] = list(filter_pairs(pairs, stats))
    langs = (SRC_LANG, TGT_LANG)
    report = {
        "verses": {SRC_MODULE: len(src), TGT_MODULE: len(tgt)},
        "books_only_in_tgt": sorted({k[0] for k in tgt} - {k[0] for k in src}),
        **repairs,
        "empty_verses": {lang: counts[f"empty_{lang}"] for lang in langs},
        "unaligned_verses_dropped": {lang: counts[f"unaligned_{lang}"] for lang in langs},
        "merged_pairs": counts["merged"],
        "renumbered_pairs": counts["renumbered"],
        "empty_pairs_dropped": stats.total_dropped,
    }
    return splits, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/bible-es-en", help="output folder")
    parser.add_argument(
        "--sword-path",
        action="append",
        help="SWORD data folder (repeatable); default: $SWORD_PATH, " + ", ".join(SWORD_PATHS),
    )
    args = parser.parse_args(argv)
    paths = args.sword_path or [p for p in [os.environ.get("SWORD_PATH")] if p] + list(SWORD_PATHS)
    try:
        sword_path = find_sword_path((SRC_MODULE, TGT_MODULE), paths)
        print(f"reading {SRC_MODULE} and {TGT_MODULE} from {sword_path}", flush=True)
        src, tgt = read_module(sword_path, SRC_MODULE), read_module(sword_path, TGT_MODULE)
        splits, report = build_pairs(src, tgt)
        manifest = write_corpus(
            args.out,
            splits,
            SRC_LANG,
            TGT_LANG,
            source=f"SWORD modules {SRC_MODULE} (Reina-Valera 1909) and {TGT_MODULE} "
            f"(World English Bible), Debian packages {DEBIAN_PACKAGES}; public domain",
            filters={
                "markup": "OSIS tags, notes, non-canonical titles, the WEB glossary and the "
                "RV1909 subscriptions removed",
                "normalised": "NFC, whitespace, curly quotes to straight quotes",
                "alignment": "per book by verse reference, length and shared proper names (Gale & Church)",
                **report,
            },
            extra={
                "split_by_book": {**{k: list(v) for k, v in SPLIT_BOOKS.items()}, "train": "rest"}
            },
        )
    except CorpusError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{name} {n}" for name, n in manifest["splits"].items())
    empty, unaligned = report["empty_verses"], report["unaligned_verses_dropped"]
    print(f"wrote {args.out}: {counts} pairs")
    print(
        f"dropped: empty verses {empty[SRC_LANG]} {SRC_LANG} / {empty[TGT_LANG]} {TGT_LANG}, "
        f"verses without a partner {unaligned[SRC_LANG]} {SRC_LANG} / "
        f"{unaligned[TGT_LANG]} {TGT_LANG}"
    )
    print(
        f"aligned: {report['renumbered_pairs']} pairs across different verse numbers, "
        f"{report['merged_pairs']} merged pairs; {report['words_joined_at_markup']} words "
        f"rejoined at markup, {report['subscriptions_cut']} subscriptions cut"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
