"""Tokenizer, processors, chat templates and tiny configs of the two MiniBench families.

The tokenizer is a byte-level BPE trained here on the synthetic corpus, with the special tokens of the real
checkpoints (Qwen2-VL's ``<|im_start|>``, ``<|vision_start|>``, ``<|image_pad|>``, ``<|box_start|>`` ...;
InternVL's ``<img>``, ``</img>``, ``<IMG_CONTEXT>``), digits split one per token. Each family directory holds what
transformers' Auto classes and lmms-eval's ``qwen2_vl`` / ``internvl_hf`` backends load: config + weights,
tokenizer, processor (image + video processor) and the chat template.
"""

from __future__ import annotations

from .tasks import SIZE

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>",
]  # fmt: skip
INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                   "video_token": "<video>"}  # fmt: skip
SYSTEM_PROMPT = "You are a helpful assistant."  # lmms-eval's qwen2_vl backend sends this system turn

# Qwen2-VL's chat format: a default system turn, the image as <|vision_start|><|image_pad|><|vision_end|>.
QWEN2_VL_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# InternVL's chat format (ChatML), the image as <IMG_CONTEXT> expanded by the processor to <img>...</img>.
INTERNVL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<IMG_CONTEXT>\n{% elif part['type'] == 'video' %}<video>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(corpus, vocab_size: int):
    """A byte-level BPE (transformers' fast tokenizer) trained on `corpus`, with both families' special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits and capital letters one per token: numbers (values, box coordinates) and OCR strings are read and
    # written glyph by glyph (a merged "XK" token would make reading a two-glyph string a 400-way guess).
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Split(Regex("[A-Z]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens=INTERNVL_TOKENS, model_max_length=1024)  # fmt: skip


def make_processor(family: str, tokenizer):
    if family == "qwen2_vl":
        from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

        image = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=SIZE * SIZE)
        return Qwen2VLProcessor(image_processor=image, video_processor=Qwen2VLVideoProcessor(), tokenizer=tokenizer,
                                chat_template=QWEN2_VL_TEMPLATE)  # fmt: skip
    if family == "internvl":
        from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

        # One 112 px tile per image (no tiling): 8 x 8 patches, pixel-shuffled to 16 tokens.
        image = GotOcr2ImageProcessor(size={"height": SIZE, "width": SIZE}, crop_to_patches=False)
        video = InternVLVideoProcessor(size={"height": SIZE, "width": SIZE})
        return InternVLProcessor(image_processor=image, video_processor=video, tokenizer=tokenizer,
                                 image_seq_length=16, chat_template=INTERNVL_TEMPLATE)  # fmt: skip
    raise ValueError(f"unknown MiniBench family {family!r}")


def model_config(family: str, tokenizer, hidden: int, layers: int, vision_depth: int, vision_width: int = 64):
    ids = tokenizer.convert_tokens_to_ids
    heads = 4
    head_dim = hidden // heads
    text = {"hidden_size": hidden, "intermediate_size": 3 * hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                "num_key_value_heads": 2, "vocab_size": len(tokenizer), "max_position_embeddings": 1024, "tie_word_embeddings": False,
                "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"), "pad_token_id": ids("<|endoftext|>"),
                "rope_theta": 10000.0}  # fmt: skip
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig

        third = head_dim // 8 + head_dim // 16
        text["rope_scaling"] = {"type": "mrope", "mrope_section": [head_dim // 2 - 2 * third, third, third]}
        vision = {"depth": vision_depth, "embed_dim": vision_width, "hidden_size": hidden, "num_heads": 4, "mlp_ratio": 2, "patch_size": 14,
                      "spatial_merge_size": 2, "in_channels": 3, "temporal_patch_size": 2}  # fmt: skip
        return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                             video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                             vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False)  # fmt: skip
    if family == "internvl":
        from transformers import InternVLConfig

        text["model_type"] = "qwen2"
        vision = {"hidden_size": vision_width, "intermediate_size": 2 * vision_width, "num_hidden_layers": vision_depth, "num_attention_heads": 4,
                      "image_size": [SIZE, SIZE], "patch_size": [14, 14], "use_mask_token": False}  # fmt: skip
        return InternVLConfig(text_config=text, vision_config=vision, image_token_id=ids("<IMG_CONTEXT>"),
                              downsample_ratio=0.5, image_seq_length=16)  # fmt: skip
    raise ValueError(f"unknown MiniBench family {family!r}")


def new_model(family: str, tokenizer, seed: int, **sizes):
    import torch
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(model_config(family, tokenizer, **sizes), dtype=torch.float32)
