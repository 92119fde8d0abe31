import pytest
import torch
from torch import nn

from hwprune import build_model, count_flops, model_stats


class _Seq(nn.Module):
    def __init__(self, cell, layers, bi):
        super().__init__()
        self.rnn = cell(5, 7, num_layers=layers, bidirectional=bi, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


@pytest.mark.parametrize("cell,gates", [(nn.LSTM, 4), (nn.GRU, 3)])
@pytest.mark.parametrize("layers,bi", [(1, False), (2, False), (2, True)])
def test_rnn_flops_match_formula(cell, gates, layers, bi):
    B, T, I, H = 3, 11, 5, 7
    D = 2 if bi else 1
    ins = [I] + [H * D] * (layers - 1)
    expected = B * T * sum(D * gates * H * (i + H) for i in ins)  # multiply-adds, gate matmuls
    assert count_flops(_Seq(cell, layers, bi), torch.randn(B, T, I)) == expected


def test_conv_and_linear_flops_match_formula():
    m = build_model("cnn1d")
    # conv: out_len * cout * cin * k; linear: in * out
    expected = 20 * 32 * 1 * 5 + 10 * 64 * 32 * 5 + 5 * 64 * 64 * 5 + 320 * 128 + 128 * 10
    expected += 2 * (20 * 32 + 10 * 64 + 5 * 64)  # fvcore: eval BatchNorm = 2 flops per output element
    st = model_stats(m, torch.randn(4, 1, 40))
    assert st.flops == expected  # per example, though the batch was 4
    assert st.params == sum(p.numel() for p in m.parameters()) and st.size_bytes == 4 * st.params
