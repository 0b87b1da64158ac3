"""The CPU LM head (pipeline/train/lm_head.py) against TRL's chunked kernel, field by field."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize(("temperature", "logit_scale", "softcap", "with_bias"),
                         [(1.0, 1.0, None, False), (0.7, 1.0, None, True), (1.0, 0.5, 30.0, False)])
def test_materialized_log_probs_match_trls_kernel(temperature, logit_scale, softcap, with_bias):
    from trl.kernels import ChunkedLogProbFunction

    from pipeline.train.lm_head import CpuLogProbFunction

    torch.manual_seed(0)
    n, h, v = 37, 16, 1000
    weight = (torch.randn(v, h) * 0.3).requires_grad_(True)
    bias = (torch.randn(v) * 0.1).requires_grad_(True) if with_bias else None
    targets = torch.randint(0, v, (n,))
    targets[0] = 5
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")

    def run(fn):
        hidden = torch.randn(n, h, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        with torch.no_grad():  # a tie: token 5's logit equals an earlier token's, so it is not top-1
            weight[3].copy_(weight[5])
        res = fn.apply(hidden, weight, bias, targets, temperature, 256, softcap, logit_scale, outputs)
        weight.grad = None
        if bias is not None:
            bias.grad = None
        (res[0] * torch.linspace(0.5, 2.0, n)).sum().backward()
        grads = [hidden.grad, weight.grad] + ([bias.grad] if bias is not None else [])
        return res, [g.clone() for g in grads]

    (ref, ref_grads), (ours, our_grads) = run(ChunkedLogProbFunction), run(CpuLogProbFunction(None))
    for name, a, b in zip(outputs[:4], ref[:4], ours[:4], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(ours[4], ref[4]) and not ours[4][0]
    for a, b in zip(ref_grads, our_grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_other_devices_keep_trls_kernel():
    from pipeline.train.lm_head import CpuLogProbFunction

    calls = []

    class Original:
        @staticmethod
        def apply(*args):
            calls.append(args)
            return "trl"

    meta = torch.empty(2, 4, device="meta")
    assert CpuLogProbFunction(Original).apply(meta, meta, None, meta, 1.0, 8, None, 1.0, ("log_probs",)) == "trl"
    assert len(calls) == 1
