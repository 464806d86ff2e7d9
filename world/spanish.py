"""The shapes world in Spanish: the fixed grammar of `shared/design.md` ("Spanish (speech translation)").

`to_spanish` maps every sentence and caption the world writes (`grammar.random_sentence`, `grammar.caption`,
`grammar.motion_caption`, and so the sentences of the text corpus and the speech transcripts) to one exact
Spanish reference, word by word and rule by rule; anything else raises ValueError naming the sentence and the
word not understood, never a guess.

Words: red rojo, green verde, blue azul, yellow amarillo, purple morado, orange naranja; circle círculo, square
cuadrado, triangle triángulo; small pequeño, large grande; (directions) left a la izquierda, right a la derecha,
up hacia arriba, down hacia abajo; (relations) left of a la izquierda de, right of a la derecha de, above
encima de, below debajo de. Every shape is masculine and singular, so the adjectives keep these forms.

Noun phrases: article + shape + colour + size, each adjective only where the English has it:
`a large red circle` -> `un círculo rojo grande`, `an orange square` -> `un cuadrado naranja`,
`the circle` -> `el círculo`, `the small circle` -> `el círculo pequeño`, `the red circle` -> `el círculo rojo`.
The English adjectives come in the world's order (size, then colour), and `an` stands exactly before a vowel.

Sentences (the final full stop is kept when the English has one, so captions stay without it):
- `there is NP.` -> `hay NP.`; `i see NP.` -> `veo NP.`
- `NP is {colour}.` -> `NP es {colour}.` (e.g. `the {size} {shape} is {colour}.` -> `el {shape} {size} es
  {colour}.`); the same for a size: `NP is {size}.` -> `NP es {size}.`
- `NP moves {dir}.` -> `NP se mueve {dir}.` (`a red circle moves left` -> `un círculo rojo se mueve a la
  izquierda`)
- `NP1 is {relation} NP2.` -> `NP1 está {relation} NP2.`; before a definite NP2, `de el` contracts to `del` as
  Spanish writes it (`... a la izquierda del cuadrado.`; the world's own relations have an indefinite NP2).
- `NP1 and NP2.` -> `NP1 y NP2.` (each `and` -> `y`; also after `there is` and `i see`).

Not in the world, so refused: plurals and numbers (`two circles`), questions, capitals, other words or orders.

`translation_line` is the text corpus's parallel line, `{english} {AST_PROMPT}{spanish}`: the layout of the
corpus's repeat lines (`{english} {ASR_PROMPT}{english}`) with the Spanish as the target. The speech stage's
translation sample is the same row with the speech embeddings in the English sentence's place.
"""

from __future__ import annotations

from mm.prompts import AST_PROMPT

__all__ = [
    "COLORS_ES",
    "DIRECTIONS_ES",
    "RELATIONS_ES",
    "SHAPES_ES",
    "SIZES_ES",
    "to_spanish",
    "translation_line",
]

COLORS_ES: dict[str, str] = {
    "red": "rojo",
    "green": "verde",
    "blue": "azul",
    "yellow": "amarillo",
    "purple": "morado",
    "orange": "naranja",
}
SHAPES_ES: dict[str, str] = {"circle": "círculo", "square": "cuadrado", "triangle": "triángulo"}
SIZES_ES: dict[str, str] = {"small": "pequeño", "large": "grande"}
DIRECTIONS_ES: dict[str, str] = {
    "left": "a la izquierda",
    "right": "a la derecha",
    "up": "hacia arriba",
    "down": "hacia abajo",
}
# English relation (one or two words) -> Spanish; each ends in "de", which contracts with a following "el".
RELATIONS_ES: dict[str, str] = {
    "left of": "a la izquierda de",
    "right of": "a la derecha de",
    "above": "encima de",
    "below": "debajo de",
}
_ARTICLES = {"a": "un", "an": "un", "the": "el"}


