"""Best-effort redaction of secrets (the ``env`` values ``secret_values`` picks) from output.

``secret_forms`` adds the escaped and ``repr`` forms; ``Redactor`` masks them all in one
Aho-Corasick scan. The rule: linear in the output, holding back only a possible form's start.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Iterable

#: A secret value shorter than this is not redacted (it would mask ordinary text).
MIN_SECRET_LENGTH = 4
MASK = "[REDACTED]"
#: The default rule: an ``env`` name that looks secret (case-insensitive). It contains
#: SECRET, TOKEN, PASSWORD, PASSWD, CREDENTIAL or PRIVATE, or ends in KEY, _PASS, _PWD,
#: _AUTH, _DSN or _COOKIE (``API_KEY``, ``CLIENT_SECRET``, ``DB_PASSWORD``, ``GITHUB_TOKEN``).
SECRET_NAME = re.compile(
    r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|KEY\Z|_(?:PASS|PWD|AUTH|DSN|COOKIE)\Z",
    re.IGNORECASE,
)


def looks_secret(name: str) -> bool:
    """Whether ``name`` falls under the default rule (``SECRET_NAME``)."""
    return SECRET_NAME.search(name) is not None


def secret_values(env: dict[str, str], declared: Iterable[str] = ()) -> list[str]:
    """The values to redact: those of the names in ``declared`` and of names that look
    secret, each of at least ``MIN_SECRET_LENGTH`` characters."""
    named = set(declared)
    return [
        value
        for name, value in env.items()
        if (name in named or looks_secret(name)) and len(value) >= MIN_SECRET_LENGTH
    ]


#: Characters of secret forms kept: past it, the rarest encodings are dropped first.
MAX_FORM_CHARS = 256 * 1024


def _encodings(value: str) -> list[str]:
    return [
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
        repr(value)[1:-1],
        ascii(value)[1:-1],
    ]


def secret_forms(values: Iterable[str]) -> list[str]:
    """The strings to redact for these values, longest first: each value, its
    JSON-escaped and repr forms, and those of its JSON forms (escaped twice)."""
    secrets = [value for value in dict.fromkeys(values) if len(value) >= MIN_SECRET_LENGTH]
    tiers: list[list[str]] = [secrets, [], []]
    for value in secrets:
        first = _encodings(value)
        tiers[1] += first
        for form in dict.fromkeys(first[:2]):
            tiers[2] += _encodings(form)
    found: dict[str, None] = {}
    budget = MAX_FORM_CHARS
    for tier in tiers:
        for form in tier:
            if form not in found and (budget >= len(form) or tier is secrets):
                found[form] = None
                budget -= len(form)
    return sorted(found, key=len, reverse=True)


class _Automaton:
    """Aho-Corasick over the forms: per state its depth, fail link, the longest
    form ending there and the next state on the fail chain that ends a form."""

    def __init__(self, patterns: list[str]) -> None:
        self.goto: list[dict[str, int]] = [{}]
        self.depth = [0]
        self.ends = [0]  # length of the form ending exactly at this state, or 0
        for pattern in patterns:
            state = 0
            for char in pattern:
                nxt = self.goto[state].get(char)
                if nxt is None:
                    nxt = len(self.goto)
                    self.goto[state][char] = nxt
                    self.goto.append({})
                    self.depth.append(self.depth[state] + 1)
                    self.ends.append(0)
                state = nxt
            self.ends[state] = len(pattern)
        count = len(self.goto)
        self.fail = [0] * count
        self.link = [0] * count  # nearest proper suffix state that ends a form
        self.longest = list(self.ends)  # longest form ending at this state
        self.reach = [0] * count  # depth of the deepest suffix state that has children
        queue = deque(self.goto[0].values())
        for child in queue:
            self.reach[child] = 1 if self.goto[child] else 0
        while queue:
            state = queue.popleft()
            for char, child in self.goto[state].items():
                queue.append(child)
                fallback = self.fail[state]
                while fallback and char not in self.goto[fallback]:
                    fallback = self.fail[fallback]
                target = self.goto[fallback].get(char, 0)
                self.fail[child] = target if target != child else 0
                suffix = self.fail[child]
                self.link[child] = suffix if self.ends[suffix] else self.link[suffix]
                if not self.ends[child]:
                    self.longest[child] = self.longest[suffix]
                # how far back a later match may start: a leaf cannot go on
                self.reach[child] = self.depth[child] if self.goto[child] else self.reach[suffix]
        self.shortest = min((len(p) for p in patterns), default=0)
        self.starts = re.compile("[" + "".join(map(re.escape, self.goto[0])) + "]")

    def step(self, state: int, char: str) -> int:
        goto, fail = self.goto, self.fail
        while state and char not in goto[state]:
            state = fail[state]
        return goto[state].get(char, 0)

    def longest_within(self, state: int, limit: int) -> int:
        """The longest form ending at ``state`` no longer than ``limit``, or 0."""
        if limit < self.shortest:
            return 0
        current = state if self.ends[state] else self.link[state]
        while current:
            if self.ends[current] <= limit:
                return self.ends[current]
            current = self.link[current]
        return 0


class Redactor:
    """Redacts one stream, chunk by chunk; ``flush`` at its end.

    Matches are taken left to right, each kept unless it starts inside the
    previous mask (then the longest form ending there after it is taken); a
    match that starts before the previous mask and covers it widens it. With
    one secret that is exactly ``str.replace``.
    """

    def __init__(self, secrets: Iterable[str], *, _automaton: _Automaton | None = None) -> None:
        if _automaton is None:
            forms = secret_forms(secrets)
            _automaton = _Automaton(forms) if forms else None
        self._automaton = _automaton
        self._state = 0
        self._position = 0  # characters scanned
        self._emitted = 0  # characters released (or masked)
        self._held: deque[str] = deque()  # characters scanned, not yet released
        self._masks: list[tuple[int, int]] = []  # pending [start, end), disjoint, in order
        self._last = (0, 0)  # the latest mask, pending or released
        #: How many masks this stream has released so far.
        self.masked = 0

    def sibling(self) -> Redactor:
        """A redactor of the same secrets for another stream (sharing the automaton)."""
        return Redactor((), _automaton=self._automaton)

    def __call__(self, text: str) -> str:
        automaton = self._automaton
        if automaton is None:
            return text
        state, position = self._state, self._position
        step, longest, starts = automaton.step, automaton.longest, automaton.starts
        base = position
        index, size = 0, len(text)
        while index < size:
            if not state:  # at the root: skip to the next character that begins a form
                found = starts.search(text, index)
                if found is None:
                    break
                index = found.start()
            state = step(state, text[index])
            index += 1
            length = longest[state]
            if length:
                self._match(base + index - length, base + index, state)
        position = base + size
        self._held.extend(text)
        self._state, self._position = state, position
        cut = position - automaton.reach[state]
        for start, end in self._masks:
            if start < cut < end:
                cut = start
                break
        return self._release(cut)

    def _match(self, start: int, end: int, state: int) -> None:
        last_start, last_end = self._last
        masks = self._masks
        if start < last_start:  # covers the previous mask: widen it (and any it touches)
            while masks and start < masks[-1][1]:
                start = min(start, masks.pop()[0])
            if start < self._emitted:  # the covered mask was released already
                start = self._emitted
        elif start < last_end:  # inside the previous mask: the longest after it, if any
            assert self._automaton is not None
            length = self._automaton.longest_within(state, end - last_end)
            if not length:
                return
            start = end - length
        if start < self._emitted:
            return
        masks.append((start, end))
        self._last = (start, end)

    def _release(self, cut: int) -> str:
        out: list[str] = []
        held, masks = self._held, self._masks
        done = 0
        for start, end in masks:
            if end > cut:
                break
            out.append("".join(held.popleft() for _ in range(start - self._emitted)))
            for _ in range(end - start):
                held.popleft()
            out.append(MASK)
            self._emitted = end
            done += 1
            self.masked += 1
        del masks[:done]
        out.append("".join(held.popleft() for _ in range(cut - self._emitted)))
        self._emitted = max(self._emitted, cut)
        return "".join(out)

    def flush(self) -> str:
        if self._automaton is None:
            return ""
        text = self._release(self._position)
        self._state = 0
        return text
