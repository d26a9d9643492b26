"""A language SFT with the transformers Trainer, in the shape of HF's run_mlm.py: LT-SFT is `LTSFTTrainer` and
the `LTSFTArguments` on the command line, nothing else changes.

    deepspeed --num_gpus 2 examples/run_mlm_ltsft.py --model_name_or_path xlm-roberta-base \
        --train_file sw.txt --output_dir runs/sw --deepspeed ltsft_dist/ds_configs/zero2.json \
        --per_device_train_batch_size 8 --learning_rate 5e-5 --max_steps 20000 \
        --sft_kind language --phase1_steps 10000 --density 0.028 --phase1_l1 0.1 --phase2_l1 0.1

A plain `python examples/run_mlm_ltsft.py ...` runs as one rank. The SFT lands in OUTPUT_DIR/sft.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

from datasets import load_dataset
from transformers import (AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling, HfArgumentParser,
                          TrainingArguments)

from ltsft_dist.integrations.hf import LTSFTArguments, LTSFTTrainer, join_process_group, token_mean_loss


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "the base model θ⁰: a hub id or a directory"})
    tokenizer_name: str | None = field(default=None, metadata={"help": "default: model_name_or_path"})


@dataclass
class DataArguments:
    train_file: str = field(metadata={"help": "text, one line per document"})
    max_seq_length: int = field(default=128, metadata={"help": "tokens per block (texts are concatenated)"})
    mlm_probability: float = field(default=0.15, metadata={"help": "fraction of tokens masked"})


def main(argv: list[str] | None = None) -> None:
    join_process_group()  # the ranks of whichever launcher started us (none: one rank); before TrainingArguments
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, LTSFTArguments))
    model_args, data_args, training_args, ltsft_args = parser.parse_args_into_dataclasses(argv)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    model = AutoModelForMaskedLM.from_pretrained(model_args.model_name_or_path)
    raw = load_dataset("text", data_files={"train": data_args.train_file})["train"]
    tokenized = raw.map(lambda batch: tokenizer(batch["text"], return_special_tokens_mask=True), batched=True,
                        remove_columns=["text"])
    size = data_args.max_seq_length

    def group_texts(examples):  # run_mlm's packing: concatenate, cut into blocks of max_seq_length
        joined = {k: list(chain(*examples[k])) for k in examples}
        total = len(joined["input_ids"]) // size * size
        return {k: [v[i:i + size] for i in range(0, total, size)] for k, v in joined.items()}

    train = tokenized.map(group_texts, batched=True)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=data_args.mlm_probability)
    ltsft_args.base_model = ltsft_args.base_model or model_args.model_name_or_path
    trainer = LTSFTTrainer(model=model, args=training_args, train_dataset=train, data_collator=collator,
                           processing_class=tokenizer, ltsft_args=ltsft_args,
                           compute_loss_func=token_mean_loss)  # the mean over the step's masked tokens
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)


if __name__ == "__main__":
    main()
