"""DPO and ORPO (training/preference.py) against a direct computation from the papers' formulas."""

import torch


def test_dpo_and_orpo_equal_a_direct_computation_with_their_gradients():
    """Two pairs packed in one chosen and one rejected row (plus padding): the per-conversation log-probabilities,
    the DPO and ORPO losses and their gradients against a per-pair loop written from the papers' formulas."""
    from dist_clm.training.preference import conversation_logps, dpo, orpo

    torch.manual_seed(0)
    V, L = 11, 16
    logits = torch.randn(2, L, V, requires_grad=True)
    ids = torch.randint(0, V, (2, L))
    docs = [[(0, 6), (6, 13), (13, 16)], [(0, 5), (5, 12), (12, 16)]]  # two conversations and padding per row
    answers = [[(3, 6), (10, 13)], [(3, 5), (9, 12)]]  # the learned tokens of each conversation
    positions, labels = torch.zeros(2, L, dtype=torch.long), torch.full((2, L), -100)
    for row in range(2):
        for s, e in docs[row]:
            positions[row, s:e] = torch.arange(e - s)
        for s, e in answers[row]:
            labels[row, s:e] = ids[row, s:e]
    reference = torch.full((2, L), float("nan"))  # the loader's layout: each row's conversations, then NaN
    reference[:, :2] = torch.tensor([[-9.0, -7.5], [-8.0, -6.0]])
    beta, lam = 0.1, 0.2

    def direct(row, s, e):  # the summed log-probability of tokens s..e-1 of a row, each from the one before
        logp = torch.log_softmax(logits[row], -1)
        return sum(logp[t - 1, ids[row, t]] for t in range(s, e)), e - s

    conv = conversation_logps(logits, labels, positions)
    expect = [direct(row, s, e) for row in range(2) for s, e in answers[row]]
    torch.testing.assert_close(conv.logps[conv.valid()], torch.stack([x for x, _ in expect]))
    assert conv.counts[conv.valid()].tolist() == [n for _, n in expect]
    assert conv.valid().sum(1).tolist() == [2, 2] and conv.starts[:, :2].tolist() == [[0, 6], [0, 5]]

    for name in ("dpo", "orpo"):
        ours = (dpo(conv, reference, beta) if name == "dpo" else orpo(conv, lam))[0].sum()
        (g_ours,) = torch.autograd.grad(ours, logits, retain_graph=True)
        total = 0.0
        for j in range(2):
            (pc, nc), (pr, nr) = expect[j], expect[2 + j]
            if name == "dpo":
                margin = beta * ((pc - reference[0, j]) - (pr - reference[1, j]))
                total = total - torch.log(torch.sigmoid(margin))
            else:
                mc, mr = pc / nc, pr / nr
                odds = lambda m: torch.log(torch.exp(m) / (1 - torch.exp(m)))  # noqa: E731
                total = total - mc - lam * torch.log(torch.sigmoid(odds(mc) - odds(mr)))
        (g_direct,) = torch.autograd.grad(total, logits, retain_graph=True)
        torch.testing.assert_close(ours, total, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_ours, g_direct, rtol=1e-4, atol=1e-7)
        assert torch.isfinite(g_ours).all()
