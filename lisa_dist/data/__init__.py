"""Training data: records as users have them (`records`), their formats to tokens and labels (`formats`),
a tokenized cache (`cache`), and fixed-length sequences in deterministic global batches (`sequences`)."""

from lisa_dist.data.cache import TokenizedCache, load_examples
from lisa_dist.data.formats import FORMATS, IGNORE_INDEX, TokenizedExample, Tokenizer, format_alpaca_prompt
from lisa_dist.data.sequences import GlobalBatches, SequenceSet, build_sequences, split_held_out

__all__ = ["FORMATS", "IGNORE_INDEX", "GlobalBatches", "SequenceSet", "TokenizedExample", "Tokenizer",
           "TokenizedCache", "build_sequences", "format_alpaca_prompt", "load_examples", "split_held_out"]
