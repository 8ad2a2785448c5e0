"""services/worker/flat_step.py: the cache a request gets, and which models run one request per step."""
import torch
from helpers import family_config
from transformers import AutoModelForCausalLM, DynamicCache

from services.worker.flat_step import StepCache, FlatStep, own_cache_class


def meta_model(family: str):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(family_config(family))


def test_a_model_with_a_cache_class_of_its_own_gets_it_per_request_and_in_the_step():
    model = meta_model("minimax")
    own = own_cache_class(model)
    assert own is not None and own.__name__ == "MiniMaxCache"
    flat = FlatStep(model)
    assert type(flat.new_cache()) is own
    assert issubclass(flat.step_cache, own) and issubclass(flat.step_cache, StepCache)  # passes its isinstance
    assert flat.recurrent, "its state is reachable per request only: one request per step"


def test_other_models_get_a_dynamic_cache_and_batch():
    model = meta_model("mixtral")
    assert own_cache_class(model) is None
    flat = FlatStep(model)
    assert type(flat.new_cache()) is DynamicCache and flat.step_cache is StepCache
    assert not flat.recurrent
