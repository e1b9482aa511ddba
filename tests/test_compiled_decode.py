"""A torch-backend decode step inside torch.compile is traced into the graph (issue 22, item 6):
no opaque op and no host read, the same answer as the eager op (calibrated rows, padding, a
general mask, the log-space rows, both decode ways), and a static-cache generation equal to the
eager one."""
from __future__ import annotations

import pytest
import torch

from act_kernels import act_attention
from act_kernels.torch_backend import cpu_rows, decode
from helpers.models import profiled_llama
from inputs import left_padding, make_qkv


def recording_backend(graphs):
    def backend(gm, example_inputs):
        graphs.append({str(node.target) for node in gm.graph.nodes})
        return gm.forward
    return backend


def has_opaque_op(targets) -> bool:
    return any("act_kernels" in t for t in targets)


@pytest.mark.parametrize("way", ["fused", "direct"])
@pytest.mark.parametrize("case", ["padded", "mask", "underflow"])
def test_a_compiled_decode_step_is_traced_and_equals_the_eager_op(way, case, monkeypatch):
    monkeypatch.setattr(decode, "DIRECT_MIN_KEYS", 1 if way == "direct" else 1 << 40)
    monkeypatch.setattr(cpu_rows, "MAX_ROW_KEYS", 0)     # the eager torch step, not the CPU loop
    torch._dynamo.reset()
    sink = 150.0 if case == "underflow" else 5.0
    q, k, v = make_qkv(3, 6, 2, 1, 45, 16, seed=71, planted=(9, 30), sink_logit=sink)
    heads = torch.zeros(3, 6, dtype=torch.bool)
    heads[:, [1, 3]] = True
    heads[2, 5] = True
    kw = dict(heads=heads, tau=0.05, backend="torch")
    if case == "padded":
        kw["key_padding_mask"] = left_padding(45, [0, 4, 45])        # row 2's query padded
    elif case == "mask":
        mask = torch.rand(3, 1, 1, 45, generator=torch.Generator().manual_seed(7)) < 0.7
        mask[..., [9, 30]] = True
        mask[1] = False                                              # row 1 sees nothing
        kw["attn_mask"] = mask
    want = act_attention(q, k, v, **kw)
    graphs = []
    compiled = torch.compile(lambda q, k, v: act_attention(q, k, v, **kw), fullgraph=True,
                             backend=recording_backend(graphs))
    got = compiled(q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    assert graphs and not any(has_opaque_op(g) for g in graphs)
    assert not torch.equal(want[heads], act_attention(q, k, v, **{**kw, "heads": None})[heads])


@torch.no_grad()
def test_static_cache_generation_traces_the_decode_step():
    torch._dynamo.reset()
    model = profiled_llama()
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                                                  # left padding
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                  cache_implementation="static", pad_token_id=0, output_scores=True,
                  return_dict_in_generate=True)
    eager = model.generate(**kwargs)
    graphs = []
    model.forward = torch.compile(model.forward, fullgraph=True,
                                  backend=recording_backend(graphs))
    compiled = model.generate(**kwargs)
    assert torch.equal(compiled.sequences, eager.sequences)
    for got, want in zip(compiled.scores, eager.scores):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the prefill graph calls the opaque op, the decode graph does not
    assert any(has_opaque_op(g) for g in graphs)
    decode_graphs = [g for g in graphs if not has_opaque_op(g)]
    assert decode_graphs and any("scaled_dot_product_attention" in t for g in decode_graphs
                                 for t in g)
