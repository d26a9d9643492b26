"""Decoder results a user can try and ship: `ltsft export` of a language SFT and an instruction task SFT writes a
model that `AutoModelForCausalLM.from_pretrained` loads and that generates the greedy tokens θ⁰ + φ generates in
memory; `ltsft generate` prints them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from sfts import random_sft
from transformers import AutoModelForCausalLM, AutoTokenizer

from ltsft_dist.config import ModelConfig
from ltsft_dist.demo_text import sentences
from ltsft_dist.errors import LtsftError
from ltsft_dist.export import export_merged
from ltsft_dist.generate import GenerationOptions, generate
from ltsft_dist.models import save_tiny_base
from ltsft_dist.sft import base_fingerprint

SIZES = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             intermediate_size=48, max_position_embeddings=64)
PROMPT = "the river"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    save_tiny_base(root / "base", ModelConfig(tiny=SIZES, architecture="llama"), sentences("en", 200, seed=1), seed=4)
    model = AutoModelForCausalLM.from_pretrained(root / "base")
    fingerprint = base_fingerprint(model)
    random_sft(model, density=0.3, seed=1, kind="language", languages=["en"], base_fingerprint=fingerprint,
               training_config={"task": "clm"}).save_pretrained(root / "lang")
    random_sft(model, density=0.3, seed=2, kind="task", base_fingerprint=fingerprint,
               training_config={"task": "instruct"}).save_pretrained(root / "task")
    return root


def _greedy(model, tokenizer, n: int = 12) -> list[int]:
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_export_generates_what_the_sfts_generate_in_memory(setup, tmp_path):
    from ltsft_dist.sft import SparseFineTuning

    tokenizer = AutoTokenizer.from_pretrained(setup / "base")
    model = AutoModelForCausalLM.from_pretrained(setup / "base").eval()
    plain = _greedy(model, tokenizer)
    for name in ("lang", "task"):
        SparseFineTuning.from_pretrained(setup / name).apply(model)
    in_memory = _greedy(model, tokenizer)
    assert in_memory != plain  # the SFTs change what the model says
    out = export_merged(str(setup / "base"), [str(setup / "lang"), str(setup / "task")], "instruct", tmp_path / "m")
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert _greedy(exported, AutoTokenizer.from_pretrained(out)) == in_memory
    texts = generate(str(setup / "base"), [str(setup / "lang"), str(setup / "task")], [PROMPT],
                     GenerationOptions(max_new_tokens=12))
    assert texts == [tokenizer.decode(in_memory, skip_special_tokens=True)]


def test_ltsft_generate_prints_the_continuation(setup):
    result = subprocess.run([sys.executable, "-m", "ltsft_dist.cli", "generate", "--base", str(setup / "base"),
                             "--sft", str(setup / "lang"), "--sft", str(setup / "task"), "--prompt", PROMPT,
                             "--max-new-tokens", "12"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = generate(str(setup / "base"), [str(setup / "lang"), str(setup / "task")], [PROMPT],
                        GenerationOptions(max_new_tokens=12))[0]
    assert result.stdout.strip() == (PROMPT + expected).strip()


def test_generate_refuses_encoder_sfts_and_a_chat_without_template(setup, tmp_path):
    from sfts import tiny_classifier

    encoder = random_sft(tiny_classifier(), kind="task", training_config={"task": "nli"})
    encoder.save_pretrained(tmp_path / "nli")
    with pytest.raises(LtsftError, match="an SFT of task nli, which trains encoders; ltsft generate runs decoders"):
        generate(str(setup / "base"), [str(tmp_path / "nli")], [PROMPT])
    with pytest.raises(LtsftError, match="--chat: the tokenizer of --base .* has no chat template; drop --chat"):
        generate(str(setup / "base"), [str(setup / "task")], [PROMPT], GenerationOptions(chat=True))
