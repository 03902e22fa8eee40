"""Special token ids, defined once for every tokenizer and every synthetic task.

Ids ``0 .. NUM_SPECIAL-1`` are reserved in every vocabulary this package builds, so text shards and
synthetic tasks share ids and can be mixed in one batch. Ordinary symbols (bytes, BPE merges,
synthetic entities) start at ``NUM_SPECIAL``.
"""

from __future__ import annotations

PAD_ID = 0  # padding; its label is always -100
BOS_ID = 1  # beginning of sequence (optional, tokenizers add it only when asked)
EOS_ID = 2  # end of document: documents are joined with it
ARROW_ID = 3  # "->" in chaining premises
QUERY_ID = 4  # "?" before an answer
SEP_ID = 5  # end of a premise / a section separator
IS_ID = 6  # ":" between a key and its value in stated facts

NUM_SPECIAL = 16  # ids 7..15 are reserved for future markers
IGNORE_INDEX = -100  # label value that the loss ignores

_NAMED = {
    "<pad>": PAD_ID,
    "<bos>": BOS_ID,
    "<eos>": EOS_ID,
    "<arrow>": ARROW_ID,
    "<query>": QUERY_ID,
    "<sep>": SEP_ID,
    "<is>": IS_ID,
}

# name -> id for all NUM_SPECIAL reserved ids, in id order (tokenizers register them in this order)
SPECIAL_TOKENS: dict[str, int] = {
    **_NAMED,
    **{f"<reserved_{i}>": i for i in range(len(_NAMED), NUM_SPECIAL)},
}
assert list(SPECIAL_TOKENS.values()) == list(range(NUM_SPECIAL))

__all__ = [
    "ARROW_ID",
    "BOS_ID",
    "EOS_ID",
    "IGNORE_INDEX",
    "IS_ID",
    "NUM_SPECIAL",
    "PAD_ID",
    "QUERY_ID",
    "SEP_ID",
    "SPECIAL_TOKENS",
]
