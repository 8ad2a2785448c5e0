"""The worker stops on the model's end-of-sequence tokens and on the tokenizer's own."""
from types import SimpleNamespace

import pytest

from services.gateway.app import Gateway


@pytest.mark.parametrize("model_eos,tokenizer_eos,stops", [
    ([2], 2, [2]),              # the usual: one token, said twice
    ([], 2, [2]),               # a checkpoint whose configs name none: it would run to max_tokens
    ([7, 8], 2, [7, 8, 2]),     # the generation config's own first, as transformers stops
    ([7], None, [7]),
])
def test_stop_token_ids(model_eos, tokenizer_eos, stops):
    gateway = SimpleNamespace(codec=SimpleNamespace(eos_token_id=tokenizer_eos))
    assert Gateway.stop_token_ids(gateway, SimpleNamespace(eos_token_ids=model_eos)) == stops
