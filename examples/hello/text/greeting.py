"""The greeting's wording."""


def greeting(who: str, punctuation: str) -> str:
    return f"Hello, {who}{punctuation}"
