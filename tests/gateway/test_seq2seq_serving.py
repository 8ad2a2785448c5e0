"""Switch Transformers and NLLB-MoE served through the gateway (``moeinf serve``: memd + worker + gateway as real
processes, 25% expert memory): /v1/completions text to text, equal to transformers' ``generate`` on the same
checkpoint; NLLB's target language is a request field, required, and becomes the output's first token."""
import json
import urllib.error
import urllib.request

import pytest
import torch
from helpers import write_seq2seq, write_word_tokenizer
from serving import Served

LANGS = ("eng_Latn", "fra_Latn", "deu_Latn")
PROMPTS = ["w5 w9 w22 w7 w33", "w44 w3 w17 w100 w8 w8 w61"]


def post(url: str, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def expected_text(model_dir, prompt: str, max_tokens: int, **generate) -> str:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([tok(prompt).input_ids])
    out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, **generate)[0, 1:]
    return tok.decode(out.tolist(), skip_special_tokens=True)


# CI's time: nllb-moe's worker path is in tests/worker/test_seq2seq.py; its gateway run under -m slow
@pytest.mark.parametrize("family", ["switch_transformers", pytest.param("nllb-moe", marks=pytest.mark.slow)])
def test_seq2seq_served_through_the_gateway(family, tmp_path):
    model_dir = write_seq2seq(family, tmp_path / "m")
    write_word_tokenizer(model_dir, 320, LANGS)
    nllb = family == "nllb-moe"
    fra = 320 - len(LANGS) + LANGS.index("fra_Latn")
    want = [expected_text(model_dir, p, 8, **({"forced_bos_token_id": fra} if nllb else {})) for p in PROMPTS]
    assert len(set(want)) == len(PROMPTS), "degenerate oracle"
    served = Served(model_dir, tmp_path / "state")
    try:
        lang = {"target_language": "fra_Latn"} if nllb else {}
        for prompt, text in zip(PROMPTS, want):
            status, body = post(served.url, "/v1/completions", {"model": "m", "prompt": prompt, "max_tokens": 8,
                                                                 "temperature": 0, **lang})
            assert status == 200, body
            assert body["choices"][0]["text"] == text
            assert body["usage"]["completion_tokens"] == 8
        status, body = post(served.url, "/v1/chat/completions", {"model": "m", "max_tokens": 4,
                                                                  "messages": [{"role": "user", "content": "w5"}]})
        assert status == 400 and "text-to-text" in body["error"]["message"], body
        if nllb:
            status, body = post(served.url, "/v1/completions", {"model": "m", "prompt": "w5", "max_tokens": 4})
            assert status == 400 and body["error"]["param"] == "target_language", body
            for code in ("xx_Nope", "</s>", "w5"):  # unknown, an end token, a plain word
                status, body = post(served.url, "/v1/completions", {"model": "m", "prompt": "w5", "max_tokens": 4,
                                                                     "target_language": code})
                assert status == 400 and "not a language code" in body["error"]["message"], (code, body)
            status, body = post(served.url, "/v1/completions", {"model": "m", "prompt": "w5", "max_tokens": 1,
                                                                 "target_language": "fra_Latn"})
            assert status == 400 and body["error"]["param"] == "max_tokens", body
    finally:
        served.close()
    assert served.proc.returncode == 0, served.log.read_text(errors="replace")
