"""Text encoders loaded through the real Hugging Face path from folders written by save_pretrained."""
import pytest
import torch

from MMContourLib.model.sources import MINILM_SOURCE
from MMContourLib.model.network import NetworkConfig, TextConditionedUNet
from MMContourLib.model.text import (LLMMismatchError, LLMNotFoundError, TextEncoderSpec,
                               build_text_encoder, stack_context)
from MMContourLib.note.clinical import PROMPT_TEMPLATE_VERSION

PROMPTS = ["N1, breast conserving surgery, left side",
           "N0, breast conserving surgery, left side; N2, total mastectomy surgery, right side",
           "N2, total mastectomy surgery, right side"]


@pytest.fixture(scope="module")
def encoder(tiny_llm_dir):
    return build_text_encoder(TextEncoderSpec(kind="causal-lm", source=str(tiny_llm_dir)))


def test_output_is_n_sets_by_hidden_size(encoder):
    assert encoder.template == PROMPT_TEMPLATE_VERSION == "table5-v2"
    g = encoder(PROMPTS)  # a bilateral note in the batch: each side's part read on its own, 2 x 2 tokens
    assert g.shape == (3, 4, encoder.dim) and g.dtype == torch.float32
    assert encoder(PROMPTS[::2]).shape == (2, 2, encoder.dim)  # unilateral notes only: N = 2
    assert not torch.allclose(g[:, 0], g[:, 1]), "the two prompt sets must give different context embeddings"
    assert not torch.allclose(g[0], g[2]), "different notes must give different embeddings"


def test_each_side_of_a_bilateral_note_has_its_own_context_tokens(encoder, tiny_llm_dir):
    left, right = PROMPTS[1].split("; ")
    bilateral = encoder([PROMPTS[1]])[0]
    torch.testing.assert_close(bilateral, torch.cat([encoder([left])[0], encoder([right])[0]]), atol=1e-5, rtol=1e-5)
    # the right side's N stage changes the right side's tokens only
    edited = encoder([PROMPTS[1].replace("N2, total", "N0, total")])[0]
    torch.testing.assert_close(edited[:2], bilateral[:2], atol=1e-5, rtol=1e-5)
    assert (edited[2:] - bilateral[2:]).abs().max() > 1e-3
    # a unilateral note batched beside a bilateral one: its tokens repeated, the same as on its own
    torch.testing.assert_close(encoder(PROMPTS)[0], encoder([PROMPTS[0]])[0].repeat(2, 1), atol=1e-5, rtol=1e-5)
    # template table5-v1 (bundles v10 and older): the whole note in one reading, N tokens
    v1 = build_text_encoder(TextEncoderSpec(kind="causal-lm", source=str(tiny_llm_dir)), template="table5-v1")
    v1.load_trainable_state_dict(encoder.trainable_state_dict())
    assert v1(PROMPTS).shape == (3, 2, encoder.dim)
    torch.testing.assert_close(v1([PROMPTS[0]]), encoder([PROMPTS[0]]), atol=1e-5, rtol=1e-5)
    assert (v1([PROMPTS[1]])[0] - bilateral[:2]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="unknown prompt template"):
        build_text_encoder(TextEncoderSpec(kind="causal-lm", source=str(tiny_llm_dir)), template="table5-v9")


def test_repeated_context_tokens_do_not_change_the_network_output():
    """Why a unilateral note's N tokens may be repeated to batch it beside a bilateral note's 2N."""
    torch.manual_seed(0)
    net = TextConditionedUNet(NetworkConfig(feature_size=8, text_dim=24)).eval()
    x, g = torch.rand(1, 1, 32, 32, 16), torch.randn(2, 24)
    other = torch.randn(4, 24)
    batch = stack_context([g, other])
    assert batch.shape == (2, 4, 24)
    with torch.no_grad():
        for fused in (True, False):
            net.fused_alignment = fused
            torch.testing.assert_close(net(x, batch[:1]), net(x, g[None]), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="cannot batch"):
        stack_context([torch.randn(2, 24), torch.randn(3, 24)])


