"""The MAD-X-style peer, run inside bench/.venv-adapters (AdapterHub `adapters` 1.3.0 pins transformers ~= 4.57).

Driven by `bench_adapters.py` over stdin/stdout, one JSON object per line, so that its steps interleave with
ours in time. Builds the benchmark BERT from the config it is given (no download) twice: a plain base model,
and the same base with a MAD-X stack: an invertible language adapter (`SeqBnInvConfig`, reduction 2, as MAD-X's
language adapters) below a task adapter (`SeqBnConfig`, reduction 16), active as `Stack("lang", "task")`; only
the task adapter and the classifier head train (`train_adapter("task")`), as in MAD-X task training.

The first line read is the setup: {"bert_config", "train_batch", "infer_batch", "seq_len"}. Then commands:
{"op": "train_step"} -> {"seconds"}; {"op": "infer"} -> {"base", "other"}: seconds of one forward pass of the
base and of the adapter stack (`infer_pair`, which our side uses too); {"op": "quit"}.
"""

from __future__ import annotations

import json
import sys
import time

import torch


def main() -> None:
    import adapters
    import transformers
    from adapters import SeqBnConfig, SeqBnInvConfig
    from adapters.composition import Stack
    from transformers import BertConfig, BertForSequenceClassification

    setup = json.loads(sys.stdin.readline())
    config = BertConfig(**setup["bert_config"], num_labels=2)
    torch.manual_seed(0)
    base = BertForSequenceClassification(config).eval()
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    adapters.init(model)
    model.add_adapter("lang", config=SeqBnInvConfig(reduction_factor=2))
    model.add_adapter("task", config=SeqBnConfig(reduction_factor=16))
    model.train_adapter("task")
    model.active_adapters = Stack("lang", "task")
    for p in model.classifier.parameters():
        p.requires_grad = True
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)

    seq, vocab = setup["seq_len"], setup["bert_config"]["vocab_size"]
    g = torch.Generator().manual_seed(0)

    def batch(n):
        return {"input_ids": torch.randint(5, vocab, (n, seq), generator=g),
                "attention_mask": torch.ones(n, seq, dtype=torch.long)}

    train = dict(batch(setup["train_batch"]), labels=torch.randint(0, 2, (setup["train_batch"],), generator=g))
    infer = batch(setup["infer_batch"])
    models = {"base": base, "adapters": model}
    reply({"ready": True, "adapters": adapters.__version__, "transformers": transformers.__version__,
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "N_base": sum(p.numel() for p in base.parameters()),
           "N_with_adapters": sum(p.numel() for p in model.parameters()),
           "N_trainable": sum(p.numel() for p in trainable), "active": str(model.active_adapters)})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        if cmd["op"] == "train_step":
            model.train()
            t = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = model(**train).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            reply({"seconds": time.perf_counter() - t})
        else:
            reply(infer_pair(models["base"], models["adapters"], infer))


def infer_pair(base, other, batch) -> dict:
    """One forward each of `base` and `other` in the order base, other, other, base after a warm-up call: whichever
    runs first after another process had the core meets cold caches, so neither may always go first."""
    seconds = {"base": 0.0, "other": 0.0}
    with torch.inference_mode():
        base.eval()(**batch)
        other.eval()
        for name in ("base", "other", "other", "base"):
            t = time.perf_counter()
            (base if name == "base" else other)(**batch)
            seconds[name] += (time.perf_counter() - t) / 2
    return seconds


def reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
