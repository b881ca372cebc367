"""A small language identifier for short replies: counts frequent function words per language.

It only has to tell whether a customer-support reply is in the language asked for, among
languages a base model drifts into; function words separate these well even in one sentence."""

from __future__ import annotations

import re

_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)

# Frequent words that are rare in the other listed languages (shared ones like "a", "de", "en" left out).
STOPWORDS: dict[str, frozenset[str]] = {
    "en": frozenset("the and is are you your we our will for with this that have has be was it of to "
                    "please thank thanks can not order has been".split()),
    "de": frozenset("der die das und ist sind sie ihr ihre ihren ihrem wir unser unsere wird werden wurde mit "
                    "nicht für bitte danke ein eine einen auf zu im am bei ihnen haben hat können uns".split()),
    "es": frozenset("el los las y es son usted su sus nosotros nuestro nuestra será fue con para por favor "
                    "gracias un una está están pedido le lo del al hemos puede".split()),
    "fr": frozenset("le les et est sont vous votre vos nous notre sera été avec pour merci une dans "
                    "pas ce cette au aux commande avons pouvez".split()),
    "it": frozenset("il gli è sono lei suo sua noi nostro sarà stato per grazie uno nel della "
                    "ordine abbiamo può non".split()),
    "pt": frozenset("o os é são você seu nós nosso foi com obrigado obrigada um uma "
                    "não do da".split()),
    "nl": frozenset("het zijn u uw wij ons onze wordt werd met voor niet bedankt dank een bestelling "
                    "hebben kunt".split()),
}
UNKNOWN = "und"  # BCP-47 for "undetermined"


def word_counts(text: str) -> dict[str, int]:
    words = [w.casefold() for w in _WORD.findall(text)]
    return {lang: sum(1 for w in words if w in vocab) for lang, vocab in STOPWORDS.items()}


def detect_language(text: str) -> str:
    """The best-scoring language code, or 'und' when no function word is found or two tie."""
    counts = word_counts(text)
    ranked = sorted(counts.items(), key=lambda item: item[1], reverse=True)
    if ranked[0][1] == 0 or ranked[0][1] == ranked[1][1]:
        return UNKNOWN
    return ranked[0][0]


def primary_subtag(tag: str) -> str:
    """'de-CH' -> 'de': replies are judged on the language, not the region."""
    return tag.split("-", 1)[0].lower()
