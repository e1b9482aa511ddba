"""No host synchronisation in the steady-state ``act_triton`` path (issue 11, item 2).

On a GPU, anything that reads a device tensor's values on the host (``.item()``, ``.tolist()``,
``bool(t)``, ``nonzero()``, boolean-mask indexing, ... : every op whose result or output shape
depends on device data) makes the CPU wait for the GPU, and it stops CUDA graph capture. On this
CPU-only machine such calls cannot be timed, so they are caught by name: ``NoHostSync`` is a
``TorchFunctionMode`` that fails on each of them while the backend's Python code runs. The kernel
launches themselves (the interpreter, which does run on the CPU) are not checked: on a GPU a
launch is asynchronous.

The first call with a new heads mask may synchronise once (it finds the calibrated pairs and
caches them on the mask); the second call with the same mask must not.

The Transformers path (issue 11, item 3: what a CUDA graph of a decode step needs): the ACT
attention function of every layer, from the mask Transformers passes to the backend, is checked
in the second and later decode steps of a model with a profile, for ``act_triton`` (the whole
Python path; the launches unchecked) and ``act_torch`` (the same path up to the backend call:
the torch backend itself reads sink indices on the host by design). One host read remains
there, named in ``OP_KPM_CHECK`` and counted: the op's "does this key-padding mask pad
anything" shortcut, once per forward with a padded batch (see ``normalize_key_padding_mask`` in
``act_kernels/op.py``).
"""
import contextlib
import functools
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from helpers.optional import import_optional

triton = import_optional("triton", "triton")

from act_kernels import triton_backend as tb  # noqa: E402
from act_kernels.kernels import column_scores, decode, flash_forward, sink_correction  # noqa: E402
from inputs import left_padding, make_qkv  # noqa: E402

Tensor = torch.Tensor

# calls that read device data on the host, or whose output shape depends on it
SYNCING = {
    Tensor.item, Tensor.tolist, Tensor.numpy, Tensor.cpu,
    Tensor.__bool__, Tensor.__int__, Tensor.__float__, Tensor.__index__, Tensor.__complex__,
    torch.nonzero, Tensor.nonzero, torch.argwhere, Tensor.argwhere,
    torch.masked_select, Tensor.masked_select, torch.unique, Tensor.unique,
    torch.unique_consecutive, Tensor.unique_consecutive, torch.bincount, Tensor.bincount,
    torch.repeat_interleave, Tensor.repeat_interleave, torch.equal, Tensor.equal,
    torch.allclose, Tensor.allclose, torch.is_nonzero, Tensor.is_nonzero,
}
INDEXING = {Tensor.__getitem__, Tensor.__setitem__, Tensor.index_put_, Tensor.index_put,
            torch.index_put}


def _has_mask_index(index) -> bool:
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in items)


class HostSyncError(AssertionError):
    pass


