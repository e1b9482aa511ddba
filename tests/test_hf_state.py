"""Per-model ACT state: two models with different profiles, used interleaved and inside nested
head overrides, give what each gives alone; deleting one leaves the other intact; recorders
see only their model and layers; no module of the integration holds mutable state."""
from __future__ import annotations

import gc
import types
import weakref

import pytest
import torch

import act_kernels.hf as hf
from act_kernels import ACTProfile, apply_profile, head_override, recording
from helpers.models import tiny_llama

TAU = 0.05


IDS = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def logits(model):
    return model(input_ids=IDS).logits


def alone(seed, profile, override=None):
    """The logits of a fresh model with only this profile / override ever applied to it."""
    model = apply_profile(tiny_llama(seed), profile, backend="torch")
    if override is None:
        return logits(model)
    with head_override(model, override):
        return logits(model)


PROFILE_A = ACTProfile(heads={1: [0, 2], 2: [1]}, tau=TAU)
PROFILE_B = ACTProfile(heads={0: [3], 2: [0, 1, 2, 3]}, beta=0.1, tau=TAU)


def test_profiles_change_the_output():
    # otherwise the isolation checks below would hold trivially
    plain = logits(tiny_llama(1))
    assert not torch.allclose(alone(1, PROFILE_A), plain, atol=1e-5)
    assert not torch.allclose(alone(2, PROFILE_B), logits(tiny_llama(2)), atol=1e-5)


def test_two_models_interleaved_nested_and_deleted():
    want_a, want_b = alone(1, PROFILE_A), alone(2, PROFILE_B)
    want_a_over = alone(1, PROFILE_A, {2: [3]})
    want_b_over = alone(2, PROFILE_B, {1: [0, 1]})
    want_b_inner = alone(2, PROFILE_B, {0: [2]})

    a = apply_profile(tiny_llama(1), PROFILE_A, backend="torch")
    b = apply_profile(tiny_llama(2), PROFILE_B, backend="torch")
    for _ in range(2):
        torch.testing.assert_close(logits(a), want_a, rtol=0, atol=0)
        torch.testing.assert_close(logits(b), want_b, rtol=0, atol=0)
    with head_override(a, {2: [3]}):
        torch.testing.assert_close(logits(b), want_b, rtol=0, atol=0)     # b is not affected
        with head_override(b, {1: [0, 1]}):
            torch.testing.assert_close(logits(a), want_a_over, rtol=0, atol=0)
            torch.testing.assert_close(logits(b), want_b_over, rtol=0, atol=0)
            with head_override(b, {0: [2]}):                              # innermost wins
                torch.testing.assert_close(logits(b), want_b_inner, rtol=0, atol=0)
                torch.testing.assert_close(logits(a), want_a_over, rtol=0, atol=0)
            torch.testing.assert_close(logits(b), want_b_over, rtol=0, atol=0)
        torch.testing.assert_close(logits(a), want_a_over, rtol=0, atol=0)
    torch.testing.assert_close(logits(a), want_a, rtol=0, atol=0)
    torch.testing.assert_close(logits(b), want_b, rtol=0, atol=0)

    gone = weakref.ref(a)
    with head_override(b, {1: [0, 1]}):
        del a
        gc.collect()
        assert gone() is None, "the model is kept alive by the integration"
        torch.testing.assert_close(logits(b), want_b_over, rtol=0, atol=0)
    torch.testing.assert_close(logits(b), want_b, rtol=0, atol=0)


def test_a_new_profile_takes_effect_without_reloading():
    model = apply_profile(tiny_llama(1), PROFILE_A, backend="torch")
    first = logits(model)
    other = ACTProfile(heads={0: [3]}, tau=TAU)
    apply_profile(model, other, backend="torch")
    torch.testing.assert_close(logits(model), alone(1, other), rtol=0, atol=0)
    assert not torch.equal(logits(model), first)


def test_using_profile_restores_the_previous_state():
    model = apply_profile(tiny_llama(1), PROFILE_A, backend="torch")
    with hf.using_profile(model, PROFILE_B):
        torch.testing.assert_close(logits(model), alone(1, PROFILE_B), rtol=0, atol=0)
    torch.testing.assert_close(logits(model), alone(1, PROFILE_A), rtol=0, atol=0)
    plain = tiny_llama(1)
    with hf.using_profile(plain, PROFILE_A):
        assert plain.config._attn_implementation == "act_torch"
    assert plain.config._attn_implementation == "sdpa"
    assert getattr(plain.config, "act_profile", None) is None


def test_recording_sees_its_model_and_layers_only():
    a = apply_profile(tiny_llama(1), PROFILE_A, backend="torch")
    b = apply_profile(tiny_llama(2), PROFILE_B, backend="torch")
    seen = []

    def recorder(module, stats, query, key, value, kpm):
        seen.append((module.layer_idx, stats.scores.shape, query.shape))

    with recording(a, recorder, layers=[1, 2]):
        out = logits(a)
        logits(b)
    assert [s[0] for s in seen] == [1, 2]
    assert seen[0][1] == (2, 4, 11) and seen[0][2] == (2, 4, 11, 12)
    torch.testing.assert_close(out, alone(1, PROFILE_A), rtol=0, atol=0)  # stats change nothing
    seen.clear()
    logits(a)
    assert not seen                                                      # removed on exit


def test_deprecated_recording_form_still_works():
    model = apply_profile(tiny_llama(1), PROFILE_A, backend="torch")
    calls = []
    with pytest.warns(DeprecationWarning, match="recording.model, recorder"):
        with recording(lambda module, stats, *rest: calls.append(module.layer_idx)):
            logits(model)
    assert calls == [0, 1, 2]
    logits(model)
    assert calls == [0, 1, 2]


def test_no_module_level_mutable_state_in_the_integration():
    import act_kernels.hf.api
    import act_kernels.hf.attention
    import act_kernels.hf.loading
    import act_kernels.hf.masks
    import act_kernels.hf.state

    for mod in (hf, act_kernels.hf.api, act_kernels.hf.attention, act_kernels.hf.loading,
                act_kernels.hf.masks, act_kernels.hf.state):
        for name, value in vars(mod).items():
            if name.startswith("__") or isinstance(value, (types.ModuleType, type,
                                                           types.FunctionType)):
                continue
            assert not isinstance(value, (list, set, dict, bytearray)), f"{mod.__name__}.{name}"


def test_inference_mode_runs_and_gives_the_no_grad_output():
    """Masks built under ``torch.inference_mode`` have no version counter: the mask records and
    the checked-mask cache must still work (they once raised on ``mask._version``)."""
    model = apply_profile(tiny_llama(3), PROFILE_A, backend="torch")
    mask = torch.ones_like(IDS)
    mask[1, :3] = 0                                   # left padding: a mask is built and read
    with torch.no_grad():
        want = model(input_ids=IDS, attention_mask=mask).logits
    with torch.inference_mode():
        first = model(input_ids=IDS, attention_mask=mask).logits
        again = model(input_ids=IDS, attention_mask=mask).logits
    assert torch.equal(first, want) and torch.equal(again, want)
    with torch.no_grad():
        plain = model(input_ids=IDS).logits
    assert not torch.allclose(want[1], plain[1], atol=1e-4)     # the padding was applied
