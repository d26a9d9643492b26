"""LT-SFT inside training loops people already have: `hf` (the transformers Trainer, and accelerate custom loops)."""
