"""A small word-level tokenizer for the examples, written to a local folder and loaded back
with ``AutoTokenizer.from_pretrained``, exactly as a downloaded one would be (nothing is
downloaded here). With a real model, point ``AutoTokenizer.from_pretrained`` at its folder.
"""

import tempfile

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

WORDS = (
    "In : What action should the robot take to ? Out pick up put open close the red "
    "green blue block cup drawer box in on caption describe image ▁"
).split()


def local_word_tokenizer():
    """Ids: <pad>=0, <s>=1, </s>=2, <unk>=3, then one id per word of WORDS."""
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tempfile.mkdtemp(prefix="vlakit-tokenizer-")
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    ).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)
