"""soaplab in the Hugging Face Trainer: a tiny Llama built from a config (no download), trained
with a soaplab factory. The Trainer does not pass its learning_rate on this path: give lr (and
weight_decay) in the factory's kwargs.

    pip install -e ".[hf]"
    HF_HUB_OFFLINE=1 python examples/hf_trainer.py [--optimizer muon] [--steps 20]
"""

import argparse
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import soaplab
from soaplab.integrations import hf


class Tokens(torch.utils.data.Dataset):
    """Random sequences of a 64-token vocabulary that repeat with period 8: learnable."""

    def __init__(self, n: int = 64) -> None:
        period = torch.randint(0, 64, (n, 8), generator=torch.Generator().manual_seed(0))
        self.data = period.repeat(1, 4)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i], "labels": self.data[i]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--optimizer", default="soap_hidden", choices=sorted(soaplab.OPTIMIZERS))
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    print(soaplab.describe_roles(model, args.optimizer))
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            model=model, train_dataset=Tokens(),
            args=TrainingArguments(output_dir=out, max_steps=args.steps, warmup_steps=5,
                                   per_device_train_batch_size=8, logging_steps=5,
                                   save_strategy="no", report_to=[], use_cpu=True,
                                   disable_tqdm=True),
            optimizer_cls_and_kwargs=(hf.factory(args.optimizer),
                                      {"lr": 1e-2, "weight_decay": 0.01}))
        trainer.train()


if __name__ == "__main__":
    main()
