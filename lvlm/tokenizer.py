"""Tokenizer and chat template: text in LLaVA-1.5's conversation format <-> token ids.

Three pieces:

1. The vicuna_v1 template (LLaVA's `conv_vicuna_v1`, separator style TWO). A conversation
   with answers renders as

       {system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

   i.e. system + " ", then per turn "USER: " + question + " " and "ASSISTANT: " + answer +
   "</s>". A prompt for generation ends with "ASSISTANT:" (no trailing space): the model's
   answer starts with a space-prefixed token. The image marker goes in front of the first
   question, followed by a newline.

2. `Tokenizer`: a thin wrapper around `tokenizers.Tokenizer` (the `tokenizer.json` that sits
   beside Hugging Face weights) that knows the ids of <s>, </s>, the pad token and <image>,
   and makes adding BOS explicit.

3. `encode_conversation`: render, tokenise the whole text once, expand every <image> token
   into one copy per image feature (Hugging Face convention: 576 for LLaVA-1.5 at 336 px),
   and mark the assistant answers' tokens (the SFT / DPO labels) using the tokenizer's
   character offsets -- which works the same for word-level, BPE and SentencePiece-style
   tokenizers. `encode_conversations` does the same for a whole data set, its texts tokenised
   in one batch call.
"""

import json
import os

import torch
import tokenizers

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
USER_ROLE = "USER"
ASSISTANT_ROLE = "ASSISTANT"
TURN_SEP = " "  # after the system prompt and after each user turn
ANSWER_END = "</s>"  # after each assistant turn (Llama's eos written as text)
IMAGE_MARKER = "<image>"

# End-of-turn tokens of other chat formats; any that the vocabulary has join `stop_ids`.
_OTHER_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


# ----------------------------------------------------------------------------------------
# The template (pure string work)
# ----------------------------------------------------------------------------------------


def _place_image_marker(question):
    """LLaVA's rule: drop an <image> from the first question, strip it, put "<image>\\n" in front.

    Source: LLaVA `preprocess_multimodal` (training) and `model_vqa` (evaluation), the
    released code's behaviour. A first question with two or more markers is an interleaved
    multi-image layout placed by the caller, and is left as it is.
    """
    if question.count(IMAGE_MARKER) > 1:
        return question
    return IMAGE_MARKER + "\n" + question.replace(IMAGE_MARKER, "").strip()


def render_conversation(turns, *, image=True, system=SYSTEM):
    """Render (question, answer) turns in the vicuna_v1 template.

    Source: LLaVA `conversation.py`, `conv_vicuna_v1` with `SeparatorStyle.TWO`,
    `Conversation.get_prompt` (the released code's behaviour).

    turns: list of (question: str, answer: str | None); only the last answer may be None,
        which ends the text with "ASSISTANT:" (a prompt for generation). An empty answer ""
        renders as "ASSISTANT:</s>" -- what a model that stops at once would have produced.
    image: put "<image>\\n" in front of the first question (moving an <image> already in it
        there). With image=False the questions are used as given.
    Returns (text, answer_spans): answer_spans[i] = (start, end) character offsets of the
        i-th given answer *including* its "</s>", so text[start:end] == answer + "</s>".
    """
    turns = list(turns)
    if not turns:
        raise ValueError("render_conversation: no turns given")
    text = system + TURN_SEP
    spans = []
    for i, turn in enumerate(turns):
        if len(turn) != 2:
            raise ValueError(f"render_conversation: turn {i} must be (question, answer), got {turn!r}")
        question, answer = turn
        if not isinstance(question, str):
            raise ValueError(f"render_conversation: question of turn {i} is not a string: {question!r}")
        if i == 0 and image:
            question = _place_image_marker(question)
        text += USER_ROLE + ": " + question + TURN_SEP
        if answer is None:
            if i != len(turns) - 1:
                raise ValueError(
                    f"render_conversation: answer of turn {i} is None, but only the last of "
                    f"{len(turns)} turns may be left open"
                )
            text += ASSISTANT_ROLE + ":"
            continue
        if not isinstance(answer, str):
            raise ValueError(f"render_conversation: answer of turn {i} is not a string: {answer!r}")
        text += ASSISTANT_ROLE + ":" + (" " if answer else "")
        start = len(text)
        text += answer + ANSWER_END
        spans.append((start, len(text)))
    return text, spans