def _called_from(allowed) -> str:
    """The ``(file suffix, function)`` of ``allowed`` found on the call stack, else ''."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        for suffix, function in allowed:
            if code.co_name == function and code.co_filename.endswith(suffix):
                return function
        frame = frame.f_back
    return ""


class NoHostSync(TorchFunctionMode):
    """Raise ``HostSyncError`` on any host-synchronising call (see module docstring); calls
    made from a function in ``allowed`` (``(file suffix, function name)`` pairs) are let
    through and listed in ``allowed_hits``."""

    def __init__(self, allowed=()):
        super().__init__()
        self.paused = False
        self.allowed = tuple(allowed)
        self.allowed_hits = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            name = getattr(func, "__qualname__", repr(func))
            if func in SYNCING:
                where = _called_from(self.allowed)
                if not where:
                    raise HostSyncError(f"host sync: {name}")
                self.allowed_hits.append(where)
            if func in INDEXING and len(args) > 1 and _has_mask_index(args[1]):
                raise HostSyncError(f"host sync: {name} with a boolean mask index "
                                    "(data-dependent shape)")
            if func is torch.where and len(args) + len(kwargs) == 1:
                raise HostSyncError("host sync: torch.where(condition) (data-dependent shape)")
        return func(*args, **kwargs)


def unchecked(mode, monkeypatch, module, name):
    """Replace ``module.name`` by a version that runs with ``mode`` paused (its attributes,
    such as ``SUPPORTS_WINDOW``, kept)."""
    original = getattr(module, name)

    @functools.wraps(original)
    def run(*args, **kwargs):
        mode.paused = True
        try:
            return original(*args, **kwargs)
        finally:
            mode.paused = False
    monkeypatch.setattr(module, name, run)


@contextlib.contextmanager
def no_host_sync(monkeypatch):
    """Check the Python path; let the kernel launches (the interpreter) run unchecked."""
    mode = NoHostSync()
    for module in (flash_forward, column_scores, sink_correction, decode):
        unchecked(mode, monkeypatch, module, "launch")
    with mode:
        yield


def backend_call(q, k, v, heads, kpm=None, stats=False):
    return tb.act_attention_triton(q, k, v, heads, 0.4, 0.1, q.shape[-1] ** -0.5, kpm, stats)


CASES = {  # name: (bsz, hq, hkv, nq, nk, padded, stats)
    "prefill": (2, 4, 2, 20, 20, False, False),
    "chunked prefill": (2, 4, 2, 6, 23, False, False),
    "decode": (2, 4, 2, 1, 37, False, False),
    "decode, padded": (2, 4, 2, 1, 37, True, False),
    "decode, stats": (2, 4, 2, 1, 37, False, True),
    "prefill, stats": (2, 4, 4, 17, 17, False, True),
    "prefill, padded": (2, 4, 2, 20, 20, True, False),
    "chunked prefill, padded, stats": (2, 4, 2, 6, 23, True, True),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
@pytest.mark.parametrize("mask_kind", ["[B, Hq]", "[Hq] expanded"])
def test_second_call_does_not_sync(case, mask_kind, monkeypatch):
    bsz, hq, hkv, nq, nk, padded, stats = case
    q, k, v = make_qkv(bsz, hq, hkv, nq, nk, 16, seed=nk, planted=(3,))
    kpm = left_padding(nk, [0, 4]) if padded else None
    if mask_kind == "[B, Hq]":
        heads = torch.tensor([[True, False, True, False], [False, False, True, True]])
    else:                       # the op's normalisation of a [Hq] mask: a view of the profile's
        profile_row = torch.tensor([True, False, False, True])
        heads = profile_row[None, :].expand(bsz, hq)
    first = backend_call(q, k, v, heads, kpm, stats)          # may sync once: fills the cache
    if mask_kind != "[B, Hq]":   # a new view of the same row each call, as the op makes it
        heads = profile_row[None, :].expand(bsz, hq)
    with no_host_sync(monkeypatch):
        second = backend_call(q, k, v, heads, kpm, stats)
    assert torch.equal(first[0], second[0])


@pytest.mark.parametrize("nq,window", [(20, None), (1, 5)], ids=["prefill", "decode window"])
def test_blocks_do_not_sync(nq, window, monkeypatch):
    """Bidirectional blocks: the per-row intervals (``kernels.spans``) are derived on the
    device, with statistics (counts) and without."""
    nk = 23
    q, k, v = make_qkv(2, 4, 2, nq, nk, 16, seed=7, planted=(3,))
    ids = torch.full((2, nk), -1, dtype=torch.long)
    ids[:, 12:nk] = 0
    heads = torch.tensor([[True, False, True, False], [False, False, True, True]])
    kpm = left_padding(nk, [0, 4])
    for stats in (False, True):
        first = tb.act_attention_triton(q, k, v, heads, 0.4, 0.1, 0.25, kpm, stats,
                                        window=window, block_ids=ids)
        with no_host_sync(monkeypatch):
            second = tb.act_attention_triton(q, k, v, heads, 0.4, 0.1, 0.25, kpm, stats,
                                             window=window, block_ids=ids)
        assert torch.equal(first[0], second[0])


def test_the_check_catches_syncs(monkeypatch):
    """The checker is not vacuous: a new mask (cache miss) syncs, and so do the usual calls."""
    q, k, v = make_qkv(1, 2, 1, 9, 9, 16, seed=1)
    with no_host_sync(monkeypatch):
        with pytest.raises(HostSyncError, match="nonzero"):
            backend_call(q, k, v, torch.tensor([[True, False]]))
        t = torch.ones(3)
        for sync in (lambda: t.sum().item(), lambda: bool(t.any()), lambda: t.tolist(),
                     lambda: t[t > 0], lambda: torch.nonzero(t)):
            with pytest.raises(HostSyncError):
                sync()


def test_cache_follows_in_place_edits_and_lifetime():
    q, k, v = make_qkv(1, 3, 3, 9, 9, 16, seed=2, planted=(4,))
    heads = torch.tensor([[True, False, False]])
    a = backend_call(q, k, v, heads)[0]
    heads[0, 1] = True                    # in place: the version counter changes
    b = backend_call(q, k, v, heads)[0]
    fresh = backend_call(q, k, v, heads.clone())[0]
    assert torch.equal(b, fresh) and not torch.equal(a[0, 1], b[0, 1])
    n_entries = len(tb._PAIRS)
    del heads
    assert len(tb._PAIRS) == n_entries - 1      # the entry goes with its mask


@pytest.mark.parametrize("heads_kind", ["bool [Hq]", "bool [B, Hq]", "index list"])
@pytest.mark.parametrize("nq", [1, 12])
def test_op_second_call_does_not_sync(heads_kind, nq, monkeypatch):
    """Through ``act_attention``: the op's argument normalisation (does the mask calibrate
    anything, does the padding mask pad anything) also reads the device once per mask only."""
    from act_kernels import act_attention

    q, k, v = make_qkv(2, 4, 2, nq, 19, 16, seed=nq, planted=(5,))
    heads = {"bool [Hq]": torch.tensor([True, False, False, True]),
             "bool [B, Hq]": torch.tensor([[True, False, False, True], [False] * 4]),
             "index list": [0, 3]}[heads_kind]
    for kpm in (left_padding(19, [0, 4]), left_padding(19, [0, 0])):   # padded, all real
        def call():
            return act_attention(q, k, v, heads=heads, key_padding_mask=kpm, backend="triton")
        first = call()
        with no_host_sync(monkeypatch):
            second = call()
        assert torch.equal(first, second)


# ---------------------------------------------------------------------------------------------
# the Transformers path: decode steps of a model with a profile
# ---------------------------------------------------------------------------------------------
OP_KPM_CHECK = ("act_kernels/op.py", "normalize_key_padding_mask")


@contextlib.contextmanager
def checked_attention(impl, monkeypatch):
    """Run every call of the ``impl`` attention function under one ``NoHostSync`` (the
    backend's launches, or the torch backend, unchecked); yields the mode."""
    from transformers import AttentionInterface

    import act_kernels.torch_backend
    from act_kernels.hf import attention

    mode = NoHostSync(allowed=[OP_KPM_CHECK])
    mode.paused = True
    original = {"act_torch": attention.act_torch_attention_forward,
                "act_triton": attention.act_triton_attention_forward}[impl]

    def forward(*args, **kwargs):
        mode.paused = False
        try:
            return original(*args, **kwargs)
        finally:
            mode.paused = True
    for module in (flash_forward, column_scores, sink_correction, decode):
        unchecked(mode, monkeypatch, module, "launch")
    unchecked(mode, monkeypatch, act_kernels.torch_backend, "act_attention_torch")
    AttentionInterface.register(impl, forward)
    try:
        with mode:
            yield mode
    finally:
        AttentionInterface.register(impl, original)


def decode_steps(model, ids, mask, steps):
    """Greedy decode with a dynamic cache, as generate does; yields after each forward."""
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    cache = out.past_key_values
    for _ in range(steps):
        token = out.logits[:, -1:].argmax(-1)
        ids = torch.cat([ids, token], 1)
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -1:]
        out = model(input_ids=token, attention_mask=mask, position_ids=positions,
                    past_key_values=cache, use_cache=True)
        yield out.logits


