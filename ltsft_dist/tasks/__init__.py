"""Task data and evaluation: language-SFT text (mlm), NLI (nli), extractive QA (qa), token classification
(ner, pos: tokens) and their metrics.

Each reader turns one official file format into plain records; each encoder turns records into
`ltsft_dist.data.Examples` the trainer can feed to a Hugging Face model. Every user-fixable problem
raises `LtsftError` naming the file, the line or record id, and the fix.
"""
