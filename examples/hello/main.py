"""hello: greets ``configuration.who``; ``text/greeting.py`` builds the sentence."""

from typing import Any

from text.greeting import greeting


def run(context: dict[str, Any]) -> dict[str, Any]:
    configuration = context["connector"]["configuration"]
    sentence = greeting(configuration["who"], configuration.get("punctuation", "."))
    print(sentence)
    return {"greeting": sentence}
