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
NAMES = ("anna", "paul", "maria", "tom", "lena", "omar", "sara", "ivan", "nora", "hugo")  # the same in every language


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
        subject = f"{art} {lex['adjectives'][adj]} {lex['nouns'][a]}"
        if rng.random() < 0.3:  # people's names, the same in every language
            subject = NAMES[rng.randrange(len(NAMES))]
        out.append(f"{subject} {lex['verbs'][verb]} {art} {lex['nouns'][b]} {lex['places'][place]} "
                   f"{lex['times'][time]} .")
    return out


NLI_LABELS = ("entailment", "neutral", "contradiction")


def nli_examples(language: str, n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """`n` (premise, hypothesis, label) triples, parallel across languages for the same seed. People are named
    (names are shared across languages, as in real text); the hypothesis drops the place (entailment), adds a
    time the premise does not give (neutral) or names someone else (contradiction)."""
    if language not in LEXICON:
        raise ValueError(f"no demo text for {language!r}; available: {', '.join(LANGUAGES)}")
    lex, rng = LEXICON[language], random.Random(seed)
    out = []
    for _ in range(n):
        a, b, other = rng.sample(NAMES, 3)
        verb, place, time = rng.choice(lex["verbs"]), rng.choice(lex["places"]), rng.choice(lex["times"])
        label = NLI_LABELS[rng.randrange(3)]
        premise = f"{a} {verb} {b} {place} ."
        core = f"{a} {verb} {other if label == 'contradiction' else b}"
        hypothesis = f"{core} {time} ." if label == "neutral" else f"{core} ."
        out.append((premise, hypothesis, label))
    return out
