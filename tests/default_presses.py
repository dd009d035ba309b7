"""Every press with the options its tests use (kvpress's ``tests/default_presses.py``): the press tests loop over
this one list, so a new press is tested by adding a line here."""
import torch

from rap.models import build_tiny, byte_tokenizer
from rap.presses import PRESSES
from rap.presses.kvzap import fit_surrogate


def tiny_llama_surrogate() -> dict:
    """A KVzap surrogate fitted on tiny-llama (hidden 64, 2 KV heads, 2 layers) from four random texts."""
    model, _ = build_tiny("tiny-llama")
    texts = [torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    instruction = byte_tokenizer()("\nRepeat.", add_special_tokens=False, return_tensors="pt").input_ids
    return fit_surrogate(model, texts, instruction)


default_presses = [(PRESSES["streaming"], {"sinks": 2}), (PRESSES["knorm"], {}),
                   (PRESSES["snapkv"], {"window": 4, "kernel": 3}), (PRESSES["kvzip"], {}),
                   (PRESSES["kvzap"], {"surrogate": tiny_llama_surrogate(), "window": 2})]
assert {cls.name for cls, _ in default_presses} == set(PRESSES), "a registered press is missing from default_presses"
