"""The Hugging Face Trainer's loss from hidden states (no logits): the same value and gradient
as its loss from logits, in float64, for GPT-2 and Llama; and the fallback when a model's logits
are not its output layer on its last hidden states."""

from __future__ import annotations

import pytest
import torch

from codistill import Codistiller, MemoryExchange

transformers = pytest.importorskip("transformers")
VOCAB = 97


def _config(kind: str):
    small = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if kind == "gpt2":
        return transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=16, resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0, **small)
    return transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                                    **small)


def _trainer(model, exchange, tmp_path, name, **kw):
    from codistill.integrations.hf import CodistillTrainer

    args = transformers.TrainingArguments(output_dir=str(tmp_path / name), report_to="none", use_cpu=True,
                                          save_strategy="no", disable_tqdm=True)
    cd = Codistiller(model, exchange, replica=0, num_replicas=2, alpha=0.7)
    cd.refresh()
    return CodistillTrainer(model=model, args=args, codistiller=cd, **kw)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("num_items", [None, 9])
def test_loss_from_hidden_states_equals_the_loss_from_logits(tmp_path, kind, num_items):
    """φ as the Trainer normalises it (mean, or sum over ``num_items_in_batch``) + α·ψ over the
    labelled next tokens, against the same computed from the float64 logits by autograd (the
    Trainer's own loss casts logits to fp32, so it is not the reference here)."""
    torch.manual_seed(0)
    student, peer = (transformers.AutoModelForCausalLM.from_config(_config(kind)).double() for _ in range(2))
    exchange = MemoryExchange()
    Codistiller(peer, exchange, replica=1, num_replicas=2).publish(1)
    trainer = _trainer(student, exchange, tmp_path, "fused")
    ids = torch.randint(1, VOCAB, (3, 10), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[1, 6:] = -100  # padding: neither φ nor ψ counts it
    inputs = {"input_ids": ids, "attention_mask": (labels != -100).long(), "labels": labels}
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    got = trainer.compute_loss(student, dict(inputs), num_items_in_batch=num_items)
    assert trainer.fused_linear is True
    model_inputs = {"input_ids": ids, "attention_mask": inputs["attention_mask"]}
    s, t = student(**model_inputs).logits[:, :-1], peer(**model_inputs).logits[:, :-1].detach()
    y, keep = labels[:, 1:], labels[:, 1:] != -100
    ce = torch.nn.functional.cross_entropy(s[keep], y[keep], reduction="sum")
    phi = ce / (keep.sum() if num_items is None else num_items)
    p, logq = torch.softmax(t[keep], -1), torch.log_softmax(s[keep], -1)
    psi = (p * (p.log() - logq)).sum(-1).mean()
    want = phi + 0.7 * psi
    assert float(psi) > 1e-3  # the teacher differs: ψ counts
    assert float(trainer.codistiller.last_psi) == pytest.approx(float(psi), rel=1e-10)
    assert abs(float(got.detach()) - float(want.detach())) < 1e-10 * abs(float(want.detach()))
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params), strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)
    plain = _trainer(student, exchange, tmp_path, "plain", fused_linear=False)
    fp32 = plain.compute_loss(student, dict(inputs), num_items_in_batch=num_items)
    assert plain.fused_linear is False
    assert abs(float(fp32.detach()) - float(want.detach())) < 1e-5 * abs(float(want.detach()))  # fp32 φ


def test_a_model_whose_logits_are_scaled_keeps_the_loss_from_logits(tmp_path):
    torch.manual_seed(0)
    student, peer = (transformers.AutoModelForCausalLM.from_config(_config("gpt2")) for _ in range(2))
    original = student.forward

    def scaled(*args, **kwargs):
        out = original(*args, **kwargs)
        out.logits = out.logits * 0.0625  # a logit scale, as Cohere's models apply
        return out

    student.forward = scaled
    exchange = MemoryExchange()
    Codistiller(peer, exchange, replica=1, num_replicas=2).publish(1)
    trainer = _trainer(student, exchange, tmp_path, "capped")
    ids = torch.randint(1, VOCAB, (2, 8))
    student.train()
    loss = trainer.compute_loss(student, {"input_ids": ids, "labels": ids})
    assert trainer.fused_linear is False and torch.isfinite(loss)
