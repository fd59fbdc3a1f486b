"""lvlm: a LLaVA-1.5-style vision-language model, CLIP, tokenizer and image pipeline in plain PyTorch."""

from .clip import CLIPModel, CLIPVisionModel
from .config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig, preset, read_config, write_config
from .kv_cache import KVCache
from .llama import LlamaForCausalLM
from .llava import LlavaForConditionalGeneration
