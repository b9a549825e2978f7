"""Decoder-only models: presets built with `AutoModelForCausalLM.from_config`, or a local pretrained directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_clm.errors import UserError

# model types whose logits are exactly lm_head(the base model's last hidden state): no scaling or soft-capping
PLAIN_HEADS = ("gpt2", "llama", "mistral", "qwen2")
# the families whose transformers config carries a tensor-parallel plan that DeepSpeed's AutoTP trains with
# (projections split by columns then rows; GPT-2's fused Conv1D layers have none)
TENSOR_PARALLEL_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# the fused loss head's chunk (loss_head.py), here without torch so that the memory plan reads the same figure:
# fp32 logits per chunk, 16K vocabulary columns at 4096 tokens, 2K at 32 x 1024
CHUNK_BYTES = 256 * 2**20
MIN_COLUMNS = 256  # (very long micro batches: chunks narrower than this make slow products)


def chunk_columns(tokens: int, vocab: int) -> int:
    """Vocabulary columns per chunk of the fused loss head for `tokens` rows: CHUNK_BYTES of fp32 logits (at least
    MIN_COLUMNS, at most the whole vocabulary)."""
    return min(vocab, max(MIN_COLUMNS, CHUNK_BYTES // (4 * max(tokens, 1))))


# Each preset is a transformers config: `model_type` picks the family, the rest are that config's fields.
# vocab_size, bos/eos ids always come from the tokenizer.
PRESETS: dict[str, dict[str, Any]] = {
    # For tests and the quick start: trains on 2 CPU cores in a couple of minutes.
    "tiny": dict(model_type="gpt2", n_layer=2, n_head=4, n_embd=128, n_positions=512),
    # A Llama-style tiny model (RMSNorm, rotary positions, SwiGLU, untied embeddings) for tests.
    "tiny-llama": dict(
        model_type="llama",
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=128,
        intermediate_size=344,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    ),
    # A Qwen3-style tiny model (tiny-llama's shape with Qwen3's per-head query/key norms) for tests.
    "tiny-qwen3": dict(
        model_type="qwen3",
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        hidden_size=128,
        intermediate_size=344,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    ),
    # GPT-2 small (124M with its 50257-token vocabulary).
    "gpt2-124m": dict(model_type="gpt2", n_layer=12, n_head=12, n_embd=768, n_positions=1024),
    # GPT-2 medium (355M with its 50257-token vocabulary).
    "gpt2-350m": dict(model_type="gpt2", n_layer=24, n_head=16, n_embd=1024, n_positions=1024),
    # The Llama-style 468M of the GPU benchmark (hidden 1024, 24 layers, 16 heads, MLP 4096; 32k vocabulary).
    "llama-468m": dict(
        model_type="llama",
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        hidden_size=1024,
        intermediate_size=4096,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
    # A Llama-style ~1B model (1.04 B with a 32k vocabulary; Llama-3.2-1B's shape): 16 layers, width 2048, GQA 32/8.
    "llama-1b": dict(
        model_type="llama",
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        hidden_size=2048,
        intermediate_size=8192,
        max_position_embeddings=2048,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    # Llama-3-8B's shape (8.03 B with its 128256-token vocabulary): 32 layers, width 4096, GQA 32/8, MLP 14336.
    "llama-8b": dict(
        model_type="llama",
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        hidden_size=4096,
        intermediate_size=14336,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    ),
    # A Llama-style ~500M model (494 M with a 32k vocabulary): 24 layers, width 1280, grouped-query attention.
    "llama-500m": dict(
        model_type="llama",
        num_hidden_layers=24,
        num_attention_heads=10,
        num_key_value_heads=2,
        hidden_size=1280,
        intermediate_size=3456,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
    # Mixture-of-Experts decoders (Qwen3-MoE's layout: every layer sparse, top-k routing over its experts, the
    # router's load-balancing loss added to the training loss, dist_clm/models/moe.py). For tests: 8 experts, top 2.
    "tiny-moe": dict(
        model_type="qwen3_moe",
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        hidden_size=128,
        intermediate_size=344,
        moe_intermediate_size=96,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    ),
    # ~115 M parameters, ~49 M active per token with a 32k vocabulary: 8 layers of 16 experts, top 2.
    "moe-small": dict(
        model_type="qwen3_moe",
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        hidden_size=512,
        intermediate_size=1536,
        moe_intermediate_size=384,
        num_experts=16,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
    # ~1 B parameters, ~0.2 B active per token with a 32k vocabulary (OLMoE's proportions, scaled down): 16 layers
    # of 32 experts, top 4.
    "moe-1b": dict(
        model_type="qwen3_moe",
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        hidden_size=1024,
        intermediate_size=2816,
        moe_intermediate_size=576,
        num_experts=32,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        max_position_embeddings=2048,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    ),
}

_DROPOUT_OFF = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}  # pretraining: no dropout


def apply_rope(config, theta: float = 0.0, scaling: dict | None = None) -> None:
    """model.rope_theta / model.rope_scaling on a transformers config: its rope_theta and rope_scaling
    (transformers 4), or its rope_parameters (transformers 5), checked by transformers' own validation."""
    if not theta and not scaling:
        return
    if not any(hasattr(config, key) for key in ("rope_theta", "rope_parameters")):
        raise UserError(
            f"model.rope_theta and model.rope_scaling set rotary position embeddings (Llama-style models), which "
            f"{config.model_type} models do not have; remove them."
        )
    if getattr(config, "rope_parameters", None) is not None:
        config.rope_parameters = {**config.rope_parameters, **({"rope_theta": theta} if theta else {}),
                                  **(scaling or {})}  # fmt: skip
    else:
        config.rope_theta = theta or config.rope_theta
        config.rope_scaling = dict(scaling) if scaling else config.rope_scaling
    try:
        from transformers.modeling_rope_utils import rope_config_validation

        rope_config_validation(config)
    except ImportError:  # (transformers 5 validates rope_parameters itself)
        pass
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"model.rope_scaling {scaling} is not valid for transformers: {e}") from None


