"""search: the decoding engine, CSR's sentence-level beam search, n-sample generation, best-of-N.

- ``engine``: prefill once, fork the KV cache, decode all rows together (``generate``, ``Decoder``);
- ``sampling_ops``: greedy / temperature / top-k / top-p inside the step, with a counter-based RNG;
- ``cuda_graph``: capture and replay of the decode step on GPU;
- ``sentence_beam``: CSR's sentence-level beam search (``sentence_beam_search``, ``chosen_and_rejected``);
- ``sampling``: RLAIF-V's n samples per prompt, response log-probs, best-of-N with the implicit reward.
"""

from .engine import Decoder, DecodeOutput, Generation, StepConfig, decode_step, generate
from .sampling import (BestOfN, best_of_n, implicit_reward, implicit_reward_scorer, response_logprobs,
                       sample_responses)
from .sampling_ops import mix_seeds, sample_tokens
from .sentence_beam import (Candidates, Response, Sentence, chosen_and_rejected, default_decode_fn,
                            mean_logprob_score, select_top_bottom, sentence_beam_search)

__all__ = [
    "Decoder", "DecodeOutput", "Generation", "StepConfig", "decode_step", "generate",
    "BestOfN", "best_of_n", "implicit_reward", "implicit_reward_scorer", "response_logprobs", "sample_responses",
    "mix_seeds", "sample_tokens",
    "Candidates", "Response", "Sentence", "chosen_and_rejected", "default_decode_fn", "mean_logprob_score",
    "select_top_bottom", "sentence_beam_search",
]
