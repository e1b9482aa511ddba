"""The Triton backend as a registered op whose kernels torch.compile sees (issue 11, item 3).

``torch.ops.act_kernels.act_attention_triton`` is a ``torch.library.triton_op`` where the
kernels are compiled and an opaque ``custom_op`` under the interpreter (there the kernels are
Python functions no tracer can record); ``triton_backend.compiled_call`` is what
``act_attention`` runs for ``backend="triton"`` inside torch.compile.

On this CPU-only machine:

* the op runs eagerly in the interpreter: bit-identical to the backend's eager path (the same
  launches), and within tolerance of the float64 brute force; ``torch.library.opcheck`` passes;
  ``torch.compile(fullgraph=True)`` over it gives the eager output;
* the triton_op path is traced in a subprocess without the interpreter, by torch.compile itself
  (Dynamo, then AOTAutograd with a backend that keeps the graph and runs nothing), inside
  ``kernels.aot.compile_only(90)`` (the stand-in driver lets Triton analyse each kernel for the
  functionalization): every launch is a ``triton_kernel_wrapper_functional`` node, the sink
  selection is aten ops, no node reads a device value on the host, every shape is static and
  Inductor's cudagraph check (what ``mode="reduce-overhead"`` asks before capturing) passes.
  Inductor itself is not run: it cannot lower user Triton kernels on CPU tensors, and the graph
  cannot be executed without a GPU.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from helpers.optional import import_optional

triton = import_optional("triton", "triton")

from act_kernels import triton_backend as tb  # noqa: E402
from bruteforce import act_bruteforce  # noqa: E402
from inputs import left_padding, make_qkv  # noqa: E402

BETA, TAU = 0.4, 0.05
CASES = {  # name: (bsz, hq, hkv, nq, nk, dim, pads, window)
    "prefill, padded": (2, 4, 2, 13, 13, 24, [0, 4], None),
    "chunked prefill, padded": (2, 4, 2, 5, 23, 24, [0, 3], None),
    "decode, padded": (2, 4, 2, 1, 29, 16, [0, 5], None),
    "chunked prefill, window": (2, 4, 2, 6, 27, 16, None, 7),
    "decode, window": (2, 4, 4, 1, 29, 16, [0, 2], 9),
}
HEADS = {  # how a caller names the calibrated heads (Hq = 4, B = 2)
    "index list": ([0, 3], torch.tensor([[True, False, False, True]] * 2)),
    "bool [Hq]": (torch.tensor([False, True, False, True]),
                  torch.tensor([[False, True, False, True]] * 2)),
    "bool [B, Hq]": (torch.tensor([[True, False, True, False], [False, False, False, True]]),
                     torch.tensor([[True, False, True, False], [False, False, False, True]])),
}


def inputs(case):
    bsz, hq, hkv, nq, nk, dim, pads, window = case
    q, k, v = make_qkv(bsz, hq, hkv, nq, nk, dim, seed=nk + nq, planted=(2, nk // 2))
    return q, k, v, None if pads is None else left_padding(nk, pads), window


def op_call(q, k, v, heads, kpm, window):
    return tb.compiled_call(q, k, v, heads, kpm, BETA, TAU, q.shape[-1] ** -0.5, window)


@pytest.mark.parametrize("heads_kind", list(HEADS))
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_op_matches_the_backend_and_the_bruteforce(case, heads_kind):
    q, k, v, kpm, window = inputs(case)
    heads, mask = HEADS[heads_kind]
    got = op_call(q, k, v, heads, kpm, window)
    eager, _ = tb.act_attention_triton(q, k, v, mask, BETA, TAU, q.shape[-1] ** -0.5, kpm,
                                       False, window=window)
    # a bool mask lists every pair for the column pass: the calibrated heads get the same
    # launches on their own data, so the output is the same to the bit
    assert torch.equal(got, eager)
    want = act_bruteforce(q, k, v, mask, BETA, TAU, None, kpm, window=window)[0]
    err = ((got.double() - want).abs().max() / v.abs().max()).item()
    assert err < 2e-5, err
    plain = act_bruteforce(q, k, v, None, BETA, TAU, None, kpm, window=window)[0]
    assert (want - plain).abs().max() > 1e-3        # the calibration changed something


def test_no_heads_is_plain_attention():
    q, k, v, kpm, window = inputs(CASES["prefill, padded"])
    got = op_call(q, k, v, None, kpm, window)
    assert torch.equal(got, op_call(q, k, v, [], kpm, window))
    want = act_bruteforce(q, k, v, None, BETA, TAU, None, kpm)[0]
    assert ((got.double() - want).abs().max() / v.abs().max()).item() < 2e-5


@pytest.mark.parametrize("case", ["prefill, padded", "decode, window"])
def test_opcheck(case):
    q, k, v, kpm, window = inputs(CASES[case])
    heads = torch.tensor([[True, False, False, True], [False, True, False, False]])
    pairs = torch.arange(8, dtype=torch.int32)
    torch.library.opcheck(torch.ops.act_kernels.act_attention_triton.default,
                          (q, k, v, heads, pairs, kpm, BETA, TAU, 0.25, window))
    exact = torch.tensor([0, 3, 5], dtype=torch.int32)
    torch.library.opcheck(torch.ops.act_kernels.act_attention_triton.default,
                          (q, k, v, heads, exact, None, BETA, TAU, 0.25, None))


def test_compiled_fullgraph_gives_the_eager_output():
    q, k, v, kpm, window = inputs(CASES["chunked prefill, padded"])
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: op_call(q, k, v, [1, 3], kpm, window), fullgraph=True)
    assert torch.equal(fn(q, k, v), op_call(q, k, v, [1, 3], kpm, window))


def test_public_entry_point_dispatches_to_the_triton_op_when_compiled():
    """``act_attention(..., backend="triton")`` inside torch.compile: no graph break, the
    registered Triton op in the graph (not the generic op), the eager output."""
    from act_kernels import act_attention

    q, k, v, kpm, window = inputs(CASES["chunked prefill, window"])
    heads = torch.tensor([False, True, False, True])
    call = lambda q, k, v: act_attention(q, k, v, heads=heads, beta=BETA, tau=TAU,  # noqa: E731
                                         key_padding_mask=kpm, window=window, backend="triton")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(call)(q, k, v)
    assert explained.graph_break_count == 0
    code = "\n".join(g.code for g in explained.graphs)
    assert "act_attention_triton" in code
    assert not re.search(r"act_kernels\.act_attention(?!_triton)", code), code
    torch._dynamo.reset()
    assert torch.equal(torch.compile(call, fullgraph=True)(q, k, v), call(q, k, v))


def test_arguments_that_need_device_values_are_refused():
    q, k, v, kpm, _ = inputs(CASES["prefill, padded"])
    with pytest.raises(TypeError, match="bool tensor or a list of head indices"):
        op_call(q, k, v, torch.tensor([0, 3]), kpm, None)
    with pytest.raises(TypeError, match="needs a bool key_padding_mask"):
        op_call(q, k, v, [0], kpm.long(), None)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        op_call(q, k, v, [0], kpm[:, 1:], None)
    with pytest.raises(ValueError, match="head index 4 out of range"):
        op_call(q, k, v, [0, 4], kpm, None)
    with pytest.raises(ValueError, match="bool heads must have shape"):
        op_call(q, k, v, torch.tensor([True, False]), kpm, None)
    with pytest.raises(TypeError, match="sequence of head indices"):
        op_call(q, k, v, "03", kpm, None)


def test_interpreted_kernels_are_not_traced_into_a_graph():
    """Recording the backend's body into a graph under the interpreter would leave the kernels
    out of it: refused with a clear error (fake tensors alone, shape propagation, skip them)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def body(q, k, v, mask, kpm):      # the registered op's body, the pairs built traceably
        cal = tb.CalibratedPairs.covering(mask, torch.arange(8, dtype=torch.int32))
        no_slot = torch.full((8,), -1, dtype=torch.int32)
        return tb._attend(q, k, v, cal, no_slot, None, BETA, TAU, q.shape[-1] ** -0.5, kpm,
                          False, None)[0]

    q, k, v, kpm, _ = inputs(CASES["prefill, padded"])
    mask = HEADS["index list"][1]
    assert torch.equal(body(q, k, v, mask, kpm), op_call(q, k, v, [0, 3], kpm, None))
    with pytest.raises(RuntimeError, match="cannot be traced into a graph"):
        make_fx(body, tracing_mode="fake")(q, k, v, mask, kpm)
    with pytest.raises(RuntimeError, match="eager Triton backend cannot be traced"):
        make_fx(lambda q, k, v, mask, kpm: tb.act_attention_triton(
            q, k, v, mask, BETA, TAU, 0.25, kpm, False)[0], tracing_mode="fake")(q, k, v, mask,
                                                                                kpm)


