"""The steady decode step of the Transformers integration (issue 22, item 6): after one fully
checked decode call a layer runs the op's validated call directly, and that shortcut is exact
(bit for bit the full path) and never stale (profile, override, recorder, in-place head edits,
bad input)."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import act_kernels.hf.attention as hf_attention
from act_kernels import ACTProfile, apply_profile, head_override, recording
from helpers.models import tiny_llama

PROFILE = ACTProfile(heads={0: [1], 1: [0, 2], 2: [1, 3]}, tau=0.05)
OTHER = ACTProfile(heads={1: [3]}, beta=0.1, tau=0.05)
PROMPT = torch.randint(3, 97, (1, 9), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def greedy_logits(model, steps: int = 6, edit=None):
    """The logits of ``steps`` decode steps after the prompt (``edit(model, step)`` runs before
    each step), and how many layer calls took the steady step."""
    cache = DynamicCache(config=model.config)
    out = model(input_ids=PROMPT, past_key_values=cache, use_cache=True)
    nxt, found = out.logits[:, -1:].argmax(-1), []
    for step in range(steps):
        if edit is not None:
            edit(model, step)
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        found.append(out.logits[:, -1])
        nxt = out.logits[:, -1:].argmax(-1)
    return torch.stack(found)


def steady_calls(model) -> int:
    return sum(hf_attention._STEADY_ATTR in m.__dict__ for m in model.modules())


@pytest.fixture
def counted(monkeypatch):
    """Counts the calls that took the steady step (``DecodeCall.__call__`` from the shortcut)."""
    hits = []
    real = hf_attention._SteadyDecode.fits

    def fits(self, *args):
        ok = real(self, *args)
        hits.append(ok)
        return ok

    monkeypatch.setattr(hf_attention._SteadyDecode, "fits", fits)
    return hits


def full_path_only(monkeypatch):
    monkeypatch.setattr(hf_attention, "_keep_steady", lambda *a, **k: None)


@pytest.mark.parametrize("profile", [PROFILE, ACTProfile()], ids=["profile", "empty"])
def test_the_steady_step_is_the_full_path_bit_for_bit(profile, counted, monkeypatch):
    model = apply_profile(tiny_llama(4), profile, backend="torch")
    got = greedy_logits(model)
    assert steady_calls(model) == 3 and sum(counted) >= 3 * 5   # every layer, every later step
    with monkeypatch.context() as m:
        full_path_only(m)
        want = greedy_logits(apply_profile(tiny_llama(4), profile, backend="torch"))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_profile_changed_between_steps_is_used_at_once():
    def switch(model, step):
        if step == 3:
            apply_profile(model, OTHER, backend="torch")

    def switch_raw(model, step):        # the config's profile replaced without the API
        if step == 3:
            model.config.act_profile = OTHER.to_dict()

    want = greedy_logits(apply_profile(tiny_llama(4), PROFILE, backend="torch"), edit=switch)
    head = greedy_logits(apply_profile(tiny_llama(4), PROFILE, backend="torch"), steps=3)
    torch.testing.assert_close(want[:3], head, rtol=0, atol=0)
    got = greedy_logits(apply_profile(tiny_llama(4), PROFILE, backend="torch"), edit=switch_raw)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # and the switch mattered: the profiles give different steps
    assert not torch.equal(want[3:], greedy_logits(
        apply_profile(tiny_llama(4), PROFILE, backend="torch"))[3:])


def test_overrides_and_in_place_edits_of_their_heads_are_seen():
    mask = torch.tensor([False, False, False, False])

    def edit(model, step):
        if step == 2:
            mask[1] = True          # in place: the layer's heads tensor keeps its identity

    def fresh(model, step):
        if step == 2:
            ctx.__exit__(None, None, None)
            ctx2.__enter__()

    model = apply_profile(tiny_llama(4), PROFILE, backend="torch")
    with head_override(model, {1: mask}):
        got = greedy_logits(model, edit=edit)
    model = apply_profile(tiny_llama(4), PROFILE, backend="torch")
    ctx = head_override(model, {1: torch.tensor([False, False, False, False])})
    ctx2 = head_override(model, {1: torch.tensor([False, True, False, False])})
    ctx.__enter__()
    want = greedy_logits(model, edit=fresh)
    ctx2.__exit__(None, None, None)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(want[:2], want[2:4])   # the edit changed something


def test_a_recorder_added_after_steady_steps_sees_every_call():
    model = apply_profile(tiny_llama(4), PROFILE, backend="torch")
    seen = []

    def start(model, step):
        if step == 3:
            ctx.__enter__()

    ctx = recording(model, lambda module, stats, *rest: seen.append(module.layer_idx))
    greedy_logits(model, edit=start)
    ctx.__exit__(None, None, None)
    assert seen == [0, 1, 2] * 3


def test_bad_input_after_steady_steps_is_still_refused():
    model = apply_profile(tiny_llama(4), PROFILE, backend="torch")
    greedy_logits(model, steps=3)
    attn = model.model.layers[1].self_attn
    q, k = torch.randn(1, 4, 1, 12), torch.randn(1, 2, 13, 12)
    forward = hf_attention.act_torch_attention_forward
    out, _ = forward(attn, q, k, k, None, scaling=attn.scaling)      # the steady step
    assert out.shape == (1, 1, 4, 12)
    with pytest.raises(NotImplementedError, match="dropout"):
        forward(attn, q, k, k, None, dropout=0.1, scaling=attn.scaling)
    with pytest.raises(NotImplementedError, match="softcap"):
        forward(attn, q, k, k, None, scaling=attn.scaling, softcap=30.0)
    forward(attn, q, k, k, None, scaling=attn.scaling, cache=None)    # a steady step with cache=
    forward(attn, q, k, k, None, scaling=attn.scaling, cache=None)
    assert attn.__dict__[hf_attention._STEADY_ATTR].watched == ("cache",)
    with pytest.raises(NotImplementedError, match="paged caches"):
        forward(attn, q, k, k, None, scaling=attn.scaling, cache=object())
    with pytest.raises(ValueError, match="head dims differ"):
        forward(attn, q, torch.randn(1, 2, 13, 10), torch.randn(1, 2, 13, 10), None,
                scaling=attn.scaling)
    with pytest.raises(TypeError, match="dtypes differ"):
        forward(attn, q, k.double(), k.double(), None, scaling=attn.scaling)
