"""Hugging Face transformers models built from tiny configs (random weights, no download),
float64: Capture against torch.func per-sample gradients, and 20 steps of FNGD, SENG, KFAC
and TWA. GPT-2 (Conv1D, tied wte/lm_head, position table called on (1, T) ids), Llama tied
and untied (LlamaRMSNorm), BERT (position and token-type tables broadcast over the batch),
and GPT-NeoX (rotary attention, fused qkv). The losses are computed here from the
ModelOutput's logits (the optimizers take the scalar loss's backward)."""
import pytest
import torch
import torch.nn.functional as F

from model_checks import F64, check_capture, check_optimizer

transformers = pytest.importorskip(
    "transformers", reason="transformers is a test-only dependency (scripts/install.sh)")

V, T, C = 40, 6, 3
SMALL = dict(vocab_size=V, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _ids(B):
    g = torch.Generator().manual_seed(1)
    return (torch.randint(1, V, (B, T), generator=g),)


def _lm_losses(model, ids):
    """Per-sample next-token cross-entropy (token mean)."""
    logits = model(input_ids=ids).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1),
                         reduction="none")
    return ce.reshape(ids.shape[0], -1).mean(1)


def _cls_batch(B):
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, V, (B, T), generator=g), torch.randint(0, C, (B,), generator=g)


def _cls_losses(model, ids, labels):
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits, labels, reduction="none")


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **SMALL)
    return transformers.GPT2LMHeadModel(cfg).to(F64).eval()


def _llama(tied):
    def build():
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=1, max_position_embeddings=16,
                                       tie_word_embeddings=tied, **SMALL)
        return transformers.LlamaForCausalLM(cfg).to(F64).eval()
    return build


def _bert():
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=16,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  num_labels=C, **SMALL)
    return transformers.BertForSequenceClassification(cfg).to(F64).eval()


def _neox():
    cfg = transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=16,
                                     hidden_dropout=0.0, attention_dropout=0.0, **SMALL)
    return transformers.GPTNeoXForCausalLM(cfg).to(F64).eval()


MODELS = {
    "gpt2": (_gpt2, _ids, _lm_losses),
    "llama_tied": (_llama(True), _ids, _lm_losses),
    "llama_untied": (_llama(False), _ids, _lm_losses),
    "bert": (_bert, _cls_batch, _cls_losses),
    "gpt_neox": (_neox, _ids, _lm_losses),
}
LR = {"FNGD": 0.1, "SENG": 0.1, "KFAC": 0.1, "TWA": 0.1}


@pytest.mark.parametrize("name", MODELS)
def test_capture_matches_per_sample_gradients(name, one_thread):
    check_capture(*MODELS[name])


@pytest.mark.parametrize("method", ["FNGD", "SENG", "KFAC", "TWA"])
@pytest.mark.parametrize("name", MODELS)
def test_optimizer_lowers_the_loss(name, method, one_thread):
    check_optimizer(method, *MODELS[name], lr=LR[method])