def build_model(preset: str, pretrained: str, overrides: dict[str, Any], tokenizer, attn: str = "sdpa",
                rope: tuple[float, dict] = (0.0, {})):  # fmt: skip
    """A fresh model from a preset (+overrides), or the weights of a local pretrained directory; `rope`:
    (model.rope_theta, model.rope_scaling)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dist_clm.models.moe_experts import make_sync_free

    n_vocab = len(tokenizer)
    if pretrained:
        path = Path(pretrained)
        if not (path / "config.json").is_file():
            raise UserError(
                f"model.pretrained '{path}' is not a model directory with config.json; "
                "give a directory written by save_pretrained (or `dist-clm export`)."
            )
        config = AutoConfig.from_pretrained(str(path))
        apply_rope(config, *rope)
        model = AutoModelForCausalLM.from_pretrained(str(path), config=config, dtype=torch.float32,
                                                     attn_implementation=attn)  # fmt: skip
        if model.config.vocab_size < n_vocab:
            raise UserError(
                f"the pretrained model has {model.config.vocab_size} token embeddings but the tokenizer "
                f"has {n_vocab} tokens; use the tokenizer the model was trained with."
            )
    else:
        config = preset_config(preset, overrides, n_vocab, tokenizer.bos_token_id, tokenizer.eos_token_id, rope)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)  # fp32 master weights
    make_sync_free(model)  # MoE experts without host syncs, on the same parameters (moe_experts.py)
    return model


def preset_config(preset: str, overrides: dict[str, Any], vocab: int, bos: int | None = None, eos: int | None = None,
                  rope: tuple[float, dict] = (0.0, {})):  # fmt: skip
    """The transformers config of a preset with model.overrides and the RoPE settings (no weights)."""
    from transformers import AutoConfig

    if preset not in PRESETS:
        model_shape(preset, "", overrides)  # (the sentence for an unknown preset)
    fields = dict(PRESETS[preset])
    model_type = fields.pop("model_type")
    fields.update(_DROPOUT_OFF.get(model_type, {}))
    fields.update(vocab_size=vocab, bos_token_id=bos, eos_token_id=eos)
    try:
        config = AutoConfig.for_model(model_type, **fields)
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise UserError(f"config key 'model.overrides.{key}' is not a field of the {model_type} config.")
            setattr(config, key, value)
        apply_rope(config, *rope)
    except (TypeError, ValueError) as e:
        raise UserError(f"the model config from preset {preset!r} and model.overrides is invalid: {e}") from None
    return config


@dataclass(frozen=True)
class Shape:
    """What the checks of a run's settings need of its model: its family, attention heads, key/value heads,
    positions (None: the family has no limit), embeddings (None: the tokenizer's size) and experts per layer (0: a
    dense model)."""

    model_type: str
    heads: int
    kv_heads: int
    positions: int | None
    vocab: int | None = None
    experts: int = 0

    @classmethod
    def of(cls, config) -> Shape:
        """The shape of a transformers config."""
        text = config.get_text_config()
        heads = text.num_attention_heads
        kv = getattr(text, "num_key_value_heads", None) or heads
        experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None) or 0
        return cls(config.model_type, heads, kv, max_positions(config), config.vocab_size, experts)


# transformers' attribute maps for the fields Shape reads, for the families whose configs name them otherwise
_ALIASES = {"num_attention_heads": ("n_head",), "max_position_embeddings": ("n_positions",)}


def model_shape(preset: str, pretrained: str, overrides: dict[str, Any]) -> Shape | None:
    """The model's Shape from its preset (+ model.overrides) or its directory's config.json, read as data: the
    checks that run before the process group forms use it, as transformers' config classes import torch (seconds).
    None when the fields are not where this reading looks (the same checks then run on the built model)."""
    if pretrained:
        path = Path(pretrained) / "config.json"
        if not path.is_file():
            raise UserError(
                f"model.pretrained '{pretrained}' is not a model directory with config.json; "
                "give a directory written by save_pretrained (or `dist-clm export`)."
            )
        try:
            fields = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # (transformers' own reading of it names the problem)
        layers = [fields.get("text_config") or fields]
    else:
        if preset not in PRESETS:
            raise UserError(f"config key 'model.preset' must be one of {', '.join(PRESETS)}, got {preset!r}.")
        layers = [overrides, PRESETS[preset]]  # (an override wins, under either of a field's names)

    def field(name: str):
        for layer in layers:
            for key in (name, *_ALIASES.get(name, ())):
                value = layer.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    return value
        return None

    model_type, heads = layers[-1].get("model_type"), field("num_attention_heads")
    if not isinstance(model_type, str) or heads is None:
        return None
    kv, positions = field("num_key_value_heads") or heads, field("max_position_embeddings")
    experts = field("num_experts") or field("num_local_experts") or 0
    return Shape(model_type, heads, kv, positions, field("vocab_size"), experts)


def max_positions(config) -> int | None:
    """The longest sequence the model's position embeddings allow (None if the family has no limit)."""
    for key in ("n_positions", "max_position_embeddings"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return None


def param_numel(p) -> int:
    """A parameter's number of elements, whole or partitioned by ZeRO-3 (whose empty stand-in has its ds_numel)."""
    return getattr(p, "ds_numel", None) or p.numel()


def count_params(model) -> int:
    return sum(param_numel(p) for p in model.parameters())


def active_params(model) -> int:
    """The parameters one token passes through: all of a dense model's; in a Mixture-of-Experts model, its
    experts' only top-k of each layer's experts (shared experts and the router count whole)."""
    from dist_clm.models import moe

    inactive = 0.0
    for block in moe.sparse_blocks(model):
        experts = sum(param_numel(p) for p in block.experts.parameters())
        inactive += experts * (1 - moe.top_k(model.config) / moe.num_experts(model.config))
    return count_params(model) - round(inactive)


def flops_per_token(config, n_params: int, block_size: int) -> float:
    """Training FLOPs per token: 6N for the matmuls with weights plus 12·L·d·T for attention (PaLM appendix B);
    N the active parameters (active_params)."""
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    width = getattr(config, "hidden_size", None) or config.n_embd
    return 6.0 * n_params + 12.0 * layers * width * block_size
