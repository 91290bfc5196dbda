"""docs/pitfalls.md, 15: models whose forward changes the logits after the LM head. qbco computes log-probs from
the decoder's hidden states and the head itself, so it must apply the same transform (Gemma's softcap,
Cohere's logit_scale, Granite's logits_scaling) or refuse the model. Checked against each model's own forward
on tiny random models built from their configs, with realistic logit sizes (the final norm's weight raised so
that raw logits reach about +-25, as a trained model's do)."""

import json

import pytest
import torch
from test_logprobs import batch, straightforward

import qbco.model.logprobs as ql
from qbco.common.errors import QbcoError
from qbco.model.logprobs import IDENTITY, LogitTransform, check_against_forward, completion_logps, logit_transform

VOCAB = 50
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny(kind: str):
    """A tiny random CausalLM of `kind` in float32, eval mode, LM head frozen (as under LoRA)."""
    import transformers as tf

    configs = {
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, dict(head_dim=16, query_pre_attn_scalar=16, final_logit_softcapping=30.0)),
        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, dict(head_dim=16, query_pre_attn_scalar=16, final_logit_softcapping=30.0)),
        "cohere": (tf.CohereConfig, tf.CohereForCausalLM, dict(logit_scale=0.0625)),  # Command R's value
        "granite": (tf.GraniteConfig, tf.GraniteForCausalLM, dict(logits_scaling=8.0)),  # Granite 3's value
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    }
    config_class, model_class, extra = configs[kind]
    torch.manual_seed(0)
    model = model_class(config_class(**COMMON, **extra)).float().eval()
    with torch.no_grad():
        norm = model.get_decoder().norm.weight
        norm.fill_(60.0 if kind.startswith("gemma") else 61.0)  # Gemma's norm scales by (1 + w)
    model.requires_grad_(False)
    return model


def gaps(model, transform=None):
    """(max |qbco - forward| over rows' log-prob sums, beyond what float32 can tell apart; the gradient's relative
    error) on the test batch; `transform` forces qbco's transform (IDENTITY: what qbco did before it knew of
    transforms). Sums of about -90 nats are 7.6e-6 apart in float32, so two summation orders may differ by
    2 ulps (1.5e-5, seen on one CPU with the same code); the gap counts only what lies beyond 4 ulps."""
    ids, attn, comp = batch()
    weight = model.get_decoder().layers[0].mlp.up_proj.weight
    weight.requires_grad_(True)
    if transform is not None:
        original, ql.logit_transform = ql.logit_transform, lambda config: transform
    try:
        fast = completion_logps(model, ids, attn, comp, chunk=3)
        (g_fast,) = torch.autograd.grad(fast.sum(), weight)
    finally:
        if transform is not None:
            ql.logit_transform = original
    slow = straightforward(model, ids, attn, comp)
    (g_slow,) = torch.autograd.grad(slow.sum(), weight)
    weight.requires_grad_(False)
    rounding = 4 * torch.finfo(torch.float32).eps * float(slow.detach().abs().max())
    value_gap = max(0.0, float((fast - slow).detach().abs().max()) - rounding)
    return value_gap, float((g_fast - g_slow).norm() / g_slow.norm())


@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "cohere", "granite"])
def test_log_probs_and_gradients_equal_the_models_own_forward(kind):
    """fp32: qbco's per-row log-prob sums within 1e-5 of the forward's, the gradient through the chunked head
    (HeadLogps, which takes it in forward) within 1e-5 relative. Without the transform the same model is off by
    nats: the test model exercises it."""
    model = tiny(kind)
    value_gap, grad_gap = gaps(model)
    assert value_gap < 1e-5 and grad_gap < 1e-5, (value_gap, grad_gap)
    before, _ = gaps(model, IDENTITY)
    assert before > 0.5, before


def tiny_gemma3_with_vision(cap):
    import transformers as tf

    text = {**COMMON, "vocab_size": 64, "head_dim": 16, "query_pre_attn_scalar": 16, "final_logit_softcapping": cap}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=61,
                             eoi_token_index=62, image_token_index=63)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        model.get_decoder().norm.weight.fill_(60.0)
    return model.requires_grad_(False)


@pytest.mark.parametrize("cap", [None, 30.0])
def test_gemma3_with_vision_equals_its_forward_or_is_refused(cap):
    """What AutoModelForCausalLM loads for gemma-3-4b and up, Gemma3ForConditionalGeneration, does not cap its
    logits in its forward (transformers 5.24) even where its text config names a cap (real Gemma 3 checkpoints
    name none, its text-only class and Gemma 3n's and PaliGemma's forwards apply it). Whichever: qbco's
    log-probs equal the forward's, or the check at load refuses the model; the plain model is never refused."""
    model = tiny_gemma3_with_vision(cap)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    try:
        check_against_forward(model)
    except QbcoError as err:
        assert cap is not None and "differ from the model's own forward" in str(err)
        return
    value_gap, grad_gap = gaps(model)
    assert value_gap < 1e-5 and grad_gap < 1e-5, (value_gap, grad_gap)


