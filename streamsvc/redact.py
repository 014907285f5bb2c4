"""Best-effort redaction of secrets from a program's output.

Every ``env`` value of 8 characters or more is a secret. ``Redactor`` replaces
each occurrence with ``[REDACTED]`` in a stream of text chunks, holding back
the end of a chunk when it could be the start of a secret split across two
chunks. It cannot catch a secret the program transforms (encodes, reverses,
prints one character at a time with other output in between).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MIN_SECRET_LENGTH = 8
MASK = "[REDACTED]"


class Redactor:
    def __init__(self, secrets: Iterable[str]) -> None:
        found = {s for s in secrets if len(s) >= MIN_SECRET_LENGTH}
        self._secrets = sorted(found, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, self._secrets))) if found else None
        self._pending = ""

    def __call__(self, text: str) -> str:
        if self._pattern is None:
            return text
        data = self._pattern.sub(MASK, self._pending + text)
        hold = self._partial_suffix(data)
        self._pending = data[len(data) - hold :] if hold else ""
        return data[: len(data) - hold]

    def flush(self) -> str:
        pending, self._pending = self._pending, ""
        return self._pattern.sub(MASK, pending) if self._pattern else pending

    def _partial_suffix(self, data: str) -> int:
        """Length of the longest end of ``data`` that begins some secret."""
        longest = 0
        for secret in self._secrets:
            for size in range(min(len(secret) - 1, len(data)), longest, -1):
                if data.endswith(secret[:size]):
                    longest = size
                    break
        return longest
