"""Best-effort redaction of secrets from a program's output.

Every ``env`` value of 8 characters or more is a secret; so is its JSON-escaped
form when that differs (a program that prints ``json.dumps(config)``).
``Redactor`` replaces each occurrence with ``[REDACTED]`` in a stream of text
chunks. It holds back the end of a chunk when that end could be the start of
a secret split across two writes, and releases it as soon as the next chunk
shows it is not (or at ``flush``), so live output is delayed only by a
possible secret prefix. It cannot catch a secret the program transforms
(encodes, reverses, prints one character at a time with other output in
between).

Cost is bounded, whatever the secrets and the output: occurrences are found
with ``str.find`` (linear), and per chunk each secret is examined only over
its own length plus the new text. When deciding how much to hold back would
take too many comparisons (highly repetitive secrets and output), it holds
back more rather than less: never a leak, at worst a later release.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

MIN_SECRET_LENGTH = 8
MASK = "[REDACTED]"
#: Held-back candidates verified per secret and chunk before holding back conservatively.
_MAX_CHECKS = 4


def secret_forms(values: Iterable[str]) -> list[str]:
    """The strings to redact for these values: each one and its JSON-escaped forms."""
    found: set[str] = set()
    for value in values:
        if len(value) < MIN_SECRET_LENGTH:
            continue
        found.add(value)
        found.add(json.dumps(value)[1:-1])
        found.add(json.dumps(value, ensure_ascii=False)[1:-1])
    return sorted(found, key=len, reverse=True)


class Redactor:
    """Redacts one stream, chunk by chunk; ``flush`` at its end."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = secret_forms(secrets)
        self._pending = ""

    def __call__(self, text: str) -> str:
        if not self._secrets:
            return text
        data = self._redact(self._pending, text)
        hold = max((_partial_suffix(data, secret) for secret in self._secrets), default=0)
        self._pending = data[len(data) - hold :] if hold else ""
        return data[: len(data) - hold]

    def flush(self) -> str:
        pending, self._pending = self._pending, ""
        return self._redact("", pending) if self._secrets else pending

    def _redact(self, pending: str, text: str) -> str:
        """``pending + text`` with every secret masked.

        ``pending`` holds no whole secret, so an occurrence must end inside
        ``text``: each secret is searched only from ``len(secret) - 1``
        characters before it.
        """
        data = pending + text
        for secret in self._secrets:
            start = max(0, len(pending) - len(secret) + 1)
            found = data.find(secret, start)
            if found != -1:
                data = data[:found] + data[found:].replace(secret, MASK)
        return data


def _partial_suffix(data: str, secret: str) -> int:
    """Length of the longest end of ``data`` that begins ``secret`` (an upper bound).

    Candidates are the positions, within the last ``len(secret) - 1``
    characters, holding the secret's first character, leftmost (longest)
    first. After ``_MAX_CHECKS`` failed checks the next candidate is taken
    without checking: holding back too much is safe.
    """
    position = data.find(secret[0], max(0, len(data) - len(secret) + 1))
    checks = 0
    while position != -1:
        if checks == _MAX_CHECKS or secret.startswith(data[position:]):
            return len(data) - position
        checks += 1
        position = data.find(secret[0], position + 1)
    return 0
