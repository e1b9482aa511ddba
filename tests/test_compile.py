"""torch.compile over a model with ACT attention: no graph break, same outputs, and static-cache
generation with a compiled forward; the op itself as a registered ``torch.library`` op."""
from __future__ import annotations

import pytest
import torch

from act_kernels import act_attention
from helpers.models import profiled_llama as tiny_llama


def batch():
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                                   # left padding
    return ids, mask


def test_the_op_is_a_library_op_with_a_fake():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 9, 16, generator=gen) for h in (4, 2, 2))
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[1, :3] = False
    heads = torch.tensor([True, False, True, False])
    for args in ((q, k, v, heads, kpm), (q[:, :, -1:], k, v, None, None)):
        torch.library.opcheck(torch.ops.act_kernels.act_attention.default,
                              args + (0.4, 0.1, 0.25, "torch"))
    compiled = torch.compile(lambda q, k, v: act_attention(q, k, v, heads=[0, 2], tau=0.05,
                                                           key_padding_mask=kpm,
                                                           backend="torch"), fullgraph=True)
    want = act_attention(q, k, v, heads=[0, 2], tau=0.05, key_padding_mask=kpm, backend="torch")
    torch.testing.assert_close(compiled(q, k, v), want, rtol=0, atol=0)
    with pytest.raises(Exception, match="return_stats is not supported inside torch.compile"):
        torch.compile(lambda q: act_attention(q, k, v, return_stats=True), fullgraph=True)(q)


@torch.no_grad()
def test_compiled_model_has_no_graph_break_and_generates_the_same():
    model = tiny_llama()
    ids, mask = batch()
    want = model(input_ids=ids, attention_mask=mask).logits
    explained = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()
    got = torch.compile(model, fullgraph=True)(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                  cache_implementation="static", pad_token_id=0)
    eager = model.generate(**kwargs)
    model.forward = torch.compile(model.forward, fullgraph=True)
    assert torch.equal(model.generate(**kwargs), eager)


@torch.no_grad()
def test_recording_inside_compile_is_refused_not_skipped():
    from act_kernels import recording

    model = tiny_llama()
    ids, mask = batch()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with recording(model, lambda *args: None):
        with pytest.raises(Exception, match="recording\\(\\) need eager execution"):
            compiled(input_ids=ids, attention_mask=mask)


@torch.no_grad()
def test_the_hf_op_is_kept_out_of_cuda_graphs():
    """The Transformers path's op reads the mask on the host and cuts k/v to a length of its
    call: Inductor's cudagraph check (what mode="reduce-overhead" asks) must find it unsafe."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.utils import get_first_incompatible_cudagraph_node

    model = tiny_llama()
    ids, mask = batch()
    graphs = []
    torch._dynamo.reset()
    torch.compile(model, fullgraph=True, backend=aot_autograd(
        fw_compiler=lambda gm, _: graphs.append(gm) or gm))(input_ids=ids, attention_mask=mask)
    (gm,) = graphs
    unsafe = get_first_incompatible_cudagraph_node(gm)
    assert unsafe is not None and "act_kernels.hf_attention" in str(unsafe.target)


def test_host_reading_ops_are_kept_out_of_cuda_graphs():
    """The generic op and the Transformers op run eager code that reads the host: both are
    tagged so that ``mode="reduce-overhead"`` never captures them in a CUDA graph."""
    import act_kernels.hf  # noqa: F401  (registers act_kernels::hf_attention)
    import act_kernels.op  # noqa: F401

    for op in (torch.ops.act_kernels.act_attention, torch.ops.act_kernels.hf_attention):
        assert torch.Tag.cudagraph_unsafe in op.default.tags, op
