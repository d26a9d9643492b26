"""Text written for this project, generated offline.

A small parallel lexicon gives the tests real-looking sentences in English, German and Spanish; the generated
languages below (one grammar, disjoint scripts) are the embedded demo's data.
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


# ------------------------------------------------------------------------ generated languages (`ltsft demo`)
# One grammar, realised as languages that share no surface form: each concept becomes a pseudo-word in the
# language's own script, so a language the base never saw starts from embedding rows it never trained, as
# AmericasNLI's languages do for XLM-R. Everything below is drawn from one seed (`ltsft demo --seed N`).

SCRIPTS = {  # (consonants, vowels): disjoint alphabets, so no token is shared between two languages
    "src1": ("bdfgklmnprstvz", "aeiou"),
    "src2": ("βγδζθκλμνξπρστφχ", "αεηιουω"),
    "tgt": ("бвгджзклмнпрстфхцчш", "аеиоуыэюя"),
}
CLASSES = ("animal", "tool", "food")  # the task's labels: the class of the object noun
_PLACES, _TIMES, _GENERAL_VERBS, _GENERAL_ADJECTIVES, _NAMES_PER_GENDER, _NOUNS_PER_CLASS = 6, 4, 4, 4, 8, 12
_VERBS_PER_CLASS, _ADJECTIVES_PER_CLASS = 3, 3
# The classes differ in how they are used, as real word classes do: a grammar symmetric under swapping two classes
# gives a cipher language no way to tell which of its classes is which source class (measured: the target's nouns
# then land in a random source class, and the task cannot transfer). Running text mentions animals most; animals
# can be subjects; how often the verb or adjective is one restricted to the object's class differs per class
# (the adjective rate itself does not, so no sentence length depends on the class).
_TEXT_CLASS_WEIGHTS = (0.5, 0.3, 0.2)
_ANIMAL_SUBJECT = 0.2
_CLASS_VERB_RATE = {"animal": 0.2, "tool": 0.5, "food": 0.8}
_CLASS_ADJECTIVE_RATE = {"animal": 0.1, "tool": 0.3, "food": 0.5}  # of the 0.6 of objects with an adjective


def _concepts() -> list[str]:
    """Every word of the grammar, as a concept id (one pseudo-word per concept and language)."""
    words = [f"name.{g}{i}" for g in "mf" for i in range(_NAMES_PER_GENDER)]
    words += ["pron.m", "pron.f", "pron.pl", "art.sg", "art.pl", "and"]
    words += [f"noun.{c}{i}.{n}" for c in CLASSES for i in range(_NOUNS_PER_CLASS) for n in ("sg", "pl")]
    verbs = [f"{c}{i}" for c in CLASSES for i in range(_VERBS_PER_CLASS)] + [f"any{i}" for i in range(_GENERAL_VERBS)]
    words += [f"verb.{v}.{n}" for v in verbs for n in ("sg", "pl")]
    words += [f"adj.{c}{i}" for c in CLASSES for i in range(_ADJECTIVES_PER_CLASS)]
    words += [f"adj.any{i}" for i in range(_GENERAL_ADJECTIVES)]
    return words + [f"place{i}" for i in range(_PLACES)] + [f"time{i}" for i in range(_TIMES)]


def lexicon(language: str, seed: int = 0) -> dict[str, str]:
    """Concept id -> this language's pseudo-word (2-3 syllables of its script, all distinct)."""
    if language not in SCRIPTS:
        raise ValueError(f"no generated language {language!r}; available: {', '.join(SCRIPTS)}")
    consonants, vowels = SCRIPTS[language]
    rng = random.Random(f"{seed}/{language}")
    words: dict[str, str] = {}
    taken: set[str] = set()
    for concept in _concepts():
        word = ""
        while not word or word in taken:
            word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.choice((2, 2, 3))))
        taken.add(word)
        words[concept] = word
    return words


def _clause(rng: random.Random, label: str, pronoun: str | None = None) -> tuple[list[str], str]:
    """(concepts of a subject-verb-object clause whose object is of class `label`, the subject's pronoun);
    the subject is `pronoun` when given, else a plural animal, a name or a pronoun."""
    roll = rng.random()
    if pronoun is None and roll < _ANIMAL_SUBJECT:  # "the dogs ...": a plural animal subject
        subject, pronoun = ["art.pl", f"noun.animal{rng.randrange(_NOUNS_PER_CLASS)}.pl"], "pron.pl"
    elif pronoun is None and roll < _ANIMAL_SUBJECT + 0.7 * (1 - _ANIMAL_SUBJECT):
        gender = rng.choice("mf")
        subject, pronoun = [f"name.{gender}{rng.randrange(_NAMES_PER_GENDER)}"], f"pron.{gender}"
    else:
        pronoun = pronoun or rng.choice(("pron.m", "pron.f", "pron.pl"))
        subject = [pronoun]
    number = "pl" if pronoun == "pron.pl" else "sg"  # the verb agrees with its subject
    verb = (f"{label}{rng.randrange(_VERBS_PER_CLASS)}" if rng.random() < _CLASS_VERB_RATE[label]
            else f"any{rng.randrange(_GENERAL_VERBS)}")  # some verbs take one class of object only
    obj_number = rng.choice(("sg", "pl"))
    words = [*subject, f"verb.{verb}.{number}", f"art.{obj_number}"]
    roll = rng.random()
    if roll < _CLASS_ADJECTIVE_RATE[label]:
        words.append(f"adj.{label}{rng.randrange(_ADJECTIVES_PER_CLASS)}")
    elif roll < 0.6:
        words.append(f"adj.any{rng.randrange(_GENERAL_ADJECTIVES)}")
    words.append(f"noun.{label}{rng.randrange(_NOUNS_PER_CLASS)}.{obj_number}")
    return words, pronoun


def _sentence(rng: random.Random, label: str, second_clause: bool) -> list[str]:
    words, pronoun = _clause(rng, label)
    if rng.random() < 0.5:
        words.append(f"place{rng.randrange(_PLACES)}")
    if rng.random() < 0.5:
        words.append(f"time{rng.randrange(_TIMES)}")
    if second_clause and rng.random() < 0.3:  # "and he/she/they ...": pronouns agree with the first subject
        words += ["and", *_clause(rng, _text_class(rng), pronoun)[0]]
    return words


def _text_class(rng: random.Random) -> str:
    return rng.choices(CLASSES, _TEXT_CLASS_WEIGHTS)[0]


def generated_text(language: str, n: int, seed: int = 0, stream: str = "text") -> list[str]:
    """`n` sentences of running text (one or two clauses) in a generated language."""
    words, rng = lexicon(language, seed), random.Random(f"{seed}/{stream}/{language}")
    return [" ".join(words[c] for c in _sentence(rng, _text_class(rng), True)) for _ in range(n)]


def object_class_examples(language: str, n: int, seed: int = 0, stream: str = "task") -> list[tuple[str, str]]:
    """`n` (sentence, label) pairs: one-clause sentences labelled with the class of their object noun, which
    only content words tell (the noun, and some verbs and adjectives); the labels are balanced and no sentence
    length or function word depends on them."""
    words, rng = lexicon(language, seed), random.Random(f"{seed}/{stream}/{language}")
    out = []
    for i in range(n):
        label = CLASSES[i % len(CLASSES)]
        out.append((" ".join(words[c] for c in _sentence(rng, label, False)), label))
    rng.shuffle(out)
    return out