def render_prompt(question, *, image=True, system=SYSTEM):
    """One question -> the generation prompt `{system} USER: <image>\\n{question} ASSISTANT:`."""
    text, _ = render_conversation([(question, None)], image=image, system=system)
    return text


# ----------------------------------------------------------------------------------------
# The tokenizer wrapper
# ----------------------------------------------------------------------------------------


def _special_token_names(directory):
    """Names of bos / eos / pad / unk from tokenizer_config.json (or special_tokens_map.json)."""
    names = {}
    for filename in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        path = os.path.join(directory, filename)
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {path}: {e}") from e
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                names[key] = value
    return names


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special ids LLaVA needs.

    Build it with `Tokenizer.from_file(path)`. Attributes: `path`, `raw` (the underlying
    `tokenizers.Tokenizer`), `bos_id`, `eos_id`, `pad_id`, `stop_ids`, `vocab_size`;
    property `image_token_id` (ValueError when the vocabulary has no <image>).
    """

    def __init__(self, raw, *, path="<in memory>", bos_token="<s>", eos_token="</s>", pad_token=None,
                 unk_token="<unk>", image_token=IMAGE_MARKER):
        self.raw = raw
        self.path = str(path)
        self.image_token = image_token
        self.bos_id = raw.token_to_id(bos_token) if bos_token else None
        self.eos_id = raw.token_to_id(eos_token)
        if self.eos_id is None:
            raise ValueError(f"tokenizer.json at {self.path} has no end-of-sequence token {eos_token!r}")
        self.unk_id = raw.token_to_id(unk_token) if unk_token else None
        # Padding: an explicit pad token when there is one ("<pad>" = 32001 in llava-hf); else
        # unk, as LLaVA's own training code sets it for Vicuna (pad_token = unk_token); else eos.
        pad_id = raw.token_to_id(pad_token) if pad_token else raw.token_to_id("<pad>")
        if pad_id is None:
            pad_id = self.unk_id if self.unk_id is not None else self.eos_id
        self.pad_id = pad_id
        self.stop_ids = [self.eos_id] + [
            i for i in (raw.token_to_id(t) for t in _OTHER_END_TOKENS) if i is not None and i != self.eos_id
        ]
        self.vocab_size = raw.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path, **token_names):
        """Load a tokenizer.json file, or a directory containing one.

        Special-token names come from (in order of priority) the keyword arguments
        (bos_token=..., eos_token=..., pad_token=..., unk_token=..., image_token=...),
        tokenizer_config.json / special_tokens_map.json beside the file, then Llama's
        "<s>", "</s>", "<pad>" (or unk), "<unk>", "<image>".
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            directory, file = path, os.path.join(path, "tokenizer.json")
            if not os.path.isfile(file):
                raise FileNotFoundError(f"no tokenizer.json in directory {path}")
        else:
            directory, file = os.path.dirname(path) or ".", path
            if not os.path.isfile(file):
                raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            raw = tokenizers.Tokenizer.from_file(file)
        except Exception as e:  # the Rust side raises plain Exception on a bad file
            raise ValueError(f"cannot read tokenizer.json at {file}: {e}") from e
        names = _special_token_names(directory)
        names.update(token_names)
        return cls(raw, path=file, **names)

    @property
    def image_token_id(self):
        image_id = self.raw.token_to_id(self.image_token)
        if image_id is None:
            raise ValueError(f"tokenizer.json at {self.path} has no {self.image_token!r} token")
        return image_id

    def token_id(self, token):
        """The id of one token string; ValueError when it is not in the vocabulary."""
        token_id = self.raw.token_to_id(token)
        if token_id is None:
            raise ValueError(f"token {token!r} is not in the tokenizer at {self.path}")
        return token_id

    def encode_with_offsets(self, text, *, add_bos=True):
        """text -> (ids: list[int], offsets: list[(start, end)]) character offsets into `text`.

        The tokenizer's own post-processor (Llama's adds "<s>") is NOT applied; BOS is
        prepended here when add_bos=True, unless the text already starts with it -- so there
        is never a double BOS. The prepended BOS has offsets (0, 0).
        """
        return self._with_bos(self.raw.encode(text, add_special_tokens=False), add_bos)

    def encode_batch_with_offsets(self, texts, *, add_bos=True):
        """`encode_with_offsets` of many texts in one call, which the tokenizers library spreads over the
        machine's cores: the same (ids, offsets) per text, in order."""
        return [self._with_bos(e, add_bos) for e in self.raw.encode_batch(list(texts), add_special_tokens=False)]

    def _with_bos(self, encoding, add_bos):
        ids, offsets = list(encoding.ids), [tuple(o) for o in encoding.offsets]
        if add_bos:
            if self.bos_id is None:
                raise ValueError(f"add_bos=True but the tokenizer at {self.path} has no BOS token")
            if not ids or ids[0] != self.bos_id:
                ids, offsets = [self.bos_id] + ids, [(0, 0)] + offsets
        return ids, offsets

    def encode(self, text, add_bos=True):
        """text -> list[int] (BOS first when add_bos, never twice)."""
        return self.encode_with_offsets(text, add_bos=add_bos)[0]

    def decode(self, ids, *, skip_special_tokens=False):
        """list[int] or 1-D tensor -> text, through the tokenizer.json's decoder."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.raw.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __len__(self):
        return self.vocab_size


# ----------------------------------------------------------------------------------------
# Conversations -> ids and labels mask
# ----------------------------------------------------------------------------------------


def _answer_mask(offsets, spans):
    """For each token (character offsets [start, end), in text order): whether it overlaps any answer
    span [s, e) (sorted, disjoint). One sweep over both lists.

    A zero-width token counts as covering its start character. A space-prefixed token
    ("▁cat" covering " cat") overlaps the answer it begins, so it counts as an answer token.
    """
    mask, i = [], 0
    for start, end in offsets:
        end = max(end, start + 1)
        while i < len(spans) and spans[i][1] <= start:  # spans that end before this token: passed
            i += 1
        mask.append(i < len(spans) and spans[i][0] < end)
    return mask


def encode_conversation(tokenizer, turns, *, num_images, image_tokens_per_image, max_length=None,
                        system=SYSTEM, add_bos=True):
    """Render turns, tokenise once, expand image tokens, and mark the assistant tokens.

    Source: LLaVA-1.5 template (see `render_conversation`); image expansion follows the
    Hugging Face LLaVA convention (each <image> becomes `image_tokens_per_image` copies of
    the image token id, 576 for LLaVA-1.5 at 336 px); the mask is what LLaVA's training code
    leaves unmasked in its labels: the answer tokens including their end token "</s>".

    tokenizer: a `Tokenizer`. turns: list of (question, answer | None), see
    `render_conversation`. num_images: how many images go with this conversation; when > 0
    "<image>\\n" is placed before the first question, and the total number of <image>
    markers in the text must equal num_images.
    Returns dict: input_ids LongTensor [T], assistant_mask BoolTensor [T] (True exactly on
    answer tokens and their "</s>"), text (the rendered string), answer_spans.
    """
    text, spans = _render_checked(tokenizer, turns, num_images, image_tokens_per_image, system)
    ids, offsets = tokenizer.encode_with_offsets(text, add_bos=add_bos)
    return _ids_and_mask(tokenizer, text, spans, ids, offsets, num_images, image_tokens_per_image, max_length)


def encode_conversations(tokenizer, conversations, *, image_tokens_per_image, max_length=None, system=SYSTEM,
                         add_bos=True, names=None):
    """`encode_conversation` of many conversations, their texts tokenised in one batch call (spread over the
    cores by the tokenizers library: a data set's worth in about half the time on two cores).

    conversations: (turns, num_images) pairs. Returns the same dicts as one `encode_conversation` call
    each, in order. The first bad conversation raises its ValueError, with its name in front:
    ``names[i]`` if given, else "conversation i".
    """
    def failed(i, error):
        return ValueError(f"{names[i] if names is not None else f'conversation {i}'}: {error}")

    conversations, rendered = list(conversations), []
    for i, (turns, num_images) in enumerate(conversations):
        try:
            rendered.append(_render_checked(tokenizer, turns, num_images, image_tokens_per_image, system))
        except (ValueError, TypeError) as error:
            raise failed(i, error) from None
    tokenised = tokenizer.encode_batch_with_offsets([text for text, _ in rendered], add_bos=add_bos)
    encoded = []
    for i, ((_, num_images), (text, spans), (ids, offsets)) in enumerate(zip(conversations, rendered, tokenised)):
        try:
            encoded.append(_ids_and_mask(tokenizer, text, spans, ids, offsets, num_images, image_tokens_per_image,
                                         max_length))
        except ValueError as error:
            raise failed(i, error) from None
    return encoded


def _render_checked(tokenizer, turns, num_images, image_tokens_per_image, system):
    """`render_conversation` with the argument checks of `encode_conversation` -> (text, answer spans)."""
    if num_images < 0:
        raise ValueError(f"encode_conversation: num_images must be >= 0, got {num_images}")
    if image_tokens_per_image < 1:
        raise ValueError(f"encode_conversation: image_tokens_per_image must be >= 1, got {image_tokens_per_image}")
    text, spans = render_conversation(turns, image=num_images > 0, system=system)
    num_markers = text.count(tokenizer.image_token)
    if num_markers != num_images:
        raise ValueError(
            f"encode_conversation: the conversation has {num_markers} {tokenizer.image_token!r} "
            f"marker(s) but num_images={num_images}"
        )
    return text, spans


def _ids_and_mask(tokenizer, text, spans, ids, offsets, num_images, image_tokens_per_image, max_length):
    """The rest of `encode_conversation`, after tokenising: the answer mask, then each <image> expanded."""
    mask = _answer_mask(offsets, spans)
    if num_images > 0:
        image_id = tokenizer.image_token_id  # ValueError when the vocabulary lacks <image>
        if ids.count(image_id) != num_images:
            raise ValueError(
                f"encode_conversation: {num_images} {tokenizer.image_token!r} marker(s) in the text "
                f"became {ids.count(image_id)} image token(s); the tokenizer at {tokenizer.path} must "
                f"have {tokenizer.image_token!r} as one added (special) token"
            )
        expanded_ids, expanded_mask = [], []
        for token_id, in_answer in zip(ids, mask):
            if token_id == image_id:
                expanded_ids += [image_id] * image_tokens_per_image
                expanded_mask += [False] * image_tokens_per_image
            else:
                expanded_ids.append(token_id)
                expanded_mask.append(in_answer)
        ids, mask = expanded_ids, expanded_mask

    if max_length is not None and len(ids) > max_length:
        raise ValueError(
            f"encode_conversation: the conversation is {len(ids)} tokens long (with {num_images} "
            f"image(s) of {image_tokens_per_image} tokens each), more than max_length={max_length}"
        )
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "assistant_mask": torch.tensor(mask, dtype=torch.bool),
        "text": text,
        "answer_spans": spans,
    }


def encode_prompt(tokenizer, question, *, num_images=1, image_tokens_per_image, max_length=None,
                  system=SYSTEM, add_bos=True):
    """A generation prompt `{system} USER: <image>\\n{question} ASSISTANT:` -> ids.

    Same rules and errors as `encode_conversation`; returns dict with input_ids LongTensor
    [T] and text. (For a multi-turn prompt, call `encode_conversation` with the last answer
    None.)
    """
    encoded = encode_conversation(
        tokenizer, [(question, None)], num_images=num_images, image_tokens_per_image=image_tokens_per_image,
        max_length=max_length, system=system, add_bos=add_bos,
    )
    return {"input_ids": encoded["input_ids"], "text": encoded["text"]}


def pad_batch(sequences, pad_id, *, side="right"):
    """Stack variable-length 1-D sequences into one [B, T] tensor, T = the longest length.

    sequences: list of list[int] or of 1-D tensors (the output keeps a tensor input's dtype,
        so bool masks padded with pad_id=False stay bool; lists become int64).
    side: "right" (training: tokens at 0..len-1) or "left" (generation: tokens end at T-1).
    Returns (padded [B, T], lengths LongTensor [B]).
    """
    if side not in ("right", "left"):
        raise ValueError(f"pad_batch: side must be 'right' or 'left', got {side!r}")
    sequences = list(sequences)
    if not sequences:
        raise ValueError("pad_batch: got no sequences")
    rows = []
    for i, seq in enumerate(sequences):
        row = seq if isinstance(seq, torch.Tensor) else torch.tensor(list(seq), dtype=torch.long)
        if row.dim() != 1:
            raise ValueError(f"pad_batch: sequence {i} has shape {tuple(row.shape)}, expected 1-D")
        rows.append(row)
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)
    longest = int(lengths.max())
    padded = torch.full((len(rows), longest), pad_id, dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        if side == "right":
            padded[i, : len(row)] = row
        else:
            padded[i, longest - len(row) :] = row
    return padded, lengths
