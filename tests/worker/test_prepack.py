"""Dense linears packed once for oneDNN (``--prepack-dense``, opt-in): on random inputs of every layout the
families' forwards make, the same bits as ``F.linear``; the dense copy replaced (not doubled); tied, biased and
non-bf16 weights left alone; a shape whose packed bits differ left unpacked."""
import pytest
import torch
from torch import nn

from services.worker import prepack

pytestmark = pytest.mark.skipif(not prepack.available(),
                                reason="this torch or CPU has no oneDNN bfloat16 linear packing")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 96)
        self.q = nn.Linear(96, 128, bias=False)
        self.o = nn.Linear(128, 96, bias=False)
        self.k = nn.Linear(96, 96, bias=True)  # biased: F.linear adds the bias another way
        self.head = nn.Linear(96, 64, bias=False)
        self.head.weight = self.embed.weight  # tied, as many LM heads are
        self.to(torch.bfloat16)
        self.fp32 = nn.Linear(96, 96)  # float32: MKL, not oneDNN

    def forward(self, x):
        return self.head(self.o(self.q(x)) + self.k(x) + self.fp32(x.float()).to(x.dtype))


def inputs():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 17, 96, generator=gen).to(torch.bfloat16)
    return [x[:1, :1], x[:, -1:], x, x[:, ::2], x[0], torch.randn(96, 5, generator=gen).to(torch.bfloat16).t()]


def test_packed_linears_give_the_same_bits_and_replace_the_dense_weights():
    torch.manual_seed(0)
    model = Tiny()
    with torch.inference_mode():
        want = [model(x) for x in inputs()]
    dense = {name: p.data_ptr() for name, p in model.named_parameters()}
    packed = prepack.prepack_dense(model)
    assert (packed.modules, packed.refused) == (2, 0)  # q and o; the biased, the tied and the float32 ones stay
    assert packed.nbytes == (96 * 128 + 128 * 96) * 2
    names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    assert "q.weight" not in names and "o.weight" not in names
    assert {"head.weight", "k.weight", "fp32.weight"} <= names
    assert model.q.weight.is_mkldnn and tuple(model.q.weight.shape) == (128, 96)
    assert model.head.weight.data_ptr() == dense["embed.weight"]
    with torch.inference_mode():
        for x, w in zip(inputs(), want):  # the last input's rows are not contiguous: F.linear on the unpacked weight
            assert torch.equal(model(x), w)


def test_a_shape_whose_packed_bits_differ_stays_unpacked(monkeypatch, caplog):
    model = Tiny()
    monkeypatch.setattr(prepack, "_same_bits", lambda weight, packed: weight.shape[0] != 128)
    packed = prepack.prepack_dense(model)
    assert (packed.modules, packed.refused) == (1, 1)
    assert isinstance(model.q.weight, nn.Parameter) and model.o.weight.is_mkldnn
    assert "bits differ from F.linear's; left unpacked" in caplog.text


def test_an_input_with_strided_columns_is_multiplied_as_f_linear_does():
    """A transposed input: oneDNN's packed kernel gives other bits for it than F.linear (seen with K = 2048 and 7
    rows), so that call unpacks the weight."""
    torch.manual_seed(0)
    layer = nn.Linear(2048, 1024, bias=False).to(torch.bfloat16)
    x = torch.randn(2048, 7).to(torch.bfloat16).t()
    with torch.inference_mode():
        want = layer(x)
        prepack.prepack_dense(layer)
        assert layer.weight.is_mkldnn and torch.equal(layer(x), want)


def layouts(rows: int, k: int) -> dict[str, torch.Tensor]:
    def r(*shape):
        return torch.randn(*shape).to(torch.bfloat16)
    return {"rows": r(rows, k), "column slice": r(rows, 3 * k)[:, k:2 * k], "every other row": r(2 * rows, k)[::2],
            "3-d transposed": r(rows, 2, k).transpose(0, 1), "expanded": r(1, k).expand(rows, k),
            "transposed": r(k, rows).t(), "last position": r(1, 3 * rows, k)[:, -1:],
            "3-d strided": r(2, 3 * rows, k)[:, ::3], "3-d": r(3, rows, k),
            "4-d transposed": r(2, 2, rows, k).transpose(1, 2)}


@pytest.mark.parametrize("out_features,in_features", [(1024, 2048), (512, 4096)])
def test_every_input_layout_gives_f_linears_bits(out_features, in_features):
    """Random inputs in every layout, the one where the packed kernel alone differs from F.linear (a transposed
    input) included: ``linear`` folds rows as F.linear does."""
    torch.manual_seed(0)
    layer = nn.Linear(in_features, out_features, bias=False).to(torch.bfloat16)
    cases = [(f"{name}, {rows} rows", x) for rows in (1, 7, 33) for name, x in layouts(rows, in_features).items()]
    with torch.inference_mode():
        want = [layer(x) for _, x in cases]
        prepack.prepack_dense(layer)
        assert layer.weight.is_mkldnn
        assert [name for (name, x), w in zip(cases, want) if not torch.equal(layer(x), w)] == []
