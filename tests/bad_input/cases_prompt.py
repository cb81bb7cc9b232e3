"""Task prompt_classification (label words scored by the LM head, data/prompts.py): a bad template, label
words that are not one token, do not match the classes or repeat, and a masked LM without its head."""

from __future__ import annotations

from tests.bad_input.harness import Case, train, with_data

PROMPT = ("task=prompt_classification", "model.name=@GPT2@", "data.label_words=[terrible,great]")

# id, what, extra overrides, phrase
ROWS: list[tuple[str, str, tuple[str, ...], str]] = [
    (
        "multi-token-word",
        "a label word that is several tokens",
        ("data.label_words=[terrible,zzyzxqwv]",),
        "pick a one-token word",
    ),
    (
        "word-count",
        "three label words for two classes",
        ("data.label_words=[bad,good,fine]",),
        "has 3 words for 2 classes",
    ),
    ("empty-word", "an empty label word", ("data.label_words=[bad,' ']",), "is empty"),
    ("repeated-word", "the same word for both classes", ("data.label_words=[good,good]",), "repeats a word"),
    ("no-mask", "a template without {mask}", ("data.template='{text} It was'",), "needs {mask} exactly once"),
    ("no-text", "a template without {text}", ("data.template='It was {mask}'",), "needs {text} exactly once"),
    (
        "unknown-placeholder",
        "a template with an unknown placeholder",
        ("data.template='{text} {review} {mask}'",),
        "unknown placeholder {review}",
    ),
    (
        "text-after-mask",
        "a causal-LM template with text after {mask}",
        ("data.template='{text} It was {mask} .'",),
        "end the template with {mask}",
    ),
    (
        "mlm-without-head",
        "a masked LM whose checkpoint has no MLM head",
        ("model.name=@BERT@",),
        "has no trained masked-LM head",
    ),
]


def _cases() -> list[Case]:
    out = [
        Case(
            id=f"prompt-{cid}",
            family="config",
            what=f"task prompt_classification: {what}",
            argv=train(*PROMPT, *extra),
            phrase=phrase,
            files=with_data(),
        )
        for cid, what, extra, phrase in ROWS
    ]
    out.append(
        Case(
            id="prompt-label-words-other-task",
            family="config",
            what="data.label_words on a classification run",
            argv=train("data.label_words=[bad,good]"),
            phrase="is for task prompt_classification",
            files=with_data(),
        )
    )
    return out


CASES = _cases()
