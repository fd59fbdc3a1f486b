"""The world's word-level tokenizer, built with the `tokenizers` package and saved as tokenizer.json.

One token per word or punctuation mark: the vocabulary is every word of the world's text
(text.corpus_pieces), of LLaVA's vicuna_v1 template (system prompt, "USER", "ASSISTANT"),
of RLAIF-V's " Please answer yes or no." and of LLaVA's multiple-choice instruction, each
word also with its first letter in the other case (so that rewriting a sentence, e.g.
rewards.claims.claim_to_question lower-casing "At the top ..." into "... that at the top
...", stays in the vocabulary), plus common punctuation. Callers can add texts of their own
(`extra_texts`, e.g. Fact-RLHF's evaluation prompt); anything else becomes "<unk>".

Fixed special ids, the same as Llama's for the first three and as tests/tiny_tokenizer.py:
"<unk>" 0, "<s>" 1 (bos), "</s>" 2 (eos), "<pad>" 3, "<image>" 4. They are added tokens, so
"</s>" and "<image>" written in a rendered conversation become one token each; the other
words follow in sorted order (ids 5, 6, ...), so the same inputs give the same file.

Pre-tokenisation: split at whitespace, then isolate every punctuation character, so "." ","
"?" ":" "'" are tokens of their own. "USER:" is therefore "USER" ":" -- as in Llama's
tokenizer, where the role name and the colon are separate pieces. Character offsets of a
word-level model over these pre-tokens are exact, which lvlm/tokenizer.py relies on to mark
assistant tokens.

Decoding joins tokens with single spaces, then removes the space before ". , ? ! : ;" and
"</s>", rebuilds "'s", and puts the newline back after "<image>" (the template's
"<image>\\n"). So decode(encode(text)) == text for every single-spaced world text.
"""

from __future__ import annotations

import os

from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors

from ..tokenizer import ASSISTANT_ROLE, SYSTEM, USER_ROLE
from .scene import DEFAULT_CONFIG, WorldConfig
from .text import corpus_pieces

WORLD_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")  # ids 0, 1, 2, 3, 4
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IMAGE_ID = range(len(WORLD_SPECIAL_TOKENS))

PUNCTUATION = tuple(".,?!:;'\"()-")


def world_pre_tokenizer():
    """Whitespace split, then every punctuation character on its own."""
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")])


def world_decoder():
    """Words joined by spaces; no space before punctuation; "user ' s" -> "user's"."""
    steps = [decoders.WordPiece(prefix="##", cleanup=False), decoders.Fuse()]
    for mark in (".", ",", "?", "!", ":", ";", "</s>"):
        steps.append(decoders.Replace(" " + mark, mark))
    steps += [decoders.Replace(" ' ", "'"), decoders.Replace("<image> ", "<image>\n")]
    return decoders.Sequence(steps)


def world_words(config: WorldConfig = DEFAULT_CONFIG, extra_texts=()) -> list:
    """The sorted non-special vocabulary: pre-tokens of the world's text and the template."""
    texts = list(corpus_pieces(config)) + [SYSTEM, f"{USER_ROLE}: {ASSISTANT_ROLE}:"] + list(extra_texts)
    pre_tokenizer = world_pre_tokenizer()
    words = set(PUNCTUATION)
    for text in texts:
        for special in WORLD_SPECIAL_TOKENS:
            text = text.replace(special, " ")
        for word, _ in pre_tokenizer.pre_tokenize_str(text):
            words.add(word)
            if word[:1].isalpha():
                words.add(word[:1].upper() + word[1:])
                words.add(word[:1].lower() + word[1:])
    return sorted(words - set(WORLD_SPECIAL_TOKENS))


def make_world_tokenizer(config: WorldConfig = DEFAULT_CONFIG, extra_texts=()) -> RawTokenizer:
    """The tokenizer as a `tokenizers.Tokenizer` object (not saved)."""
    vocab = {token: i for i, token in enumerate(WORLD_SPECIAL_TOKENS)}
    for word in world_words(config, extra_texts):
        vocab[word] = len(vocab)
    tokenizer = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.add_special_tokens(list(WORLD_SPECIAL_TOKENS))
    tokenizer.pre_tokenizer = world_pre_tokenizer()
    # Like Llama's tokenizer.json: "<s>" in front when special tokens are asked for
    # (lvlm.tokenizer.Tokenizer does not ask; it adds BOS itself).
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    tokenizer.decoder = world_decoder()
    return tokenizer


def build_world_tokenizer(path, config: WorldConfig = DEFAULT_CONFIG, extra_texts=()) -> str:
    """Write the world's tokenizer.json to `path` (a file path, or a directory to put it in).

    Deterministic: the same config and extra_texts give byte-identical files. Returns the
    file's path. Load it with `lvlm.tokenizer.Tokenizer.from_file(path)`.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    tokenizer = make_world_tokenizer(config, extra_texts)
    temporary = path + ".tmp"
    tokenizer.save(temporary, pretty=True)
    os.replace(temporary, path)
    return path
