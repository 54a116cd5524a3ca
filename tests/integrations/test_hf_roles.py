"""Golden roles for Hugging Face models built from configs, and every registry name training a
tiny Llama from ``soaplab.optimizer(name, model)``."""

import pytest
import torch

import soaplab
from soaplab.registry import OPTIMIZERS
from soaplab.roles import infer_roles
from tests.integrations.hf_models import VOCAB, bert, gpt2, llama, mixtral

LLAMA = {"model.embed_tokens.weight": "embedding", "model.norm.weight": "vector"}
LLAMA_LAYER = {"self_attn.q_proj.weight": "hidden", "self_attn.k_proj.weight": "hidden",
               "self_attn.v_proj.weight": "hidden", "self_attn.o_proj.weight": "hidden",
               "mlp.gate_proj.weight": "hidden", "mlp.up_proj.weight": "hidden",
               "mlp.down_proj.weight": "hidden", "input_layernorm.weight": "vector",
               "post_attention_layernorm.weight": "vector"}


def _golden(layers, per_layer, prefix, **rest):
    return {**{f"{prefix}.{i}.{k}": v for i in range(layers) for k, v in per_layer.items()},
            **rest}


def _roles(model):
    return {n: r.role for n, r in infer_roles(model).items()}


def test_llama_tied():
    roles = infer_roles(llama(tied=True))
    assert {n: r.role for n, r in roles.items()} == \
        _golden(2, LLAMA_LAYER, "model.layers", **LLAMA)
    assert roles["model.embed_tokens.weight"].evidence == "tied"
    assert not any(r.guessed for r in roles.values())


def test_llama_untied():
    roles = infer_roles(llama(tied=False))
    assert {n: r.role for n, r in roles.items()} == \
        _golden(2, LLAMA_LAYER, "model.layers", **LLAMA, **{"lm_head.weight": "head"})
    assert roles["lm_head.weight"].evidence == "metadata"


def test_gpt2():
    per_layer = {"ln_1.weight": "vector", "ln_1.bias": "vector", "attn.c_attn.weight": "hidden",
                 "attn.c_attn.bias": "vector", "attn.c_proj.weight": "hidden",
                 "attn.c_proj.bias": "vector", "ln_2.weight": "vector", "ln_2.bias": "vector",
                 "mlp.c_fc.weight": "hidden", "mlp.c_fc.bias": "vector",
                 "mlp.c_proj.weight": "hidden", "mlp.c_proj.bias": "vector"}
    assert _roles(gpt2()) == _golden(
        2, per_layer, "transformer.h", **{"transformer.wte.weight": "embedding",
                                          "transformer.wpe.weight": "embedding",
                                          "transformer.ln_f.weight": "vector",
                                          "transformer.ln_f.bias": "vector"})


def test_bert_classifier():
    roles = infer_roles(bert())
    expected = {"bert.embeddings.word_embeddings.weight": "embedding",
                "bert.embeddings.position_embeddings.weight": "embedding",
                "bert.embeddings.token_type_embeddings.weight": "embedding",
                "bert.pooler.dense.weight": "hidden", "classifier.weight": "head"}
    for name, r in roles.items():
        assert r.role == expected.get(name, "vector" if name.endswith(("bias", "LayerNorm.weight"))
                                      else "hidden"), name
    assert roles["classifier.weight"].evidence == "name"  # no get_output_embeddings: flagged


def test_mixtral_experts_are_stacks_and_the_router_hidden():
    roles = _roles(mixtral())
    assert roles["model.layers.0.mlp.experts.gate_up_proj"] == "stack"
    assert roles["model.layers.0.mlp.experts.down_proj"] == "stack"
    assert roles["model.layers.0.mlp.gate.weight"] == "hidden"
    assert roles["lm_head.weight"] == "head"


def test_describe_roles_lists_every_parameter_once():
    model = llama(tied=True)
    table = soaplab.describe_roles(model, "muon").splitlines()
    assert len(table) == 2 + len(list(model.parameters()))
    assert sum("| embedding" in row and "AdamW" in row for row in table) == 1


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_name_trains_a_tiny_llama(name):
    torch.manual_seed(0)
    model = llama(tied=True)
    opt = soaplab.optimizer(name, model)  # its default lr
    batch = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(10):
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, (name, losses)


@pytest.mark.parametrize("make", [llama, gpt2, bert, mixtral], ids=["llama", "gpt2", "bert",
                                                                      "mixtral"])
def test_soap_muon_takes_attention_and_mlp_from_the_models_metadata(make):
    """Attention (its projections and output projection, BERT's `attention.output` included)
    on NorMuon, the MLP (experts and router too) on SOAP, both from `_can_record_outputs`;
    BERT's pooler is outside every block: NorMuon."""
    model = make()
    parts = soaplab.roles.infer_parts(model)
    attention = ("self_attn.", ".attn.", ".attention.", "pooler.")
    assert parts and all(p.evidence == "metadata" for p in parts.values())
    assert {n: p.part for n, p in parts.items()} == \
        {n: "other" if "pooler" in n else "attention" if any(a in n for a in attention)
         else "mlp" for n in parts}
    routes = {id(p): type(o).__name__ for p, o, _ in
              soaplab.optimizer("soap_muon", model).routes()}
    for n, p in model.named_parameters():
        want = "AdamW" if n not in parts else "SOAP" if parts[n].part == "mlp" else "NorMuon"
        assert routes[id(p)] == want, n
    assert sum(p.part == "mlp" for p in parts.values()) >= 2
