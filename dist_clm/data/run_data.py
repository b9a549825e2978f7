"""Which prepared directories a run trains on, and the checks that they fit its tokenizer and model.

A run's tokenizer is the one its first source was prepared with (saved in that directory's tokenizer/).
Every source must have been made with the same tokenizer (by fingerprint: sha256 of its tokenizer.json), and
no token id in any source may be outside the model's embedding table: otherwise training would silently
learn from ids that mean different words, or crash deep inside an embedding lookup. The manifest's
`max_token_id` is checked here against the model; the loader checks every block against it (damage after
prepare), and the shards against their index.json sizes and hashes.
"""

from __future__ import annotations

from pathlib import Path

from dist_clm.config import DataConfig
from dist_clm.data.format import read_manifest, token_limit
from dist_clm.data.order import Source
from dist_clm.data.remote import configure as configure_cache
from dist_clm.data.remote import local_dir
from dist_clm.data.tokenizer import fingerprint, load_tokenizer
from dist_clm.errors import UserError


def training_sources(d: DataConfig) -> list[Source]:
    """`data.mix` (or the single `data.path`) with manifests read and names resolved (remote ones through
    this node's cache, per data.cache_dir and data.cache_limit)."""
    configure_cache(d.cache_dir, d.cache_limit)
    mix = d.mix or []
    if not mix:
        if not d.path:
            raise UserError(
                "config key 'data.path' is empty; set it to a directory written by `dist-clm prepare` "
                "(or list several in data.mix)."
            )
        sources = [Source(Path(d.path).name or "data", d.path, read_manifest(d.path))]
    else:
        sources = [Source(m.name or Path(m.path).name, m.path, read_manifest(m.path), m.weight) for m in mix]
    for s in sources:
        if s.weight > 0 and s.manifest.get("eval_only"):
            raise UserError(f"'{s.path}' is evaluation-only data (prepared with --val-fraction 1, no training split); "
                            "give it weight 0 in data.mix, or evaluate on it with `dist-clm eval RUN --data "
                            f"{s.path}`.")  # fmt: skip
    return sources


def run_tokenizer(sources: list[Source]):
    """The tokenizer saved beside the first source's shards, checked against that source's manifest."""
    first = local_dir(sources[0].path)
    tok = load_tokenizer(first / "tokenizer")
    if fingerprint(tok) != sources[0].manifest["tokenizer"]["fingerprint"]:
        raise UserError(
            f"the tokenizer in '{sources[0].path}/tokenizer' is not the one the shards were made with; prepare the "
            "data again."
        )
    return tok


def check_sources(sources: list[Source], tok, model_vocab: int, pretrained: str = "") -> None:
    """Refuse shards made with another tokenizer or holding ids the model cannot embed (one sentence each)."""
    fp = fingerprint(tok)
    origin = f"'{sources[0].path}/tokenizer'"
    if pretrained and (Path(pretrained) / "tokenizer.json").is_file():
        theirs = fingerprint(load_tokenizer(pretrained))
        if theirs != fp:
            raise UserError(
                f"the data in '{sources[0].path}' was tokenized with tokenizer {fp[:12]}, but the pretrained model "
                f"'{pretrained}' uses {theirs[:12]}; prepare the data with `--tokenizer {pretrained}`."
            )
    for s in sources:
        made_with = s.manifest["tokenizer"]["fingerprint"]
        if made_with != fp:
            raise UserError(
                f"the shards in '{s.path}' were made with tokenizer {made_with[:12]} but this run's tokenizer "
                f"(from {origin}) is {fp[:12]}; prepare '{s.path}' again with "
                f"`--tokenizer {sources[0].path}/tokenizer`."
            )
    check_vocab(sources, model_vocab)


def check_vocab(sources: list[Source], model_vocab: int) -> None:
    """Refuse shards holding ids that a model of `model_vocab` embeddings cannot embed."""
    for s in sources:
        top = token_limit(s.manifest)
        if top >= model_vocab:
            raise UserError(
                f"the shards in '{s.path}' hold token ids up to {top} but the model embeds only {model_vocab}; "
                "use a model whose vocab_size covers the tokenizer (or set model.overrides.vocab_size)."
            )
