"""Small tokenizer.json files for tests, built with the `tokenizers` package (no downloads).

- `make_tiny_tokenizer(path_or_dir)`: a word-level tokenizer over a fixed vocabulary that
  covers LLaVA's system prompt, the template pieces ("USER", "ASSISTANT", ":") and a few
  dozen words about coloured shapes. Ids 0..4 are "<unk>", "<s>", "</s>", "<pad>", "<image>"
  (bos 1 and eos 2, as in Llama). Pre-tokenisation splits on whitespace and isolates each
  punctuation character; like Llama's tokenizer.json, a post-processor adds "<s>" in front
  (lvlm.tokenizer.Tokenizer does not use it: BOS is explicit there). The decoder joins tokens
  with spaces and removes the space before punctuation ("red ." -> "red.").
- `tiny_tokenizer()`: the same, already loaded as an `lvlm.tokenizer.Tokenizer` (built once
  per argument set in a temporary directory).
- `make_tiny_llama_style_tokenizer(path_or_dir)`: a SentencePiece-style BPE (Metaspace "▁"
  word starts, ids 0/1/2 = <unk>/<s>/</s>) trained in a fraction of a second on a small
  corpus, for checks that must hold for sub-word tokenizers too.
"""

import functools
import os
import tempfile

from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

SYSTEM_WORDS = (
    "A chat between a curious user and an artificial intelligence assistant . "
    "The gives helpful , detailed polite answers to the ' s questions"
).split()
TEMPLATE_WORDS = ["USER", "ASSISTANT", ":"]
WORLD_WORDS = (
    "there There is are a an the one two three red green blue yellow white black circle square triangle "
    "star left right top bottom middle centre of in on at and next to image picture What what Is is "
    "Describe describe Please evaluate How many Yes yes No no this I see answer or detail it "
    "? ! . ,"
).split()


def tiny_vocabulary(extra_words=()):
    """The token list: special tokens first (ids 0..4), then each word once, in order."""
    vocab = []
    for word in SPECIAL_TOKENS + SYSTEM_WORDS + TEMPLATE_WORDS + WORLD_WORDS + list(extra_words):
        if word not in vocab:
            vocab.append(word)
    return vocab


def _tokenizer_path(path_or_dir):
    path = os.fspath(path_or_dir)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    return path


def make_tiny_tokenizer(path_or_dir, *, extra_words=(), with_image_token=True):
    """Write the word-level test tokenizer; returns the tokenizer.json path.

    with_image_token=False leaves "<image>" out of the vocabulary (ids then shift down by
    one after "<pad>"), for testing the missing-image-token error.
    """
    words = tiny_vocabulary(extra_words)
    if not with_image_token:
        words.remove("<image>")
    vocab = {word: i for i, word in enumerate(words)}
    tokenizer = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.add_special_tokens([w for w in SPECIAL_TOKENS if w in vocab])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    path = _tokenizer_path(path_or_dir)
    tokenizer.save(path)
    return path


def make_tiny_llama_style_tokenizer(path_or_dir, *, vocab_size=400):
    """Write a small SentencePiece-style BPE tokenizer.json; returns its path.

    Metaspace pre-tokenizer ("▁" marks a word start, prepended to the first word), BPE trained
    on the template and a few sentences; special tokens <unk>=0, <s>=1, </s>=2, then added
    "<image>" and "<pad>"; a post-processor adding "<s>"; the Metaspace decoder.
    """
    from lvlm.tokenizer import SYSTEM  # the exact system prompt, so it is in the corpus

    corpus = [
        SYSTEM,
        "USER: What is in the image? ASSISTANT: There is a red circle at the top left.",
        "USER: Describe the image in detail.\nASSISTANT: A blue square sits next to a green triangle.",
        "USER: Is there a yellow star? ASSISTANT: No, there is no yellow star in this picture.",
        "How many shapes are there? Three shapes: one circle, one square and one triangle.",
    ] * 3
    tokenizer = RawTokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.add_special_tokens(["<image>", "<pad>"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    path = _tokenizer_path(path_or_dir)
    tokenizer.save(path)
    return path


@functools.lru_cache(maxsize=None)
def _cached_tiny_tokenizer_path(extra_words, with_image_token):
    directory = tempfile.mkdtemp(prefix="tiny_tokenizer_")
    return make_tiny_tokenizer(directory, extra_words=extra_words, with_image_token=with_image_token)


def tiny_tokenizer(*, extra_words=(), with_image_token=True):
    """The word-level test tokenizer loaded as an `lvlm.tokenizer.Tokenizer`."""
    from lvlm.tokenizer import Tokenizer

    path = _cached_tiny_tokenizer_path(tuple(extra_words), with_image_token)
    return Tokenizer.from_file(path)


def tiny_llava_config(tok):
    """The "tiny-llava" preset with `tok`'s image token and a vocabulary that covers `tok`."""
    import dataclasses

    from lvlm.config import preset

    config = preset("tiny-llava")
    return dataclasses.replace(config, image_token_index=tok.image_token_id,
                               text_config=dataclasses.replace(config.text_config,
                                                               vocab_size=max(128, tok.vocab_size)))
