"""flash attention's kernels replaced by stand-ins that compute the same thing on the CPU, so that the wiring
around them (transformers' flash path, dist_clm's document bounds) runs where no GPU and no flash_attn are:

    varlen   flash_attn_varlen_func: q, k, v of one run of tokens cut at cu_seqlens; each piece attends
             causally within itself (SDPA per piece); every call's cuts are recorded
    dense    flash_attn_func: each row of the batch attends causally over the whole row (what flash attention
             does when it is given no bounds: documents are not kept apart); recorded as "dense"

`install()` patches transformers (this process) and makes dist_clm build a model with flash_attention_2 by
building it with sdpa and switching its config (flash_attn cannot be imported here). As a script it installs
them, runs the `dist-clm` command line with its arguments and writes what the kernels received as JSON to
$FLASH_STANDIN_RECORD:

    python -m tests.flash_standin train ...
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

CALLS: list = []  # per call: the cuts (a list of ints) of varlen, or "dense"


def _attend(q, k, v, causal, scale):  # (L, H, D) or (B, L, H, D) in flash's layout
    out = F.scaled_dot_product_attention(q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2),
                                         is_causal=causal, scale=scale, enable_gqa=True)  # fmt: skip
    return out.transpose(-3, -2)


def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
           causal=False, **_):  # fmt: skip
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32
    cuts = cu_seqlens_q.tolist()
    assert max_seqlen_q == max_seqlen_k >= max(b - a for a, b in zip(cuts, cuts[1:], strict=False))
    CALLS.append(cuts)
    pieces = zip(cuts, cuts[1:], strict=False)
    return torch.cat([_attend(q[a:b], k[a:b], v[a:b], causal, softmax_scale) for a, b in pieces])


def dense(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
    CALLS.append("dense")
    return _attend(q, k, v, causal, softmax_scale)


def install() -> None:
    import transformers.modeling_flash_attention_utils as fa

    import dist_clm.models.attention as attention

    process = fa._lazy_define_process_function(varlen)
    fa.lazy_import_flash_attention = lambda *args, **kwargs: ((dense, varlen, None, None), process)
    build = attention.build_model

    def build_model(preset, pretrained, overrides, tokenizer, attn="sdpa", rope=(0.0, {})):
        model = build(preset, pretrained, overrides, tokenizer, "sdpa" if attn == attention.FLASH else attn, rope=rope)
        if attn == attention.FLASH:
            model.config._attn_implementation = attention.FLASH
        return model

    attention.build_model = build_model


if __name__ == "__main__":
    import atexit

    from dist_clm.cli import main
    from dist_clm.parallel.process_group import shutdown

    install()
    code = main(sys.argv[1:])
    with open(os.environ["FLASH_STANDIN_RECORD"], "w") as f:
        json.dump(CALLS, f)
    shutdown()  # (ends as the dist-clm command does: see dist_clm.cli.entry)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
