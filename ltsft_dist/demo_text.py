"""A small multilingual corpus written for this project, generated from a parallel lexicon.

It lets the embedded demo and the tests train on real-looking text in several languages with no
download: the same sentence skeletons in English, German and Spanish.
"""

from __future__ import annotations

import random

LEXICON = {
    "en": {
        "nouns": ["cat", "dog", "child", "teacher", "bird", "farmer", "doctor", "woman", "man", "student",
                  "baker", "horse"],
        "verbs": ["sees", "likes", "finds", "follows", "carries", "calls", "helps", "visits"],
        "adjectives": ["small", "old", "happy", "tired", "young", "quiet"],
        "places": ["in the garden", "at home", "near the river", "in the city", "on the hill", "at school"],
        "times": ["today", "every morning", "in the evening", "on sunday"],
        "article": "the",
    },
    "de": {
        "nouns": ["katze", "hund", "kind", "lehrer", "vogel", "bauer", "arzt", "frau", "mann", "student",
                  "bäcker", "pferd"],
        "verbs": ["sieht", "mag", "findet", "folgt", "trägt", "ruft", "hilft", "besucht"],
        "adjectives": ["kleine", "alte", "glückliche", "müde", "junge", "stille"],
        "places": ["im garten", "zu hause", "am fluss", "in der stadt", "auf dem hügel", "in der schule"],
        "times": ["heute", "jeden morgen", "am abend", "am sonntag"],
        "article": "die",
    },
    "es": {
        "nouns": ["gato", "perro", "niño", "maestro", "pájaro", "granjero", "médico", "mujer", "hombre",
                  "estudiante", "panadero", "caballo"],
        "verbs": ["ve", "quiere", "encuentra", "sigue", "lleva", "llama", "ayuda", "visita"],
        "adjectives": ["pequeño", "viejo", "feliz", "cansado", "joven", "tranquilo"],
        "places": ["en el jardín", "en casa", "cerca del río", "en la ciudad", "en la colina", "en la escuela"],
        "times": ["hoy", "cada mañana", "por la tarde", "el domingo"],
        "article": "el",
    },
}
LANGUAGES = tuple(LEXICON)


def sentences(language: str, n: int, seed: int = 0) -> list[str]:
    """`n` sentences; the same seed gives parallel sentences (translations) in every language."""
    if language not in LEXICON:
        raise ValueError(f"no demo text for {language!r}; available: {', '.join(LANGUAGES)}")
    lex, rng = LEXICON[language], random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(len(lex["nouns"])), rng.randrange(len(lex["nouns"]))
        adj, verb = rng.randrange(len(lex["adjectives"])), rng.randrange(len(lex["verbs"]))
        place, time = rng.randrange(len(lex["places"])), rng.randrange(len(lex["times"]))
        art = lex["article"]
        out.append(f"{art} {lex['adjectives'][adj]} {lex['nouns'][a]} {lex['verbs'][verb]} {art} "
                   f"{lex['nouns'][b]} {lex['places'][place]} {lex['times'][time]} .")
    return out


NLI_LABELS = ("entailment", "neutral", "contradiction")


def nli_examples(language: str, n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """`n` (premise, hypothesis, label) triples, parallel across languages for the same seed: the hypothesis
    drops details (entailment), adds a time the premise does not give (neutral) or changes the object
    (contradiction)."""
    if language not in LEXICON:
        raise ValueError(f"no demo text for {language!r}; available: {', '.join(LANGUAGES)}")
    lex, rng = LEXICON[language], random.Random(seed)
    art, nouns = lex["article"], lex["nouns"]
    out = []
    for i in range(n):
        a, b = rng.randrange(len(nouns)), rng.randrange(len(nouns))
        other = (b + 1 + rng.randrange(len(nouns) - 1)) % len(nouns)
        adj, verb = rng.choice(lex["adjectives"]), rng.choice(lex["verbs"])
        place, time = rng.choice(lex["places"]), rng.choice(lex["times"])
        label = NLI_LABELS[rng.randrange(3)]
        premise = f"{art} {adj} {nouns[a]} {verb} {art} {nouns[b]} {place} ."
        core = f"{art} {nouns[a]} {verb} {art} {nouns[other if label == 'contradiction' else b]}"
        hypothesis = f"{core} {time} ." if label == "neutral" else f"{core} ."
        out.append((premise, hypothesis, label))
    return out
