import pytest
import torch

from nanodp.sampler import Sampler, SamplingParams, filter_logits


def test_greedy_is_argmax():
    logits = torch.randn(5, 300)
    assert torch.equal(Sampler(SamplingParams(temperature=0), "cpu")(logits), logits.argmax(-1))


def test_top_p_keeps_smallest_set_reaching_p():
    for _ in range(20):
        logits = torch.randn(3, 50) * 3
        p = float(torch.empty(1).uniform_(0.05, 0.99))
        kept = filter_logits(logits, SamplingParams(temperature=1.0, top_p=p)).isfinite()
        probs = logits.softmax(-1)
        for b in range(3):
            order = probs[b].argsort(descending=True)
            cum = probs[b][order].cumsum(0)
            n = int((cum < p).sum()) + 1  # smallest prefix whose mass reaches p
            expect = torch.zeros(50, dtype=torch.bool)
            expect[order[:n]] = True
            assert torch.equal(kept[b], expect)


def test_top_k_and_temperature():
    logits = torch.randn(2, 100)
    kept = filter_logits(logits, SamplingParams(temperature=0.7, top_k=5)).isfinite()
    assert kept.sum(-1).tolist() == [5, 5]
    assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, logits.topk(5).indices, True))
    f = filter_logits(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(f, logits / 0.5)


def test_seeded_sampling_is_reproducible_and_varies():
    logits = torch.randn(4, 1000)
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=123)
    a = [Sampler(p, "cpu")(logits) for _ in range(2)]
    s = Sampler(p, "cpu")
    b = [s(logits) for _ in range(2)]
    assert torch.equal(a[0], a[1]) and torch.equal(a[0], b[0])
    assert not all(torch.equal(b[0], s(logits)) for _ in range(5))


@pytest.mark.parametrize(
    "kw, word",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_invalid_values_refused_with_reason(kw, word):
    with pytest.raises(ValueError, match=word):
        SamplingParams(**kw)
