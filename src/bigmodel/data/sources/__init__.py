"""Where the data comes from: file scanning, format readers and synthetic generators.

No Lightning and no batching here: each reader returns plain arrays, tensors or lists that a
DataModule (one level up) splits, tokenizes and batches.
"""