HF_CASES = {  # name: (model kind, left padding of row 1)
    "llama, padded": ("llama", 3),
    "llama, no padding": ("llama", 0),
    "mistral (window 6), padded": ("mistral", 5),
}


@pytest.mark.parametrize("impl", ["act_triton", "act_torch"])
@pytest.mark.parametrize("case", list(HF_CASES.values()), ids=list(HF_CASES))
@torch.no_grad()
def test_hf_decode_steady_state_does_not_sync(case, impl, monkeypatch):
    from act_kernels import apply_profile
    from helpers.models import PROFILE, profiled_llama, tiny_sliding

    kind, pad = case
    backend = impl.removeprefix("act_")
    model = profiled_llama(backend) if kind == "llama" else \
        apply_profile(tiny_sliding(kind), PROFILE, backend=backend)
    ids = torch.randint(3, 97, (2, 13), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    eager = [logits.clone() for logits in decode_steps(model, ids, mask, 4)]
    steps = decode_steps(model, ids, mask, 4)
    first = next(steps)                       # the first decode step may read (new shapes)
    with checked_attention(impl, monkeypatch) as mode:
        rest = list(steps)                    # steps 2..4, every layer checked
    # the op's one remaining read: once per forward with padding (the layers share the mask)
    assert mode.allowed_hits == ["normalize_key_padding_mask"] * (3 if pad else 0)
    for got, want in zip([first] + rest, eager):
        assert torch.equal(got, want)


@torch.no_grad()
def test_hf_check_is_not_vacuous(monkeypatch):
    """Without the mask builder's record, the full mask check reads the mask: caught."""
    from act_kernels.hf import masks
    from helpers.models import profiled_llama

    model = profiled_llama("triton")
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    steps = decode_steps(model, ids, mask, 2)
    next(steps)
    monkeypatch.setattr(masks, "built_from", lambda mask: None)
    with checked_attention("act_triton", monkeypatch):
        with pytest.raises(HostSyncError):
            next(steps)
