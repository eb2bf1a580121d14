"""CLIP's byte-level BPE tokenizer without torch, for the fast text-query path.

It reads open_clip's own merges file and must give exactly the token ids that open_clip's
`SimpleTokenizer` gives (a test compares them on many texts), so that query vectors from
the numpy text tower equal the ones the torch model makes.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import regex

MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"
MERGE_COUNT = 49152 - 256 - 2
START, END = "<start_of_text>", "<end_of_text>"
END_OF_WORD = "</w>"


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """Each byte as a printable character: printable Latin-1 bytes stand for themselves, the
    rest are moved past 255, so BPE never sees whitespace or control characters.

    The order (printable bytes first) is the order of the vocabulary's first 256 ids.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    moved = (b for b in range(256) if b not in keep)
    alphabet = {b: chr(b) for b in keep}
    alphabet.update({b: chr(256 + n) for n, b in enumerate(moved)})
    return alphabet


def default_merges_path() -> Path:
    """open_clip's merges file, found without importing open_clip (which imports torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip is not installed; it provides the BPE merges file")
    return Path(next(iter(spec.submodule_search_locations))) / MERGES_FILE


@lru_cache(maxsize=4)
def _vocabulary(merges_path: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Token ids, and merge ranks keyed by the merges file's own "first second" lines, read
    once per process; shared, never changed. Keying by the lines as they stand, rather than
    by pairs split from them, halves the time (0.05 against 0.1 CPU-s, part of every cold
    text query): no 48,894 tuples to build."""
    lines = gzip.open(merges_path).read().decode("utf-8").split("\n", MERGE_COUNT + 1)
    merges = lines[1:MERGE_COUNT + 1]
    merged = "\n".join(merges).replace(" ", "").split("\n")  # each merge's token, in one pass
    symbols = list(byte_alphabet().values())
    vocabulary = [*symbols, *(s + END_OF_WORD for s in symbols), *merged, START, END]
    return dict(zip(vocabulary, range(len(vocabulary)))), dict(zip(merges, range(len(merges))))


# Text that ftfy.fix_text returns unchanged: printable ASCII, tabs and newlines, and no "&"
# (ftfy unescapes HTML entities once more than html.unescape twice would). Every fix it makes
# is to other characters: mojibake, curly quotes, control characters, ligatures, line breaks.
_PLAIN = regex.compile(r"[\t\n\x20-\x25\x27-\x7e]*")


def fix_text(text: str) -> str:
    """`ftfy.fix_text`, as open_clip's tokenizer calls it; plain text skips it, so a query
    of plain words never imports ftfy (a twentieth of a second of a cold query)."""
    if _PLAIN.fullmatch(text):
        return text
    import ftfy

    return ftfy.fix_text(text)


class ClipTokenizer:
    """Text -> fixed-length token ids: start token, BPE tokens, end token, zero padding."""

    def __init__(self, merges_path: Path | None = None, context_length: int = 77) -> None:
        self.ids, self.ranks = _vocabulary(merges_path or default_merges_path())
        self.start_id, self.end_id = self.ids[START], self.ids[END]
        self.context_length = context_length
        self.pattern = regex.compile(
            rf"{START}|{END}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
            regex.IGNORECASE)
        self._words: dict[str, list[int]] = {START: [self.start_id], END: [self.end_id]}

    def __call__(self, texts: list[str]) -> np.ndarray:
        """Token ids for each text, (len(texts), context_length), int64."""
        batch = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            tokens = [self.start_id, *self.encode(text), self.end_id][:self.context_length]
            tokens[-1] = self.end_id  # a truncated text still ends with the end token
            batch[row, :len(tokens)] = tokens
        return batch

    def encode(self, text: str) -> list[int]:
        text = " ".join(html.unescape(html.unescape(fix_text(text))).split()).lower()
        alphabet = byte_alphabet()
        ids: list[int] = []
        for piece in self.pattern.findall(text):
            word = "".join(alphabet[b] for b in piece.encode("utf-8"))
            if word not in self._words:
                self._words[word] = [self.ids[part] for part in self._merge(word)]
            ids += self._words[word]
        return ids

    def _merge(self, word: str) -> list[str]:
        """Apply BPE merges, lowest rank first, to one word's characters."""
        parts = [*word[:-1], word[-1] + END_OF_WORD]
        unranked = len(self.ranks)
        while len(parts) > 1:
            pairs = {f"{a} {b}" for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda pair: self.ranks.get(pair, unranked))
            if best not in self.ranks:
                break
            first, second = best.split(" ")
            merged: list[str] = []
            index = 0
            while index < len(parts):
                if index + 1 < len(parts) and parts[index] == first and parts[index + 1] == second:
                    merged.append(first + second)
                    index += 2
                else:
                    merged.append(parts[index])
                    index += 1
            parts = merged
        return parts
