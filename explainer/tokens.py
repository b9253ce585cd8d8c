"""Words <-> tokens of a prompt.

The text encoder sees tokens (BPE pieces such as "bicy", "cle", or T5's sentencepiece pieces such as
"▁bicy", "cle"); people see words ("bicycle"). A ``PromptTokens`` keeps both: every word with the
token positions it covers, and the special positions (start, end, padding) that the per-token views
leave out but can show on request. Each model family tokenises (``Family.tokenize``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Word:
    """One word of the prompt and the positions of its pieces in the encoder's input."""

    text: str
    positions: tuple[int, ...]
    pieces: tuple[str, ...]


@dataclass(frozen=True)
class PromptTokens:
    """A tokenised prompt.

    Attributes:
        words: the prompt's words, each joined from its BPE pieces, in order.
        ids: the encoder's input ids (padded to ``max_length``).
        start_position: position of the start token (0); None for an encoder without one (T5, whose
            first piece is at position 0).
        end_position: position of the first end token.
        max_length: the text encoder's limit, special tokens included.
        truncated: the part of the prompt that did not fit, "" when nothing was cut.
    """

    words: tuple[Word, ...]
    ids: tuple[int, ...]
    start_position: int | None
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

    @property
    def has_start(self) -> bool:
        return self.start_position is not None

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
        kept = self.max_length - (2 if self.has_start else 1)  # the start and end tokens take their places
        cut = self.truncated if len(self.truncated) <= 40 else self.truncated[:40] + "…"
        return (
            f"The prompt is longer than the text encoder's limit of {kept} tokens; "
            f"everything from {cut!r} on was cut and has no effect."
        )

    def to_dict(self) -> dict:
        return asdict(self)
