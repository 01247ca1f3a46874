"""IncrementalDetokenizer and RouterTokenizer against the factory tokenizers and SmolLM2's."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from pdserve.errors import Internal
from pdserve.messages import ModelInfo
from router.detokenizer import IncrementalDetokenizer
from router.tokenizer import RouterTokenizer
from tests.factories.tokenizer import (
    CORPUS,
    train_byte_level_tokenizer,
    train_sentencepiece_style_tokenizer,
)

SMOL_DIR = Path("/tmp/smol")
REPLACEMENT = "\ufffd"
PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, database=None)

BYTE_LEVEL = train_byte_level_tokenizer()
SENTENCEPIECE_STYLE = train_sentencepiece_style_tokenizer()
SMOL = (
    Tokenizer.from_file(str(SMOL_DIR / "tokenizer.json"))
    if (SMOL_DIR / "tokenizer.json").exists()
    else None
)
needs_smol = pytest.mark.skipif(SMOL is None, reason="SmolLM2 tokenizer not in /tmp/smol")

# Byte-level tokenizers: the deltas must add up to decode(generated) exactly.
BYTE_LEVEL_TOKENIZERS = [
    pytest.param(BYTE_LEVEL, id="factory"),
    pytest.param(SMOL, id="smollm2", marks=needs_smol),
]


def chunked(token_ids: list[int], chunk_sizes: list[int]) -> list[list[int]]:
    """Splits `token_ids` into consecutive chunks whose sizes cycle through `chunk_sizes`."""
    chunks, pos = [], 0
    while pos < len(token_ids):
        size = chunk_sizes[len(chunks) % len(chunk_sizes)]
        chunks.append(token_ids[pos : pos + size])
        pos += size
    return chunks


def stream(
    detok: IncrementalDetokenizer, token_ids: list[int], chunk_sizes: list[int]
) -> list[str]:
    """Pushes `token_ids` in chunks and returns every delta, then the flush."""
    return [detok.push(chunk) for chunk in chunked(token_ids, chunk_sizes)] + [detok.flush()]


def ids_of(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("tokenizer", BYTE_LEVEL_TOKENIZERS)
def test_character_split_over_byte_tokens_is_emitted_once_complete(tokenizer: Tokenizer) -> None:
    # U+1D11E is outside the factory corpus and rare for SmolLM2: 4 UTF-8 bytes, several tokens.
    prompt = ids_of(tokenizer, "Music:")
    generated = ids_of(tokenizer, " 𝄞")
    assert len(generated) >= 2, "precondition: the character spans several tokens"
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.push([token_id]) for token_id in generated]
    assert all(REPLACEMENT not in delta for delta in deltas)
    assert "".join(deltas) == " 𝄞"
    assert deltas[-1].endswith("𝄞")
    assert detok.flush() == ""


@pytest.mark.parametrize("tokenizer", BYTE_LEVEL_TOKENIZERS)
@pytest.mark.parametrize(
    "text",
    ["你好，世界。今天天气很好。", "Emoji 😀🚀 and flags 🇫🇷 and 👩‍💻", "Привет, мир! café crème"],
)
def test_multibyte_text_streams_token_by_token(tokenizer: Tokenizer, text: str) -> None:
    generated = ids_of(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer, ids_of(tokenizer, "Say:"))
    deltas = stream(detok, generated, [1])
    assert all(REPLACEMENT not in delta for delta in deltas)
    assert "".join(deltas) == text


@pytest.mark.parametrize("tokenizer", BYTE_LEVEL_TOKENIZERS)
def test_leading_spaces_are_kept(tokenizer: Tokenizer) -> None:
    generated = ids_of(tokenizer, "  two spaces then one space")
    detok = IncrementalDetokenizer(tokenizer, ids_of(tokenizer, "Hello"))
    deltas = stream(detok, generated, [1])
    assert deltas[0].startswith(" ")
    assert "".join(deltas) == "  two spaces then one space"


def test_sentencepiece_first_token_keeps_its_space_in_context() -> None:
    tokenizer = SENTENCEPIECE_STYLE
    prompt = tokenizer.encode("Hello").ids
    generated = ids_of(tokenizer, "world again")  # "▁world", "▁again"
    assert tokenizer.decode(generated) == "world again", "precondition: decode strips the space"
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = stream(detok, generated, [1])
    assert deltas[0] == " world"
    assert "".join(deltas) == " world again"


def test_sentencepiece_byte_fallback_character_is_never_split() -> None:
    tokenizer = SENTENCEPIECE_STYLE
    generated = ids_of(tokenizer, "the 你 and é")
    tokens = tokenizer.encode("你", add_special_tokens=False).tokens
    assert sum(t.startswith("<0x") for t in tokens) == 3, "precondition: byte fallback"
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Say").ids)
    deltas = stream(detok, generated, [1])
    assert all(REPLACEMENT not in delta for delta in deltas)
    assert "".join(deltas) == " the 你 and é"
    assert any(delta.endswith("你") for delta in deltas)


def test_special_tokens_are_skipped_unless_asked() -> None:
    eos = BYTE_LEVEL.token_to_id("<|endoftext|>")
    generated = ids_of(BYTE_LEVEL, "done") + [eos]
    skipped = stream(IncrementalDetokenizer(BYTE_LEVEL, []), generated, [1])
    kept = stream(IncrementalDetokenizer(BYTE_LEVEL, [], skip_special_tokens=False), generated, [1])
    assert "".join(skipped) == "done"
    assert "".join(kept) == "done<|endoftext|>"


def test_flush_releases_an_incomplete_character() -> None:
    first_byte = ids_of(BYTE_LEVEL, "𝄞")[0]
    assert BYTE_LEVEL.decode([first_byte]) == REPLACEMENT, "precondition: a lone lead byte"
    detok = IncrementalDetokenizer(BYTE_LEVEL, ids_of(BYTE_LEVEL, "x"))
    assert detok.push(ids_of(BYTE_LEVEL, " ok") + [first_byte]) == ""
    assert detok.flush() == " ok" + REPLACEMENT
    assert detok.num_generated_tokens == len(ids_of(BYTE_LEVEL, " ok")) + 1


def test_prompt_ending_inside_a_character() -> None:
    whole = ids_of(BYTE_LEVEL, "𝄞 end")
    prompt, generated = whole[:1], whole[1:]
    detok = IncrementalDetokenizer(BYTE_LEVEL, ids_of(BYTE_LEVEL, "a") + prompt)
    assert "".join(stream(detok, generated, [1])) == BYTE_LEVEL.decode(generated)


def test_ids_outside_the_tokenizer_decode_to_nothing() -> None:
    detok = IncrementalDetokenizer(BYTE_LEVEL, [])
    assert detok.push([BYTE_LEVEL.get_vocab_size() + 5]) == ""
    assert detok.push(ids_of(BYTE_LEVEL, "ok")) == "ok"


# Text with many multi-byte characters; U+FFFD itself is excluded so any in a delta is a bug.
# Planes 4 and up (unassigned) are left out: SmolLM2's vocabulary lacks their lead bytes.
TEXT = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8", max_codepoint=0x3FFFF, exclude_characters=REPLACEMENT),
        st.sampled_from(list("éжΩ你好世界😀🚀👍🏽🇫🇷 \n")),
    ),
    max_size=40,
)
CHUNK_SIZES = st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=5)


@pytest.mark.parametrize("tokenizer", BYTE_LEVEL_TOKENIZERS)
@PROPERTY_SETTINGS
@given(prompt_text=TEXT, text=TEXT, chunk_sizes=CHUNK_SIZES)
def test_deltas_add_up_to_decode_and_are_prompt(
    tokenizer: Tokenizer, prompt_text: str, text: str, chunk_sizes: list[int]
) -> None:
    prompt, generated = ids_of(tokenizer, prompt_text), ids_of(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    emitted, num_pushed = "", 0
    for chunk in chunked(generated, chunk_sizes):
        delta = detok.push(chunk)
        assert REPLACEMENT not in delta
        emitted += delta
        num_pushed += len(chunk)
        so_far = tokenizer.decode(generated[:num_pushed])
        if not so_far.endswith(REPLACEMENT):
            assert emitted == so_far  # nothing complete is held back
    assert emitted + detok.flush() == tokenizer.decode(generated)


@pytest.mark.parametrize("tokenizer", BYTE_LEVEL_TOKENIZERS)
@PROPERTY_SETTINGS
@given(data=st.data(), chunk_sizes=CHUNK_SIZES)
def test_arbitrary_token_ids_add_up_to_decode(
    tokenizer: Tokenizer, data: st.DataObject, chunk_sizes: list[int]
) -> None:
    ids = st.lists(st.integers(0, tokenizer.get_vocab_size() - 1), max_size=20)
    prompt, generated = data.draw(ids), data.draw(ids)
    deltas = stream(IncrementalDetokenizer(tokenizer, prompt), generated, chunk_sizes)
    assert "".join(deltas) == tokenizer.decode(generated)


@PROPERTY_SETTINGS
@given(prompt_text=TEXT, text=TEXT, chunk_sizes=CHUNK_SIZES)
def test_sentencepiece_deltas_add_up_to_the_suffix_of_the_decode(
    prompt_text: str, text: str, chunk_sizes: list[int]
) -> None:
    tokenizer = SENTENCEPIECE_STYLE
    prompt, generated = tokenizer.encode(prompt_text).ids, ids_of(tokenizer, text)
    deltas = stream(IncrementalDetokenizer(tokenizer, prompt), generated, chunk_sizes)
    expected = tokenizer.decode(prompt + generated)[len(tokenizer.decode(prompt)) :]
    assert "".join(deltas) == expected
    assert all(REPLACEMENT not in delta for delta in deltas)


def model_info(tokenizer: Tokenizer, vocab_size: int | None = None) -> ModelInfo:
    return ModelInfo(
        model="test",
        dtype="float32",
        model_type="llama",
        vocab_size=vocab_size or tokenizer.get_vocab_size(),
        max_context_tokens=512,
        eos_token_ids=[0],
        tokenizer_json=tokenizer.to_str(),
        kv_fingerprint="test",
    )


def test_router_tokenizer_encodes_with_special_tokens() -> None:
    router_tokenizer = RouterTokenizer.from_model_info(model_info(SENTENCEPIECE_STYLE))
    ids = router_tokenizer.encode("Hello world")
    assert ids[0] == SENTENCEPIECE_STYLE.token_to_id("<s>")
    assert ids == SENTENCEPIECE_STYLE.encode("Hello world").ids
    assert router_tokenizer.decode(ids) == "Hello world"
    assert router_tokenizer.eos_token_ids == [0]
    assert router_tokenizer.max_context_tokens == 512


def test_router_tokenizer_reports_the_model_vocab_size() -> None:
    info = model_info(BYTE_LEVEL, vocab_size=BYTE_LEVEL.get_vocab_size() + 64)
    assert RouterTokenizer.from_model_info(info).vocab_size == BYTE_LEVEL.get_vocab_size() + 64


def test_router_tokenizer_ignores_truncation_in_the_json() -> None:
    truncating = Tokenizer.from_str(BYTE_LEVEL.to_str())
    truncating.enable_truncation(max_length=4)
    text = "The quick brown fox jumps over the lazy dog."
    assert len(truncating.encode(text).ids) == 4, "precondition: the JSON truncates"
    router_tokenizer = RouterTokenizer.from_model_info(model_info(truncating))
    assert router_tokenizer.encode(text) == BYTE_LEVEL.encode(text).ids


def test_router_tokenizer_rejects_bad_json() -> None:
    info = model_info(BYTE_LEVEL)
    bad = ModelInfo(**{**info.__dict__, "tokenizer_json": "{not json"})
    with pytest.raises(Internal, match="tokenizer_json"):
        RouterTokenizer.from_model_info(bad)


def test_router_tokenizer_detokenizer_uses_the_prompt_as_context() -> None:
    router_tokenizer = RouterTokenizer.from_model_info(model_info(SENTENCEPIECE_STYLE))
    detok = router_tokenizer.detokenizer(router_tokenizer.encode("Hello"))
    assert detok.push(ids_of(SENTENCEPIECE_STYLE, "world")) == " world"


@needs_smol
def test_router_tokenizer_matches_transformers_for_smollm2() -> None:
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(SMOL_DIR))
    router_tokenizer = RouterTokenizer.from_model_info(
        model_info(Tokenizer.from_str(reference.backend_tokenizer.to_str()))
    )
    for text in ["Hello, world!", " leading space", "你好 😀 café", "<|im_start|>user\nhi"]:
        assert router_tokenizer.encode(text) == reference(text).input_ids


def test_factory_tokenizer_round_trips_and_has_fixed_special_ids() -> None:
    assert BYTE_LEVEL.token_to_id("<|endoftext|>") == 0
    assert BYTE_LEVEL.token_to_id("<|pad|>") == 1
    assert BYTE_LEVEL.get_vocab_size() == 400
    for text in [*CORPUS, "unseen: ʕ•ᴥ•ʔ 𝄞 \x00\t"]:
        assert BYTE_LEVEL.decode(BYTE_LEVEL.encode(text).ids) == text


def test_factory_tokenizers_are_deterministic_across_processes() -> None:
    # The Rust trainer's hash maps are seeded per process, so compare two fresh processes.
    code = (
        "import hashlib; from tests.factories.tokenizer import *; "
        "print(hashlib.sha256(train_byte_level_tokenizer().to_str().encode()).hexdigest(), "
        "hashlib.sha256(train_sentencepiece_style_tokenizer().to_str().encode()).hexdigest())"
    )
    root = Path(__file__).resolve().parents[2]
    runs = {
        subprocess.run(
            [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
        ).stdout
        for _ in range(2)
    }
    local = " ".join(
        hashlib.sha256(t.to_str().encode()).hexdigest() for t in (BYTE_LEVEL, SENTENCEPIECE_STYLE)
    )
    assert runs == {local + "\n"}
