"""recipes/real_size_check.py at test size: stand-in checkpoints written through the real savers, then one CSR
iteration through --model/--clip/--data/--images (the GPU runs the same path at 7B shapes)."""

import json

from tokenizers import Tokenizer as RawTokenizer

from lvlm.checkpoint import load_lvlm
from lvlm.config import preset
from lvlm.tokenizer import Tokenizer
from recipes import real_size_check


def test_word_level_tokenizer_covers_every_id_with_the_special_tokens_in_place():
    special = {0: "<unk>", 1: "<s>", 2: "</s>", 100: "<image>", 101: "<pad>"}
    raw = RawTokenizer.from_str(real_size_check.word_level_tokenizer_json(120, special))
    assert raw.get_vocab_size() == 120
    assert all(raw.token_to_id(token) == i for i, token in special.items())
    assert all(raw.id_to_token(i) for i in range(120))  # a random model's every sample decodes to a word
    # the template's words come first, so a short vocabulary still encodes the prompt without <unk>
    ids = raw.encode("USER: Describe this image in detail. ASSISTANT:").ids
    assert 0 not in ids


def test_one_csr_iteration_on_stand_in_checkpoints(tmp_path):
    result = real_size_check.main(["--size", "tiny", "--prompts", "3", "--work", str(tmp_path)])
    config = preset("tiny-llava")
    tokenizer = Tokenizer.from_file(tmp_path / "model")
    assert tokenizer.vocab_size == config.text_config.vocab_size
    assert tokenizer.image_token_id == config.image_token_index
    pairs = [json.loads(line) for line in (tmp_path / "csr" / "iter1" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 3 and len({p["image"] for p in pairs}) == 3
    trained = load_lvlm(tmp_path / "csr" / "iter1" / "model")
    assert trained.config.text_config.hidden_size == config.text_config.hidden_size
    assert set(result["seconds_per_prompt"]) >= {"collect", "dpo", "save"} and result["prompts"] == 3