# ---------------------------------------------------------------------------------------------
# the triton_op path, traced by torch.compile without the interpreter (subprocess)
# ---------------------------------------------------------------------------------------------
TRACED = {  # name: (case, heads, kernels expected in launch order)
    "prefill, index list": ("prefill, padded", [0, 3],
                            ["_flash_forward_kernel", "_column_scores_kernel",
                             "_sink_correction_kernel"]),
    "chunked prefill, window, bool heads": ("chunked prefill, window", "bool",
                                            ["_flash_forward_kernel", "_column_scores_kernel",
                                             "_sink_correction_kernel"]),
    "decode, index list": ("decode, padded", [1], ["_decode_split_kernel",
                                                   "_decode_epilogue_kernel"]),
    "prefill, no heads": ("prefill, padded", None, ["_flash_forward_kernel"]),
    # bidirectional blocks (issue 21): the spans are aten ops of the graph, no host read
    "chunked prefill, window, blocks": ("chunked prefill, window", [0, 3],
                                        ["_flash_forward_kernel", "_column_scores_kernel",
                                         "_sink_correction_kernel"]),
}
HOST_READS = {"nonzero", "_local_scalar_dense", "item", "masked_select", "_unique2",
              "unique_dim", "unique_consecutive", "repeat_interleave", "argwhere", "equal"}


