"""Tokenization, chat templates, incremental detokenization and stop strings. Only token ids cross to the worker."""
from __future__ import annotations

from pathlib import Path

from jinja2 import TemplateError

REPLACEMENT = "\ufffd"
MAX_HELD = 4  # tokens held back for an unfinished character (UTF-8's longest is 4 bytes): then it goes out as is


class TemplateRefused(ValueError):
    """The model's chat template raised on the request's messages: the client's to fix (a 400 on ``messages``)."""


class TextCodec:
    def __init__(self, model_dir: Path, cache_entries: int | None = None):
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except Exception as exc:  # transformers raises many types for a missing or broken tokenizer
            raise RuntimeError(f"{model_dir} has no usable tokenizer ({exc}); the gateway needs one") from None
        self.cache_bounded = cache_entries is not None and bound_cache(self.tokenizer, cache_entries)
        self.has_template = bool(getattr(self.tokenizer, "chat_template", None))
        # no token spells more characters than its vocabulary string has: a text longer than this many characters
        # per token of context cannot fit (x2 for normalizers that compose characters)
        self.vocab = self.tokenizer.get_vocab()  # token -> id, added tokens (language codes) included
        self.max_chars_per_token = 2 * max((len(t) for t in self.vocab), default=1)

    def too_long(self, chars: int, max_tokens: int) -> bool:
        """True when ``chars`` characters surely tokenize to more than ``max_tokens`` tokens (no tokenizing)."""
        return chars > self.max_chars_per_token * max_tokens

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    def language_id(self, code: str) -> int | None:
        """The token of a language code (``fra_Latn``): a special token of the tokenizer other than its
        begin/end/padding/unknown tokens; None when it has no such token."""
        tok = self.tokenizer
        plain = {tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token}
        if code in plain or code not in set(tok.all_special_tokens):
            return None
        return self.vocab.get(code)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        if self.has_template:
            try:
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            except TemplateError as exc:  # the template's own raise_exception: roles that must alternate, ...
                raise TemplateRefused(f"the model's chat template refused these messages: {exc}") from None
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return self.mistral_instruct(messages)

    def mistral_instruct(self, messages: list[dict]) -> list[int]:
        """Mistral's ``[INST]`` format, for tokenizers without a chat template (the demo model): the system text
        opens the first user turn, or a turn of its own where no user turn comes before an assistant's (or at all).
        A message ``name`` needs a template (``TemplateRefused``)."""
        if any("name" in msg for msg in messages):
            raise TemplateRefused("this model's tokenizer has no chat template, and messages' 'name' needs one")
        tok = self.tokenizer
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        ids = [tok.bos_token_id] if tok.bos_token_id is not None else []
        for msg in [m for m in messages if m["role"] != "system"]:
            if msg["role"] == "user":
                content = f"{system}\n\n{msg['content']}" if system else msg["content"]
                system = ""
                ids += tok.encode(f"[INST] {content} [/INST]", add_special_tokens=False)
                continue
            if system:  # an assistant's turn before any user's: the system text is a turn of its own
                ids += tok.encode(f"[INST] {system} [/INST]", add_special_tokens=False)
                system = ""
            ids += tok.encode(msg["content"], add_special_tokens=False)
            if tok.eos_token_id is not None:
                ids.append(tok.eos_token_id)
        if system:  # only system messages
            ids += tok.encode(f"[INST] {system} [/INST]", add_special_tokens=False)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def bound_cache(tokenizer, entries: int) -> bool:
    """Keep at most ``entries`` words in the tokenizer's cache of BPE or Unigram results (tokenizers' own bound:
    10,000). A pre-tokenizer that does not split words (SentencePiece-style Metaspace, as Mistral's) makes a whole
    prompt of up to 256 characters one word, ~3.5 KiB cached, so with the default bound every new short prompt grows
    the gateway until 10,000 of them are held (docs/soak.md). False when the tokenizer has no such cache."""
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    resize = getattr(model, "_resize_cache", None)  # BPE and Unigram models (tokenizers >= 0.21)
    if resize is None:
        return False
    resize(entries)
    return True


class IncrementalDetokenizer:
    """Emits text as tokens arrive without splitting a multi-byte character (vLLM's prefix/read offsets). Tokens
    that add no text (skipped special ones) move the window on, and an unfinished character is held at most
    ``MAX_HELD`` tokens (invalid bytes then go out as U+FFFD), so each token decodes a few tokens, never the whole
    generation again (a run of such tokens made every call longer: quadratic time on the event loop)."""

    def __init__(self, codec: TextCodec, prompt_ids: list[int]):
        self.codec = codec
        self.ids = list(prompt_ids[-6:])  # a little context so the first token's leading space decodes right
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, tokens: list[int]) -> str:
        self.ids.extend(tokens)
        prefix = self.codec.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.codec.decode(self.ids[self.prefix_offset:])
        if full.endswith(REPLACEMENT) and len(self.ids) - self.read_offset < MAX_HELD:
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]  # ("" where nothing was added)

    def flush(self) -> str:
        """At the end, whatever is left (even an incomplete character)."""
        prefix = self.codec.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.codec.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):]  # ("" where nothing was added)


class StopMatcher:
    """Finds stop strings across chunk boundaries; holds back text that may be the start of a stop string."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Return the text that is safe to emit now; sets ``stopped`` when a stop string was found."""
        if not self.stops:
            return text
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            index = min(h[0] for h in hits)
            self.stopped = True
            out, self.pending = self.pending[:index], ""
            return out
        keep = self._held_suffix()
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _held_suffix(self) -> int:
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(stop[:n]):
                    longest = n
                    break
        return longest
