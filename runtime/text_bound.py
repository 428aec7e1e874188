"""Clean only as much of a long text query as its kept tokens need. No torch.

A text tower keeps the first context-length tokens, so cleaning (ftfy, HTML unescaping) and
splitting a 500 KB query whole is wasted work a client can ask for 64 times per request.
:func:`clean_enough` cleans the shortest run of *whole lines* that already yields more tokens
than the context keeps, doubling the run until it does (or the whole text was cleaned).

Why whole lines make it exact: ftfy fixes a text line by line (``ftfy.fix_text`` cuts it into
segments after each ``\\n`` and fixes each alone; its ``<`` check only changes the segments
after it), HTML character references never contain a line break, and the rest of the cleanup
(whitespace collapsed, case, punctuation) and the tokenizer's split work within whitespace-
separated pieces. So the cleaned lines are the start of the whole cleaned text, cut at a word
boundary, and their tokens are the start of its tokens (tests/test_serve_limits.py checks it
against cleaning everything). A text with no line break inside the reach is cleaned whole: the
server's per-text byte cap bounds that work.
"""

from __future__ import annotations

from typing import Callable

FIRST_REACH = 2048  # characters looked at first; doubled while the cleaned lines are too short


def clean_enough(text: str, clean: Callable[[str], str], enough: Callable[[str], bool],
                 reach: int = FIRST_REACH) -> str:
    """``clean(text)``, or ``clean`` of the first whole lines of ``text`` when ``enough`` says their
    cleaned form already fills the context (its tokens then start the whole text's tokens)."""
    while len(text) > reach:
        cut = text.rfind("\n", 0, reach) + 1  # the end of the last whole line within reach
        if cut == 0:
            cut = text.find("\n", reach) + 1  # the first line is longer: all of it
        if cut == 0 or cut >= len(text):
            break
        cleaned = clean(text[:cut])
        if enough(cleaned):
            return cleaned
        reach = 2 * cut
    return clean(text)
