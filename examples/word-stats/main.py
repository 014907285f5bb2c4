"""word-stats: word counts of ``configuration.text``, told in words by ``humanize``."""

import collections
import sys
from typing import Any

import humanize


def run(context: dict[str, Any]) -> dict[str, Any]:
    text = context["connector"]["configuration"]["text"]
    words = text.split()
    counts = collections.Counter(words)
    word, times = counts.most_common(1)[0]
    print(f"{humanize.apnumber(len(words))} words, {len(counts)} distinct")
    print(f"read {humanize.naturalsize(len(text.encode()))}", file=sys.stderr)
    return {
        "words": len(words),
        "distinct": len(counts),
        "most_common": {"word": word, "times": times, "ordinal": humanize.ordinal(times)},
        "summary": f"{humanize.apnumber(times)} times: {word}",
    }