def test_padding_invariance(encoder):
    batch = encoder(PROMPTS)
    for i, p in enumerate(PROMPTS):
        alone = encoder([p])[0]
        torch.testing.assert_close(batch[i], alone.repeat(batch.shape[1] // alone.shape[0], 1), atol=1e-5, rtol=1e-5)


def test_gradients_reach_prompt_vectors_and_llm_stays_bit_identical(encoder):
    before = {k: v.clone() for k, v in encoder.llm.state_dict().items()}
    opt = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=1e-2)
    trainable_before = encoder.prompt_vectors.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        loss = encoder(PROMPTS).pow(2).mean()
        loss.backward()
        assert encoder.prompt_vectors.grad is not None and encoder.prompt_vectors.grad.abs().sum() > 0
        assert encoder.seg_embedding.grad is not None and encoder.seg_embedding.grad.abs().sum() > 0
        assert all(p.grad is None for p in encoder.llm.parameters())
        opt.step()
    assert not torch.equal(trainable_before, encoder.prompt_vectors.detach())
    after = encoder.llm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the LLM is not part of the encoder's own parameters / state dict (never saved in a bundle)
    assert set(encoder.trainable_state_dict()) == {"prompt_vectors", "seg_embedding"}
    assert all(not k.startswith("llm") for k in encoder.state_dict())


def test_embedding_cache_runs_llm_once_per_note_and_tracks_prompt_vectors(encoder):
    encoder.clear_cache()
    calls = encoder.calls
    a = encoder.encode(PROMPTS[:1])
    encoder.encode(PROMPTS[:1])
    assert encoder.calls == calls + 1
    encoder.encode(PROMPTS[:2])  # only the new prompt is run
    assert encoder.calls == calls + 2
    with torch.no_grad():
        encoder.prompt_vectors.add_(0.5)
    b = encoder.encode(PROMPTS[:1])  # new prompt vectors -> new cache key
    assert encoder.calls == calls + 3 and not torch.allclose(a, b)


def test_fingerprint_is_dtype_independent_and_model_specific(tiny_llm_dir, other_llm_dir, encoder):
    bf16 = build_text_encoder(TextEncoderSpec(kind="causal-lm", source=str(tiny_llm_dir)), dtype="bf16")
    other = build_text_encoder(TextEncoderSpec(kind="causal-lm", source=str(other_llm_dir)))
    assert bf16.fingerprint == encoder.fingerprint
    assert other.fingerprint != encoder.fingerprint
    assert bf16([PROMPTS[0]]).dtype == torch.float32


def test_mismatched_llm_is_refused(encoder, other_llm_dir):
    spec = TextEncoderSpec.from_dict({**encoder.spec.to_dict(), "source": str(other_llm_dir)})
    with pytest.raises(LLMMismatchError, match="not the one this bundle was trained with"):
        build_text_encoder(spec)


def test_8bit_llm_is_the_same_model_and_gives_the_same_note_embedding(encoder, tiny_llm_dir, other_llm_dir):
    """--dtype int8 (bitsandbytes LLM.int8): a bundle's fingerprint still matches (checked from the folder's
    safetensors, since 8-bit weights lose the sign of values that round to zero), the linear layers are
    8-bit, and the note embedding is that of the full-precision LLM."""
    spec = TextEncoderSpec.from_dict(encoder.spec.to_dict())  # what a bundle records
    int8 = build_text_encoder(spec, dtype="int8")
    assert int8.load_in_8bit and int8.fingerprint == encoder.fingerprint
    linear = int8.llm.model.layers[0].self_attn.q_proj
    assert type(linear).__name__ == "Linear8bitLt" and linear.weight.dtype == torch.int8
    assert int8.llm.get_memory_footprint() < 0.6 * encoder.llm.get_memory_footprint()
    int8.load_trainable_state_dict(encoder.trainable_state_dict())
    with torch.no_grad():
        full, eight = encoder(PROMPTS), int8(PROMPTS)
    assert eight.shape == full.shape and eight.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(full.flatten(1), eight.flatten(1))
    assert float(cos.min()) > 0.99, cos
    int8.move_llm("cpu")  # offloading is a no-op for an 8-bit model, not an error
    wrong = TextEncoderSpec.from_dict({**spec.to_dict(), "source": str(other_llm_dir)})
    with pytest.raises(LLMMismatchError, match="not the one this bundle was trained with"):
        build_text_encoder(wrong, dtype="int8")


def test_8bit_without_bitsandbytes_says_what_to_install(tiny_llm_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(RuntimeError, match="pip install --no-deps bitsandbytes"):
        build_text_encoder(TextEncoderSpec(kind="causal-lm", source=str(tiny_llm_dir)), dtype="int8")


def test_missing_llm_and_hub_ids_are_clear_errors(tmp_path):
    with pytest.raises(LLMNotFoundError, match="not found"):
        build_text_encoder(TextEncoderSpec(kind="causal-lm", source=str(tmp_path / "nope")))
    with pytest.raises(LLMNotFoundError, match="never downloads"):
        build_text_encoder(TextEncoderSpec(kind="causal-lm", source="meta-llama/Llama-2-7b-chat-hf"))


def test_sentence_encoder_path_with_shipped_minilm():
    enc = build_text_encoder(TextEncoderSpec(kind="encoder", source=MINILM_SOURCE, num_sets=2, num_vectors=4))
    g = enc(PROMPTS)
    assert g.shape == (3, 4, 384)  # the bilateral note: 2 tokens per side
    torch.testing.assert_close(g[1], enc([PROMPTS[1]])[0], atol=1e-5, rtol=1e-4)
    g.sum().backward()
    assert enc.prompt_vectors.grad.abs().sum() > 0


def test_vision_only_has_no_text():
    enc = build_text_encoder(TextEncoderSpec(kind="none"))
    assert enc.encode(PROMPTS) is None and enc.dim is None
