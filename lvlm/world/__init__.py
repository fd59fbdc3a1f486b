"""The built-in synthetic world: coloured shapes on a small canvas, with exact ground truth.

With no GPU and no downloadable weights this is where every method runs, is tested and is
taught, and where hallucination is measured exactly (see DESIGN.md, "The synthetic world").

- scene.py     what is in an image (WorldConfig, Scene, sample_scene, splits, the prior)
- render.py    the image (pillow, no anti-aliasing)
- text.py      descriptions (with the prior's noise), captions, instructions, yes/no (POPE)
               and multiple-choice questions
- vocab.py     the object vocabulary and synonyms for the metrics; the oracle preference
- tokenizer.py the world's word-level tokenizer.json

    from lvlm.world import sample_scene, describe
    scene = sample_scene(7)
    scene.image()            # PIL.Image, 64 x 64
    describe(scene).text     # "There is a red circle at the top left. ..."
"""

from .render import render_scene, render_shape
from .scene import (
    DEFAULT_CONFIG,
    PLACES,
    SPLITS,
    Scene,
    WorldConfig,
    WorldObject,
    sample_scene,
    scenes,
    shape_statistics,
    split_of_seed,
    split_seeds,
    world_rng,
)
from .text import (
    DESCRIPTION_INSTRUCTIONS,
    POPE_KINDS,
    ChoiceQuestion,
    Description,
    YesNoQuestion,
    captions,
    describe,
    description_instruction,
    hallucination_candidates,
    multiple_choice_question,
    multiple_choice_questions,
    short_answer_question,
    pope_negatives,
    pope_questions,
    sft_examples,
    yes_no_question,
    yes_no_questions,
)
from .tokenizer import WORLD_SPECIAL_TOKENS, build_world_tokenizer, make_world_tokenizer
from .vocab import (
    ORACLE_REPEATS,
    SHAPE_SYNONYMS,
    find_mentions,
    hallucination_counts,
    object_synonyms,
    oracle_prefers,
    synonym_file_text,
)
