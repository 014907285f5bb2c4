"""hello: greets ``configuration.who``; ``text/greeting.py`` builds the sentence."""

from text.greeting import greeting


def run(context):
    configuration = context["connector"]["configuration"]
    sentence = greeting(configuration["who"], configuration.get("punctuation", "."))
    print(sentence)
    return {"greeting": sentence}
