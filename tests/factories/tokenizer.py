"""Small tokenizers trained in-process (milliseconds), for router and tiny-model tests.

`train_byte_level_tokenizer` is GPT-2 style (byte-level BPE, like SmolLM2): every string
round-trips. `train_sentencepiece_style_tokenizer` mimics Llama/SentencePiece (`▁` word marker,
byte fallback, a decoder that strips the first leading space), so detokenizer tests cover the
"decode of a suffix differs from the suffix of a decode" case. Both are deterministic: the BPE
trainer breaks frequency ties by content, not by hash order (checked across processes by
`tests/unit/test_detokenizer.py`).
"""

from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

# English, accented Latin, Cyrillic, Greek, CJK, Japanese, Arabic and emoji, so that the
# trained merges include multi-byte characters and many characters stay split into bytes.
CORPUS = (
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.",
    "Hello, world! Hello again, world. How are you today? I am fine, thank you.",
    "Once upon a time there was a tiny model that generated one token at a time.",
    "Café crème brûlée, naïve façade, Ångström, señor, Zürich, São Paulo, Kraków, Dvořák.",
    "Привет, мир! Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Γειά σου κόσμε. Καλημέρα σας.",
    "你好，世界。今天天气很好。我们一起学习中文和数学。",
    "こんにちは世界。東京は大きな都市です。",
    "مرحبا بالعالم",
    "Emoji: 😀 🚀 🎉 👍🏽 ❤️ 🇫🇷 👩‍💻 🐍 ✨",
    "Numbers 0123456789, symbols ~!@#$%^&*()_+-=[]{}|;':\",./<>? and tabs\tand\nnewlines.",
)


def train_byte_level_tokenizer(vocab_size: int = 400) -> Tokenizer:
    """A byte-level BPE with `<|endoftext|>` = 0 and `<|pad|>` = 1; decode(encode(s)) == s.

    `vocab_size` counts the 2 special tokens and the 256 byte symbols, so it must be > 258.
    """
    if vocab_size <= 258:
        raise ValueError(f"vocab_size must exceed 258 (2 special + 256 bytes), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 3, trainer=trainer)
    return tokenizer


def train_sentencepiece_style_tokenizer(vocab_size: int = 200) -> Tokenizer:
    """A Llama-style BPE: `<unk>` = 0, `<s>` = 1, `</s>` = 2, then 256 `<0xNN>` byte tokens.

    Characters outside the trained alphabet (most non-ASCII) encode as byte tokens, and the
    decoder strips one leading space, so `decode(["▁Hi"])` is "Hi" while in context it is " Hi".
    `<s>` is prepended by the post-processor (as Llama does).
    """
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=["<unk>", "<s>", "</s>"],
        limit_alphabet=64,
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS[:3] * 3, trainer=trainer)
    return _with_byte_fallback(tokenizer)


def _with_byte_fallback(tokenizer: Tokenizer) -> Tokenizer:
    # The trainer cannot emit byte tokens, so they are appended to the trained vocabulary and
    # the model, decoder and post-processor are set as in Llama's tokenizer.json.
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<s>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [
            {"SpecialToken": {"id": "<s>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }
    return Tokenizer.from_str(json.dumps(spec))
