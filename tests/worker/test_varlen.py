"""services/worker/varlen.py: the cache a request gets, and which models run one request per step."""
import torch
from helpers import family_config
from transformers import AutoModelForCausalLM, DynamicCache

from services.worker.varlen import StepCache, Varlen, own_cache_class


def meta_model(family: str):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(family_config(family))


def test_a_model_with_a_cache_class_of_its_own_gets_it_per_request_and_in_the_step():
    model = meta_model("minimax")
    own = own_cache_class(model)
    assert own is not None and own.__name__ == "MiniMaxCache"
    varlen = Varlen(model)
    assert type(varlen.new_cache()) is own
    assert issubclass(varlen.step_cache, own) and issubclass(varlen.step_cache, StepCache)  # passes its isinstance
    assert varlen.recurrent, "its state is reachable per request only: one request per step"


def test_other_models_get_a_dynamic_cache_and_batch():
    model = meta_model("mixtral")
    assert own_cache_class(model) is None
    varlen = Varlen(model)
    assert type(varlen.new_cache()) is DynamicCache and varlen.step_cache is StepCache
    assert not varlen.recurrent