def test_the_transforms_read_from_the_configs():
    assert logit_transform(tiny("gemma2").config) == LogitTransform(1.0, 30.0)
    assert logit_transform(tiny("cohere").config) == LogitTransform(0.0625, None)
    assert logit_transform(tiny("granite").config) == LogitTransform(1 / 8, None)
    assert logit_transform(tiny("llama").config) == IDENTITY


def test_the_softcap_slope_is_the_derivative():
    """dt/dz of t = c tanh(s z / c), from t, against autograd in float64."""
    z = torch.linspace(-80, 80, 41, dtype=torch.float64, requires_grad=True)
    expected_t = 30.0 * torch.tanh(0.5 * z / 30.0)
    (expected,) = torch.autograd.grad(expected_t.sum(), z)
    transform = LogitTransform(0.5, 30.0)
    t = transform.apply_(z.detach().clone())
    assert torch.allclose(t, expected_t.detach(), atol=1e-12)
    assert torch.allclose(transform.slope(t), expected, atol=1e-12)


@pytest.mark.parametrize(
    "key, value, model_type",
    [
        ("logits_scaling", 4.0, "llama"),  # granite's key on another type: hyperclovax multiplies by it, granite divides
        ("logit_scale", 0.5, "mistral"),
        ("logits_soft_cap", 30.0, "llama"),  # recurrent_gemma's key
        ("lm_head_multiplier", 0.25, "llama"),  # falcon_h1
        ("output_multiplier", 2.0, "llama"),  # muse_*, before their softcap
        ("output_logit_soft_cap", 15.0, "llama"),  # xlstm
        ("dim_model_base", 256, "llama"),  # MiniCPM's remote code divides the hidden states by hidden / dim_model_base
    ],
)
def test_an_unknown_transform_in_the_config_is_refused(key, value, model_type):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, **{key: value})
    with pytest.raises(QbcoError, match=rf"model type '{model_type}'.*{key} = {value}"):
        logit_transform(config)


def test_keys_inside_the_decoder_or_switched_off_are_not_refused():
    from transformers import AutoConfig

    assert logit_transform(AutoConfig.for_model("gemma2", attn_logit_softcapping=50.0, final_logit_softcapping=None)) == IDENTITY
    assert logit_transform(AutoConfig.for_model("mixtral", output_router_logits=True)) == IDENTITY
    assert logit_transform(AutoConfig.for_model("mpt")) == IDENTITY  # logit_scale None: its HF port has none
    assert logit_transform(AutoConfig.for_model("hyperclovax", logits_scaling=1.0)) == IDENTITY  # times or over 1


def test_a_forward_that_no_config_names_is_refused_by_the_check_at_load():
    """A model whose forward scales its logits with nothing in the config (remote code, a custom head): the
    comparison with the model's own forward refuses it; the plain model passes."""
    model = tiny("llama")
    assert check_against_forward(model) < 1e-4
    forward = model.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    model.forward = scaled
    with pytest.raises(QbcoError, match="model type 'llama'.*differ from the model's own forward"):
        check_against_forward(model)


def test_training_a_model_with_an_unknown_transform_fails_before_its_weights(tmp_path, tiny_model_dir, separable_file, monkeypatch):
    """`qbco train` on a model whose config names a transform qbco does not apply: one line naming the model
    type and the key, exit 2, nothing written, and the weights never read (the config is checked first)."""
    import shutil

    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from qbco.cli.main import app

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "lm_head_multiplier": 0.5}))
    loads = []
    original = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a) or original(*a, **k))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--quiet", "--model", str(folder), "--data", str(separable_file), "--output", str(out)],
                                env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    assert "model type 'llama' transforms its logits after the LM head (lm_head_multiplier = 0.5)" in " ".join(result.output.split())
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not out.exists() and loads == []


def test_a_gemma_model_trains_through_qbco(tmp_path, separable_file):
    """The whole path on a saved tiny Gemma 2 (4-bit base, LoRA): load passes the check, a step's policy
    log-probs at step 0 equal the reference's (r = 0), and a short run's loss falls."""
    from conftest import make_tokenizer, separable_rows, words_of

    from qbco.run.config import build_config
    from qbco.train.loop import train

    folder = tmp_path / "gemma"
    rows = separable_rows(40)
    tok = make_tokenizer(words_of(rows) + [f"q{k}" for k in range(40)] + [f"a{k}" for k in range(8)])
    import transformers as tf

    torch.manual_seed(0)
    config = tf.Gemma2Config(**{**COMMON, "vocab_size": len(tok)}, head_dim=16, query_pre_attn_scalar=16)
    model = tf.Gemma2ForCausalLM(config)
    with torch.no_grad():
        model.get_decoder().norm.weight.fill_(60.0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    result = train(build_config(model=str(folder), data=str(separable_file), output=str(tmp_path / "run"), lr=1e-2, beta=0.5,
                                max_steps=6, batch_size=8, max_prompt_length=32, max_completion_length=16, eval_fraction=0.0),
                   log=lambda message: None)
    steps = [json.loads(line) for line in (result.output / "metrics.jsonl").read_text().splitlines()]
    assert steps[0]["reward_up"] == 0.0 and steps[0]["reward_down"] == 0.0
    assert steps[-1]["loss"] < steps[0]["loss"]
