"""Trying a decoder's SFTs: θ⁰ + Σφ (composed and applied in memory as `ltsft export` merges them) continuing
prompts, greedily unless sampling is asked for, without writing a merged model first."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ltsft_dist.errors import LtsftError
from ltsft_dist.export import load_sfts, merged_model
from ltsft_dist.sft import SparseFineTuning
from ltsft_dist.tasks import get_task, task_names


@dataclass
class GenerationOptions:
    max_new_tokens: int = 64
    chat: bool = False  # render each prompt as a user turn with the tokenizer's chat template
    temperature: float = 0.0  # 0: greedy
    seed: int = 0


def decoder_task(sfts: list[SparseFineTuning]) -> str:
    """The decoder task whose model the SFTs go on: the task SFT's own, else the language SFTs' (clm)."""
    recorded = [sft.metadata.training_config.get("task") for sft in sfts]
    task = next((t for t in recorded if t in task_names() and get_task(t).kind == "task"), None) or "clm"
    if not get_task(task).decoder:
        raise LtsftError(f"--sft: an SFT of task {task}, which trains encoders; ltsft generate runs decoders "
                         "(SFTs of task clm or instruct)")
    return task


def generate(base_dir, sft_locations: list[str], prompts: list[str], options: GenerationOptions | None = None,
             device: str | None = None) -> list[str]:
    """The continuation of each prompt (the new text only)."""
    from transformers import AutoTokenizer

    options = options or GenerationOptions()
    if options.max_new_tokens <= 0 or options.temperature < 0:
        raise LtsftError("--max-new-tokens must be positive and --temperature non-negative")
    sfts = load_sfts(sft_locations)
    merged = merged_model(base_dir, sft_locations, sfts, decoder_task(sfts), device)
    model = merged.model.eval()
    tokenizer = AutoTokenizer.from_pretrained(merged.base)
    if options.chat and not getattr(tokenizer, "chat_template", None):
        raise LtsftError(f"--chat: the tokenizer of --base {base_dir} has no chat template; drop --chat to give "
                         "the prompt as plain text")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": True, "temperature": options.temperature} if options.temperature else {"do_sample": False}
    outputs = []
    for prompt in prompts:
        if options.chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        else:
            ids = tokenizer(prompt, return_tensors="pt")
        torch.manual_seed(options.seed)
        with torch.inference_mode():
            out = model.generate(**{k: v.to(device) for k, v in ids.items()}, max_new_tokens=options.max_new_tokens,
                                 pad_token_id=pad, **sampling)
        outputs.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return outputs
