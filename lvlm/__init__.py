"""lvlm: a LLaVA-1.5-style vision-language model, CLIP, tokenizer and image pipeline in plain PyTorch."""

from .checkpoint import copy_tokenizer, load_clip, load_lvlm, save_clip, save_lvlm
from .clip import CLIPModel, CLIPVisionModel
from .config import (CLIPConfig, CLIPTextConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig, preset, read_config,
                     write_config)
from .image import CLIP_MEAN, CLIP_STD, load_image, preprocess_image, preprocess_images
from .kv_cache import KVCache
from .llama import LlamaForCausalLM
from .llava import LlavaForConditionalGeneration
from .tokenizer import SYSTEM, Tokenizer, encode_conversation, encode_prompt, pad_batch, render_conversation, render_prompt
