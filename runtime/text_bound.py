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

ftfy's cost is per line (about 65 us each here), so a text of many empty lines costs more than
its bytes suggest. Lines of ASCII whitespace and control characters only are dropped first: ftfy
turns each into whitespace ending in its ``\n`` (control characters removed, ``\r`` made a line
break), which the cleanup then collapses into the break before them, so the cleaned text is the
same.
"""

from __future__ import annotations

import re
from typing import Callable

FIRST_REACH = 2048  # characters looked at first; doubled while the cleaned lines are too short
# every line after a line break that holds only ASCII whitespace or control characters
_BLANK_LINES = re.compile(r"(?<=\n)(?:[\x00-\x09\x0b-\x20\x7f]*\n)+")


def clean_enough(text: str, clean: Callable[[str], str], enough: Callable[[str], bool] | None,
                 reach: int = FIRST_REACH) -> str:
    """``clean(text)``, or ``clean`` of the first whole lines of ``text`` when ``enough`` says their
    cleaned form already fills the context (its tokens then start the whole text's tokens);
    ``enough=None``: the whole text, blank lines dropped."""
    if "\n" in text:
        text = _BLANK_LINES.sub("", text)
    done = 0  # characters already found too few
    while enough is not None and len(text) > reach:
        cut = text.rfind("\n", 0, reach) + 1  # the end of the last whole line within reach
        if cut == 0:
            cut = text.find("\n", reach) + 1  # the first line is longer: all of it
        if cut == 0 or cut >= len(text):
            break
        if cut > done:
            cleaned = clean(text[:cut])
            if enough(cleaned):
                return cleaned
            done = cut
        reach = max(2 * reach, cut + 1)
    return clean(text)
