"""ltsft-dist: Lottery-Ticket Sparse Fine-Tuning at any scale, on DeepSpeed ZeRO 0-3."""

__version__ = "0.1.0"
