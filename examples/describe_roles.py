"""Print the roles soaplab gives a tiny Llama (tied embeddings) and where each parameter goes.

    HF_HUB_OFFLINE=1 python examples/describe_roles.py [--optimizer soap_hidden]
"""

import argparse

from transformers import LlamaConfig, LlamaForCausalLM

import soaplab


def tiny_llama() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--optimizer", default="soap_hidden", choices=sorted(soaplab.OPTIMIZERS))
    args = parser.parse_args()
    print(soaplab.describe_roles(tiny_llama(), args.optimizer, weight_decay=0.1))
