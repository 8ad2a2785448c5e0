"""A device pool held in chunks (``pool_views.ChunkWindows``, what ``CudaPoolViews`` opens by IPC), on CPU tensors:
a window inside one chunk is a view; a layer whose slots lie in several chunks computes on the experts in use,
copied side by side, with ``top_k_index`` remapped into them (the GPU runs it in ``test_cuda_worker.py``)."""
from types import SimpleNamespace

import torch

from services.worker import experts
from services.worker.pool_views import ChunkWindows

CHUNK, SLOTS = 4, 8


def chunked() -> tuple[ChunkWindows, torch.Tensor]:
    everything = torch.arange(SLOTS * 6, dtype=torch.float32).view(SLOTS, 2, 3)  # slot s holds 6s..6s+5
    views = ChunkWindows()
    views.chunk_slots = CHUNK
    views.chunks = [{"w": everything[i:i + CHUNK].clone()} for i in range(0, SLOTS, CHUNK)]  # separate memory
    views.params = views.chunks[0]
    return views, everything


def test_a_window_in_one_chunk_is_a_view_and_one_across_chunks_a_copy():
    views, everything = chunked()
    assert not views.crosses(4, 8) and views.crosses(3, 5)
    inside = views.window(5, 7)["w"]
    assert inside.data_ptr() == views.chunks[1]["w"][1].data_ptr() and torch.equal(inside, everything[5:7])
    assert torch.equal(views.window(3, 6)["w"], everything[3:6])
    assert torch.equal(views.gather([6, 1])["w"], everything[[6, 1]])


def test_a_layer_across_chunks_computes_on_the_experts_in_use_only(caplog):
    views, everything = chunked()
    binding = SimpleNamespace(views=views, remap=torch.empty(8, dtype=torch.long),
                              proxy=experts.SlotExperts(SimpleNamespace(), views.params, SLOTS, views.window))
    binding.slot_index = lambda *a: experts.ExpertBinding.slot_index(binding, *a)
    routing = SimpleNamespace(index=None, experts=[2, 7])  # expert 2 in slot 6, expert 7 in slot 1
    top_k_index = torch.tensor([[7, 2], [2, 7]])
    with caplog.at_level("WARNING"):
        window, index = experts.ExpertBinding.slot_window(binding, routing, [6, 1], top_k_index)
        experts.ExpertBinding.slot_window(binding, routing, [6, 1], top_k_index)
    assert window.num_experts == 2 and window.w.shape == (2, 2, 3)  # not the 6 slots from 1 to 6
    assert torch.equal(window.w[index], everything[torch.tensor([[1, 6], [6, 1]])])
    assert sum("several pool chunks" in r.message for r in caplog.records) == 1
    same, index = experts.ExpertBinding.slot_window(binding, routing, [5, 6], top_k_index)  # one chunk: a view
    assert same.num_experts == 2 and torch.equal(same.w[index], everything[torch.tensor([[6, 5], [5, 6]])])
