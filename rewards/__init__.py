"""rewards: the reward functions and metrics of CSR, RLAIF-V and Fact-RLHF.

- ``metrics``: CHAIR, POPE and multiple-choice accuracy against ground truth (object vocabulary,
  synonyms, answer parsers);
- ``clip_score``: CSR's image relevance R_I = max(100 * cos, 0) and CLIP text ids;
- ``calibrated``: CSR's self score R_T, the calibrated reward and the released rank variant;
- ``csr_scorer``: ``CalibratedScorer``, the calibrated reward as the sentence beam search's score_fn;
- ``claims``: RLAIF-V's divide (claims) and conquer (yes/no questions), by rule or by a model;
- ``labeler``: RLAIF-V's labeler forward (``label_questions``) and verdicts, response score -n_rejected;
- ``pairs``: RLAIF-V's preference pairs and length balancing;
- ``fact_prompt``: Fact-RLHF's fact-augmented reward-model prompt;
- ``reward_model``: Fact-RLHF's reward model (scalar head), its value model, save/load, batched scoring;
- ``shaping``: LLaVA-RLHF's length, symbolic and missing-end reward shaping.

``labeler.response_score`` (RLAIF-V: -n_rejected) and ``calibrated.response_score`` (CSR: sum of
sentence rewards) share a name in their modules; here they are ``rlaif_response_score`` and
``csr_response_score``. ``rewards.clip_score`` and ``rewards.fact_prompt`` are the functions
(the public names), which hide their modules' names on the package: reach the modules' other
names with ``from rewards.clip_score import clip_text_ids`` (a ``from`` import), not with
``import rewards.clip_score as m``.
"""

from .calibrated import calibrated_reward, rank_normalized_reward, rank_path_score
from .calibrated import response_score as csr_response_score
from .calibrated import self_score
from .claims import (QUESTION_PROMPT, SPLIT_PROMPT, YES_NO_SUFFIX, claim_to_question, claims_to_questions_with_model,
                     claims_to_questions_with_model_batch, labeler_prompt, parse_dash_lines, question_prompt,
                     split_claims, split_claims_with_model, split_claims_with_model_batch, split_prompt)
from .clip_score import clip_score, clip_score_from_features, clip_text_ids
from .csr_scorer import CalibratedScorer
from .fact_prompt import (EVALUATION_HEAD, EVALUATION_TAIL, FACTS_HEADER, PROMPT_TEXTS, evaluation_turn, facts_block,
                          fact_prompt)
from .labeler import answer_token_id, claim_accepted, label_questions, question_logits, rejected_per_response
from .labeler import response_score as rlaif_response_score
from .labeler import yes_no_probabilities
from .metrics import (ObjectVocabulary, build_vocabulary, chair, find_objects, load_synonyms,
                      multiple_choice_accuracy, parse_choice, parse_yes_no, parse_yes_no_pope, pope, score_response)
from .pairs import build_preference_pairs, candidate_pairs, length_balance, word_count
from .reward_model import (RewardModel, load_reward_model, reward_inputs, save_reward_model, score_batch,
                           value_model_from)
from .shaping import (LENGTH_PENALTY_COEF, MISSING_END_PENALTY, REWARD_SCALE, SYMBOLIC_COEF, length_penalty,
                      missing_end_penalty, shaped_score, symbolic_reward)

__all__ = [
    # metrics
    "ObjectVocabulary", "build_vocabulary", "load_synonyms", "find_objects", "score_response", "chair",
    "parse_yes_no", "parse_yes_no_pope", "pope", "parse_choice", "multiple_choice_accuracy",
    # CSR
    "clip_score", "clip_score_from_features", "clip_text_ids",
    "self_score", "calibrated_reward", "rank_normalized_reward", "rank_path_score", "csr_response_score",
    "CalibratedScorer",
    # RLAIF-V
    "split_claims", "claim_to_question", "labeler_prompt", "YES_NO_SUFFIX", "SPLIT_PROMPT", "QUESTION_PROMPT",
    "split_prompt", "question_prompt", "parse_dash_lines", "split_claims_with_model",
    "split_claims_with_model_batch", "claims_to_questions_with_model", "claims_to_questions_with_model_batch",
    "answer_token_id", "question_logits", "label_questions", "yes_no_probabilities", "claim_accepted",
    "rejected_per_response", "rlaif_response_score", "build_preference_pairs", "candidate_pairs", "length_balance", "word_count",
    # Fact-RLHF
    "fact_prompt", "evaluation_turn", "facts_block", "EVALUATION_HEAD", "EVALUATION_TAIL", "FACTS_HEADER",
    "PROMPT_TEXTS",
    "RewardModel", "save_reward_model", "load_reward_model", "value_model_from", "reward_inputs", "score_batch",
    "REWARD_SCALE", "LENGTH_PENALTY_COEF", "SYMBOLIC_COEF", "MISSING_END_PENALTY", "length_penalty",
    "symbolic_reward", "missing_end_penalty", "shaped_score",
]
