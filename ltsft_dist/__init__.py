"""ltsft-dist: Lottery-Ticket Sparse Fine-Tuning at any scale, on DeepSpeed ZeRO 0-3.

`ltsft_dist.train(config)` runs one LT-SFT from a `ltsft_dist.config.TrainConfig` (see `ltsft_dist.training`).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "train":  # imported on first use: `ltsft --version` and the config tools need no torch
        from ltsft_dist.training import train

        return train
    raise AttributeError(f"module 'ltsft_dist' has no attribute {name!r}")
