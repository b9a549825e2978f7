"""Models: decoder-only transformers from presets or a pretrained directory (build.py), which attention
implementation trains and how packed documents reach it (attention.py), the fused chunked loss head
(loss_head.py), what a Mixture-of-Experts model adds (moe.py) and its experts without host syncs
(moe_experts.py).

Imports: the foundation only.
"""
