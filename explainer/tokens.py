"""Words <-> BPE tokens of a prompt.

The text encoder sees BPE pieces ("bicy", "cle</w>"); people see words ("bicycle"). A
``PromptTokens`` keeps both: every word with the token positions it covers, and the special
positions (start, end, padding) that the per-token views leave out but can show on request.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

_WORD_END = "</w>"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible table from bytes to printable characters (its BPE works on these)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


_UNICODE_TO_BYTE = {char: byte for byte, char in bytes_to_unicode().items()}


def pieces_to_text(pieces: list[str]) -> str:
    """Readable text of BPE pieces: word ends become spaces, byte characters become UTF-8 again."""
    data = bytearray()
    for piece in pieces:
        word_ends = piece.endswith(_WORD_END)
        body = piece[: -len(_WORD_END)] if word_ends else piece
        data += bytes(_UNICODE_TO_BYTE.get(char, ord("?")) for char in body)
        if word_ends:
            data += b" "
    return data.decode("utf-8", errors="replace").strip()


@dataclass(frozen=True)
class Word:
    """One word of the prompt and the positions of its BPE pieces in the encoder's input."""

    text: str
    positions: tuple[int, ...]
    pieces: tuple[str, ...]


@dataclass(frozen=True)
class PromptTokens:
    """A tokenised prompt.

    Attributes:
        words: the prompt's words, each joined from its BPE pieces, in order.
        ids: the encoder's input ids (padded to ``max_length``).
        start_position: position of the start token (0).
        end_position: position of the first end token.
        max_length: the text encoder's limit, special tokens included.
        truncated: the part of the prompt that did not fit, "" when nothing was cut.
    """

    words: tuple[Word, ...]
    ids: tuple[int, ...]
    start_position: int
    end_position: int
    max_length: int
    truncated: str = ""

    @property
    def word_texts(self) -> list[str]:
        return [word.text for word in self.words]

    @property
    def stored_positions(self) -> int:
        """Positions 0..end (start, pieces, end); padding is stored as one extra summed row."""
        return self.end_position + 1

    def find(self, text: str) -> int:
        """Index of the word ``text`` in ``words`` (case-insensitive); ValueError naming the words."""
        wanted = text.strip().lower()
        for index, word in enumerate(self.words):
            if word.text.lower() == wanted:
                return index
        known = ", ".join(repr(w) for w in self.word_texts) or "(none)"
        raise ValueError(f"The word {text!r} is not in the prompt. Its words are: {known}.")

    @property
    def truncation_message(self) -> str:
        if not self.truncated:
            return ""
        kept = self.max_length - 2
        cut = self.truncated if len(self.truncated) <= 40 else self.truncated[:40] + "…"
        return (
            f"The prompt is longer than the text encoder's limit of {kept} tokens; "
            f"everything from {cut!r} on was cut and has no effect."
        )

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize(tokenizer, prompt: str) -> PromptTokens:
    """Tokenise ``prompt`` as the pipeline does, and group the BPE pieces into words."""
    max_length = tokenizer.model_max_length
    ids = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True).input_ids
    full = tokenizer(prompt, truncation=False, verbose=False).input_ids
    pieces = tokenizer.convert_ids_to_tokens(ids)
    end_position = ids.index(tokenizer.eos_token_id, 1)
    words = _join_pieces(pieces[1:end_position], offset=1)
    truncated = ""
    if len(full) > max_length:
        cut_pieces = tokenizer.convert_ids_to_tokens(full[max_length - 1 : -1])
        truncated = pieces_to_text(cut_pieces)
    return PromptTokens(
        words=tuple(words),
        ids=tuple(ids),
        start_position=0,
        end_position=end_position,
        max_length=max_length,
        truncated=truncated,
    )


def _join_pieces(pieces: list[str], offset: int) -> list[Word]:
    """Join BPE pieces into words: a word ends at a piece ending in ``</w>``."""
    words, current, positions = [], [], []
    for position, piece in enumerate(pieces, start=offset):
        current.append(piece)
        positions.append(position)
        if piece.endswith(_WORD_END):
            words.append(Word(pieces_to_text(current), tuple(positions), tuple(current)))
            current, positions = [], []
    if current:  # a word cut by truncation has no </w> piece
        words.append(Word(pieces_to_text(current), tuple(positions), tuple(current)))
    return words