def _kernel_name(kernel) -> str:
    while hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel.__name__


def _trace(name):
    """Compile one TRACED case with Dynamo + AOTAutograd; return what the graph holds."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._inductor.utils import get_first_incompatible_cudagraph_node

    from act_kernels.kernels import aot

    case, heads, _ = TRACED[name]
    q, k, v, kpm, window = inputs(CASES[case])
    q, k, v = (t.to(torch.float16) for t in (q, k, v))
    ids = None
    if "blocks" in name:
        ids = torch.full((q.shape[0], k.shape[2]), -1, dtype=torch.long)
        ids[:, k.shape[2] // 2: k.shape[2] - 2] = 0
    graphs = []

    class Kept(Exception):
        """Raised instead of running the graph: there is no GPU to run it on."""

    def keep(gm, example_inputs):
        graphs.append(gm)

        def run(*args):
            raise Kept
        return run

    def fn(q, k, v, kpm, ids):
        h = torch.tensor([[False, True, False, True]] * 2) if heads == "bool" else heads
        return tb.compiled_call(q, k, v, h, kpm, BETA, TAU, q.shape[-1] ** -0.5, window, ids)

    torch._dynamo.reset()
    with aot.compile_only(90):
        try:
            torch.compile(fn, backend=aot_autograd(fw_compiler=keep), fullgraph=True)(q, k, v,
                                                                                     kpm, ids)
        except Kept:
            pass
    (gm,) = graphs
    kernels, targets, static = [], [], True
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        targets.append(str(node.target))
        if "triton_kernel_wrapper" in str(node.target):
            kernels.append(_kernel_name(kernel_side_table.get_kernel(node.kwargs["kernel_idx"])))
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            static &= all(isinstance(s, int) for s in val.shape)
    unsafe = get_first_incompatible_cudagraph_node(gm)
    return dict(kernels=kernels, targets=targets, static=static,
                cudagraph_unsafe=None if unsafe is None else str(unsafe.target))


def _worker_main():
    print(json.dumps({name: _trace(name) for name in TRACED}), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    _worker_main()
    sys.exit(0)


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1",
               TRITON_CACHE_DIR=str(tmp_path_factory.mktemp("triton_cache")),
               PYTHONPATH=os.pathsep.join([root, os.path.join(root, "tests")]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(TRACED))
def test_compiled_graph_holds_the_triton_kernels(traced, name):
    got = traced[name]
    assert got["kernels"] == TRACED[name][2]
    assert all(t == "triton_kernel_wrapper_functional" for t in got["targets"]
               if "triton" in t)
    # the op was decomposed (Inductor sees the kernels, not one opaque node)
    assert not any("act_attention_triton" in t for t in got["targets"])
    aten = [t.split(".")[1] for t in got["targets"] if t.startswith("aten.")]
    assert aten and not HOST_READS.intersection(aten)
    assert got["static"]
    assert got["cudagraph_unsafe"] is None       # Inductor's own check for reduce-overhead
