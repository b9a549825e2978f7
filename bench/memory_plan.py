"""The memory plan's activations (dist_clm/parallel/memory_plan.py) against what autograd really keeps: one forward
pass of each model as dist_clm builds it (sync-free MoE experts included), every tensor saved for the backward
pass counted once by its storage (parameters excluded), side by side with activation_bytes for the same micro
batch, in fp32 on this machine's CPU.

    python bench/memory_plan.py [--markdown] [--tokens B,L]
"""

from __future__ import annotations

import argparse

from tables import render

# (preset, model.overrides): each family the plan counts, at a width where a forward pass takes a second
MODELS = [("tiny", {}), ("tiny-llama", {}), ("tiny-moe", {}), ("llama-500m", {"num_hidden_layers": 2}),
          ("moe-small", {"num_hidden_layers": 2})]  # fmt: skip
VOCAB = 4096


class _Tokenizer:
    bos_token_id, eos_token_id = 0, 1

    def __len__(self) -> int:
        return VOCAB


def saved_bytes(preset: str, overrides: dict, batch: int, length: int) -> int:
    """Bytes of the distinct storages autograd saves in one forward pass of the model's body (no loss head)."""
    import torch

    from dist_clm.models.build import build_model

    model = build_model(preset, "", overrides, _Tokenizer())
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def keep(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    tokens = torch.randint(0, VOCAB, (batch, length))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model.base_model(input_ids=tokens)
    return sum(n for ptr, n in seen.items() if ptr not in params)


def planned_bytes(preset: str, overrides: dict, batch: int, length: int) -> int:
    from dist_clm.config import load_config
    from dist_clm.parallel import memory_plan as mp

    cfg = load_config(None, [f"model.preset={preset}", f"train.micro_batch_size={batch}", f"data.block_size={length}"])
    cfg = cfg.replace(model={"overrides": overrides})
    machine = mp.Machine(1, 1, 0, 0, on_gpu=False)
    return mp.activation_bytes(cfg, mp.size_of_run(cfg, VOCAB), machine, 4)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--tokens", default="4,128", help="micro batch x block size")
    a = ap.parse_args()
    batch, length = map(int, a.tokens.split(","))
    rows = []
    for preset, overrides in MODELS:
        saved, planned = saved_bytes(preset, overrides, batch, length), planned_bytes(preset, overrides, batch, length)
        name = preset + "".join(f" {k}={v}" for k, v in overrides.items())
        rows.append([name, f"{saved / 2**20:.1f}", f"{planned / 2**20:.1f}", f"{planned / saved:.2f}"])
    print(render(["model", "saved by autograd (MiB)", "planned (MiB)", "planned / saved"], rows, a.markdown))


if __name__ == "__main__":
    main()