class _Parser:
    """A left-to-right reader of one English sentence's words, writing the Spanish as it goes."""

    def __init__(self, sentence: str, words: list[str]) -> None:
        self.sentence, self.words, self.pos = sentence, words, 0

    def fail(self, expected: str) -> ValueError:
        """The error for the word at the current position (or the end) when `expected` was wanted."""
        if self.pos < len(self.words):
            what = f"word {self.pos + 1} {self.words[self.pos]!r} is not understood"
        else:
            what = "the sentence ends too early"
        return ValueError(
            f"cannot translate {self.sentence!r} into Spanish: {what}; expected {expected} "
            "(the fixed grammar covers the shapes world's sentences only, see mm.world.spanish)"
        )

    def peek(self, n: int = 0) -> str | None:
        """The word n places ahead, or None past the end."""
        i = self.pos + n
        return self.words[i] if i < len(self.words) else None

    def take(self, table: dict[str, str], expected: str) -> str:
        """Translate the current word by `table` and move on, or raise naming it."""
        word = self.peek()
        if word not in table:
            raise self.fail(expected)
        self.pos += 1
        return table[word]

    def noun_phrase(self) -> str:
        """`a|an|the [size] [colour] shape` -> `un|el shape [colour] [size]`."""
        start, article = self.pos, self.peek()
        es_article = self.take(_ARTICLES, "an article (a, an, the)")
        after = self.peek()  # the first adjective, or the shape
        if article in ("a", "an") and after and (article == "an") != (after[0] in "aeiou"):
            self.pos = start
            right = "an" if article == "a" else "a"
            raise self.fail(f"{right!r} before {after!r} (the world writes 'an' exactly before a vowel)")
        size = self.take(SIZES_ES, "") if self.peek() in SIZES_ES else None
        color = self.take(COLORS_ES, "") if self.peek() in COLORS_ES else None
        shape = self.take(SHAPES_ES, "a shape (circle, square, triangle), after an optional size and colour")
        return " ".join(w for w in (es_article, shape, color, size) if w)

    def noun_phrases(self) -> tuple[str, int]:
        """`NP (and NP)*` -> (`NP (y NP)*`, the number of noun phrases)."""
        parts = [self.noun_phrase()]
        while self.peek() == "and":
            self.pos += 1
            parts.append(self.noun_phrase())
        return " y ".join(parts), len(parts)

    def relation(self) -> str:
        """A spatial relation of one or two words (`left of`, `above`) -> its Spanish."""
        two = f"{self.peek()} {self.peek(1)}"
        if two in RELATIONS_ES:
            self.pos += 2
            return RELATIONS_ES[two]
        return self.take(RELATIONS_ES, "a colour, a size or a relation (left of, right of, above, below)")

    def predicate(self, subject: str) -> str:
        """What follows a single noun phrase: `is {colour|size}`, `is {relation} NP`, `moves {dir}`."""
        verb = self.peek()
        if verb == "moves":
            self.pos += 1
            return f"{subject} se mueve {self.take(DIRECTIONS_ES, 'a direction (left, right, up, down)')}"
        if verb != "is":
            raise self.fail("'is', 'moves', 'and' or the end of the sentence after a noun phrase")
        self.pos += 1
        word = self.peek()
        if word in COLORS_ES or word in SIZES_ES:
            self.pos += 1
            return f"{subject} es {COLORS_ES.get(word) or SIZES_ES[word]}"
        relation = self.relation()
        other = self.noun_phrase()
        if other.startswith("el "):  # de + el -> del
            return f"{subject} está {relation[: -len('de')]}del {other[len('el ') :]}"
        return f"{subject} está {relation} {other}"

    def clause(self) -> str:
        """The whole sentence without its full stop."""
        if self.words[:2] == ["there", "is"]:
            self.pos = 2
            out = "hay " + self.noun_phrases()[0]
        elif self.words[:2] == ["i", "see"]:
            self.pos = 2
            out = "veo " + self.noun_phrases()[0]
        else:
            out, count = self.noun_phrases()
            if count == 1 and self.peek() is not None:
                out = self.predicate(out)
        if self.peek() is not None:
            raise self.fail("the end of the sentence")
        return out


def to_spanish(sentence: str) -> str:
    """The Spanish of a shapes-world sentence or caption by the fixed grammar (module docstring); ValueError if
    the sentence is not one of the world's."""
    if not isinstance(sentence, str):
        raise TypeError(f"to_spanish takes a str, got {type(sentence).__name__}")
    text = sentence.strip()
    stop = text.endswith(".")
    body = text[:-1] if stop else text
    if "." in body:
        raise ValueError(
            f"cannot translate {sentence!r} into Spanish: a full stop before its end (one sentence at a time)"
        )
    words = body.split()
    if not words:
        raise ValueError(f"cannot translate {sentence!r} into Spanish: there is no sentence")
    return _Parser(sentence, words).clause() + ("." if stop else "")


def translation_line(english: str) -> str:
    """The text corpus's parallel line: `{english} {AST_PROMPT}{spanish}` (the repeat lines' layout)."""
    return f"{english} {AST_PROMPT}{to_spanish(english)}"
