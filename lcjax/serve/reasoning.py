"""Reasoning separation: text inside `<longcat_think>...</longcat_think>` -> `reasoning_content`.

The markers are the ones vLLM's LongCat reasoning parser splits on. One reasoning block is
recognised: text before `<longcat_think>` is content, text inside is reasoning, everything after
`</longcat_think>` is content (a later opening tag is plain content). When the chat template
itself opens the block (the rendered prompt ends with `<longcat_think>`), the output starts
inside it. An output that ends inside the block (cut by max_tokens) is all reasoning.

`ReasoningSplitter` works on a stream of text pieces: it holds back a trailing piece that could
still become a tag, so no tag text leaks into either field.
"""

from __future__ import annotations

from typing import Optional

THINK_START, THINK_END = "<longcat_think>", "</longcat_think>"


def held_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (text that may
    become the tag once more arrives)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def prompt_opens_reasoning(prompt_text: str) -> bool:
    """True when the rendered prompt leaves the model inside a reasoning block."""
    tail = prompt_text.rstrip()
    return tail.endswith(THINK_START)


def tag_token_id(tokenizer, tag: str) -> Optional[int]:
    """The id of `tag` when the tokenizer spells it as one token, else None."""
    ids = tokenizer.encode(tag)
    return ids[0] if len(ids) == 1 else None


class ReasoningSplitter:
    """Splits streamed output text into (reasoning, content) pieces."""

    def __init__(self, starts_in_reasoning: bool = False):
        self.state = "reasoning" if starts_in_reasoning else "before"  # before | reasoning | after
        self._buffer = ""

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) that `text` completes; a possible partial tag is held back."""
        self._buffer += text
        reasoning, content = [], []
        while True:
            if self.state == "after":
                content.append(self._buffer)
                self._buffer = ""
                break
            tag = THINK_START if self.state == "before" else THINK_END
            out = content if self.state == "before" else reasoning
            at = self._buffer.find(tag)
            if at < 0:
                keep = held_suffix(self._buffer, tag)
                out.append(self._buffer[:len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep:]
                break
            out.append(self._buffer[:at])
            self._buffer = self._buffer[at + len(tag):]
            self.state = "reasoning" if self.state == "before" else "after"
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """Flush what was held back (the output ended)."""
        rest, self._buffer = self._buffer, ""
        return (rest, "") if self.state == "reasoning" else ("", rest)


def split_reasoning(text: str, starts_in_reasoning: bool = False) -> tuple[Optional[str], str]:
    """(reasoning or None when there was no reasoning block, content) of a whole output."""
    splitter = ReasoningSplitter(starts_in_reasoning)
    r1, c1 = splitter.feed(text)
    r2, c2 = splitter.finish()
    had_block = starts_in_reasoning or splitter.state != "before"
    return (r1 + r2 if had_block else None), c1 + c2
