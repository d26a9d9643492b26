"""A task SFT (NLI) with the transformers Trainer, in the shape of HF's run_xnli.py, trained as the paper does it:
on the source language with that language's SFT applied to θ⁰ at every step (`--language_sfts en=DIR`, swapped
into the working weights as `ltsft train`'s `language_sfts` does; the task SFT stays relative to θ⁰), so that at
inference the task SFT composes with any target language's SFT.

    deepspeed --num_gpus 2 examples/run_xnli_ltsft.py --model_name_or_path xlm-roberta-base \
        --train_file mnli.jsonl --language_sfts en=runs/en/sft --output_dir runs/nli \
        --deepspeed ltsft_dist/ds_configs/zero2.json --per_device_train_batch_size 16 --learning_rate 2e-5 \
        --max_steps 10000 --sft_kind task --phase1_steps 5000 --density 0.028

`--train_file` is JSON lines with premise, hypothesis and label (a name or an id). The SFT lands in OUTPUT_DIR/sft.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from datasets import load_dataset
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                          HfArgumentParser, TrainingArguments)

from ltsft_dist.integrations.hf import LTSFTArguments, LTSFTTrainer, join_process_group

LABELS = ("entailment", "neutral", "contradiction")  # XNLI's label ids


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "the base model θ⁰: a hub id or a directory"})


@dataclass
class DataArguments:
    train_file: str = field(metadata={"help": "JSON lines: premise, hypothesis, label"})
    max_seq_length: int = field(default=128, metadata={"help": "tokens per premise + hypothesis pair"})


def main(argv: list[str] | None = None) -> None:
    join_process_group()
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, LTSFTArguments))
    model_args, data_args, training_args, ltsft_args = parser.parse_args_into_dataclasses(argv)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)})
    raw = load_dataset("json", data_files={"train": data_args.train_file})["train"]

    def encode(batch):
        out = tokenizer(batch["premise"], batch["hypothesis"], truncation=True, max_length=data_args.max_seq_length)
        out["labels"] = [LABELS.index(label) if isinstance(label, str) else int(label) for label in batch["label"]]
        return out

    train = raw.map(encode, batched=True, remove_columns=raw.column_names)
    ltsft_args.base_model = ltsft_args.base_model or model_args.model_name_or_path
    trainer = LTSFTTrainer(model=model, args=training_args, train_dataset=train,
                           data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
                           ltsft_args=ltsft_args)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)


if __name__ == "__main__":
    main()
