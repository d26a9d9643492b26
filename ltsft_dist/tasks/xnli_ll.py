"""XNLI for decoders, zero-shot by log-likelihood as lm-evaluation-harness (0.4.13) scores it, with the XGLM/mGPT
prompt: each choice is a whole sequence, the premise, the language's "right?", its "Yes" / "Also" / "No"
(entailment, neutral, contradiction) and the hypothesis, `"{premise}, right? Yes, {hypothesis}"`, scored after an
empty context (the tokenizer's beginning-of-sequence token alone); lm-eval reports `acc` only.

The data are read by the NLI task's readers (`ltsft_dist.tasks.nli`: the XNLI 1.0 TSV, MultiNLI-style JSONL for
English, the HF `facebook/xnli` dataset), whose label order (entailment, neutral, contradiction) is the choices'.
"""

from __future__ import annotations

from ltsft_dist.errors import LtsftError
from ltsft_dist.tasks.base import Format, register_task
from ltsft_dist.tasks.choice import LogLikelihoodChoice
from ltsft_dist.tasks.nli import NLI, NLIRecord

# language -> ("right?" word, entailment, neutral, contradiction): lm-evaluation-harness's xnli_<lang> prompts.
WORDS = {
    "ar": ("صحيح", "نعم", "لذا", "رقم"), "bg": ("правилно", "да", "така", "не"),
    "de": ("richtig", "Ja", "Auch", "Nein"), "el": ("σωστός", "Ναί", "Έτσι", "όχι"),
    "en": ("right", "Yes", "Also", "No"), "es": ("correcto", "Sí", "Asi que", "No"),
    "fr": ("correct", "Oui", "Aussi", "Non"), "hi": ("सही", "हाँ", "इसलिए", "नहीं"),
    "ru": ("правильно", "Да", "Так", "Нет"), "sw": ("sahihi", "Ndiyo", "Hivyo", "Hapana"),
    "th": ("ถูกต้อง", "ใช่", "ดังนั้น", "ไม่"), "tr": ("doğru", "Evet", "Böylece", "Hayır"),
    "ur": ("صحیح", "جی ہاں", "اس لئے", "نہیں"), "vi": ("đúng", "Vâng", "Vì vậy", "Không"),
    "zh": ("正确", "是的", "所以", "不是的"),
}


def _with_prompt_words(fmt: Format) -> Format:
    """The NLI reader `fmt`, refusing first a language lm-eval has no prompt words for."""

    def read(source) -> list[NLIRecord]:
        if source.language not in WORDS:
            raise LtsftError(f"{source.train_file or source.hf_dataset}: XNLI by log-likelihood has no prompt words "
                             f"for language {source.language!r}; use one of {', '.join(WORDS)}")
        return fmt.read(source)

    return Format(read, fmt.suffixes, fmt.header)


@register_task
class XNLILogLikelihood(LogLikelihoodChoice):
    name = "xnli_ll"
    formats = {name: _with_prompt_words(NLI.formats[name]) for name in ("xnli-tsv", "multinli-jsonl", "hf")}
    metrics = ("acc",)

    def context(self, record: NLIRecord) -> str:
        return ""

    def choices(self, record: NLIRecord) -> list[str]:
        right, *answers = WORDS[record.language]
        return [f"{record.premise}, {right}? {answer}, {record.hypothesis}" for answer in answers]

    def gold(self, record: NLIRecord) -> int:
        return record.label
