"""Incremental detokenization never splits a character; stop strings match across chunk boundaries."""
import pytest

from services.gateway.text import IncrementalDetokenizer, StopMatcher, TextCodec


@pytest.fixture(scope="module")
def codec(demo_model):
    return TextCodec(demo_model)


@pytest.mark.parametrize("text", ["héllo wörld", "日本語のテキスト", "emoji 🎉🚀 mix ñ",
                                  "plain ascii words here"])
def test_stream_of_single_tokens_reassembles_the_text(codec, text):
    ids = codec.encode(text)[1:] if codec.encode(text)[:1] == [codec.tokenizer.bos_token_id] else codec.encode(text)
    detok = IncrementalDetokenizer(codec, [codec.tokenizer.bos_token_id])
    pieces = [detok.add([t]) for t in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == codec.decode(ids)
    assert all("\ufffd" not in p for p in pieces), "a multi-byte character was split"


@pytest.mark.parametrize("token", ["<0x80>", "<unk>"])
def test_tokens_that_add_no_text_keep_the_window_small(codec, token):
    """A run of invalid bytes or skipped special tokens: each call decodes a few tokens (it decoded the whole run,
    quadratic on the event loop), invalid bytes go out as U+FFFD after MAX_HELD tokens, and text after the run
    still comes through whole."""
    from services.gateway.text import MAX_HELD
    tid = codec.tokenizer.convert_tokens_to_ids(token)
    detok = IncrementalDetokenizer(codec, [codec.tokenizer.bos_token_id])
    out = "".join(detok.add([tid]) for _ in range(500))
    assert len(detok.ids) - detok.prefix_offset <= MAX_HELD + 1
    assert out == ("\ufffd" * (500 - len(detok.ids) + detok.read_offset) if token == "<0x80>" else "")
    words = [t for t in codec.encode("plain words") if t != codec.tokenizer.bos_token_id]
    assert (out + "".join(detok.add([t]) for t in words) + detok.flush()).endswith("plain words")


def test_mistral_instruct_format_without_template(codec):
    ids = codec.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert ids[0] == codec.tokenizer.bos_token_id
    assert codec.decode(ids).strip() == "[INST] Be brief.\n\nHi [/INST]"


@pytest.mark.parametrize("messages,text", [
    ([{"role": "system", "content": "Be a pirate."}], "[INST] Be a pirate. [/INST]"),
    ([{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "U"}],
     "[INST] S [/INST]A[INST] U [/INST]"),
    ([{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A"}, {"role": "system", "content": "S"},
      {"role": "user", "content": "U2"}], "[INST] S\n\nU1 [/INST]A[INST] U2 [/INST]"),
])
def test_mistral_instruct_keeps_the_system_text(codec, messages, text):
    """Without a template the system text opens the first user turn, or is a turn of its own (never dropped)."""
    assert codec.decode(codec.encode_chat(messages)).replace(" ", "") == text.replace(" ", "")


@pytest.mark.parametrize("chunks,stops,emitted,stopped,held", [
    (["Hello wor", "ld STOP here"], ["STOP"], "Hello world ", True, ""),
    (["abc S", "T", "OP def"], ["STOP"], "abc ", True, ""),
    (["no stop at all"], ["STOP"], "no stop at all", False, ""),
    (["x", "yz"], ["yz", "xy"], "", True, ""),
    (["partial ST"], ["STOP"], "partial ", False, "ST"),
])
def test_stop_matcher(chunks, stops, emitted, stopped, held):
    matcher = StopMatcher(stops)
    assert "".join(matcher.feed(c) for c in chunks) == emitted
    assert matcher.stopped is stopped
    assert matcher.flush() == held
