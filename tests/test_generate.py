"""Generation proofs: the KV cache (and the one-token decode step) change nothing, batching with
left padding changes nothing, sampling functions match hand-computed cases, seeds reproduce,
log-probs match a forward pass, and text streams correctly across multi-byte characters."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tiaoyu_cli.infer.generate import (IncrementalDecoder, decode_response, fit_to_context, generate,
                                       generate_detailed, stream)
from tiaoyu_cli.infer.sampling import (SamplingParams, apply_repetition_penalty, apply_temperature, choose,
                                       make_generator, process_logits, top_k_filter, top_p_filter)
from tiaoyu_cli.model import ModelConfig, Transformer


V = 120
BASE = dict(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=48)
VARIANTS = [{}, {"position": "learned"}, {"position": "sinusoidal", "tie_embeddings": False},
            {"n_experts": 4, "n_experts_per_tok": 2}, {"n_kv_heads": 1}, {"n_kv_heads": 4}]


def make(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(**{**BASE, **kw})).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if not n.endswith("norm.weight"):
                p.normal_(0.0, 0.25)  # spread-out logits: greedy choices are not near-ties
    return m


PROMPTS = [[2, 10, 11, 12, 13], [2, 40], [2, 50, 60, 70, 80, 90, 100, 9], [2, 33, 34]]


@pytest.mark.parametrize("kw", VARIANTS)
def test_kv_cache_equals_recompute_greedy(kw):
    m = make(**kw)
    stops = [3, 5]
    cached = generate(m, PROMPTS, 16, temperature=0, stop_ids=stops)
    recomputed = generate(m, PROMPTS, 16, temperature=0, stop_ids=stops, use_cache=False)
    via_forward = generate_detailed(m, PROMPTS, 16, SamplingParams(0), stops, fast_decode=False).tokens
    one_by_one = [generate(m, [p], 16, temperature=0, stop_ids=stops)[0] for p in PROMPTS]
    assert cached == recomputed == via_forward == one_by_one
    assert len({tuple(t) for t in cached}) > 1  # the rows really differ
    assert all(len(t) == 16 or t[-1] in stops for t in cached)


def test_decode_step_logits_equal_full_forward():
    """The logits behind every step, not only the argmax: cached decode vs a full forward pass."""
    m = make()
    res = generate_detailed(m, PROMPTS, 12, SamplingParams(0), stop_ids=[], logprobs="model")
    for p, toks, lps in zip(res.prompts, res.tokens, res.logprobs):
        seq = torch.tensor([p + toks])
        with torch.no_grad():
            logp = m(seq).logits[0].log_softmax(-1)
        want = [logp[len(p) - 1 + i, t].item() for i, t in enumerate(toks)]
        assert max(abs(a - b) for a, b in zip(lps, want)) < 1e-4


def test_sampled_tokens_same_with_and_without_cache():
    m = make()
    params = SamplingParams(temperature=1.0, top_k=40, top_p=0.95, repetition_penalty=1.2)
    a = generate_detailed(m, PROMPTS, 20, params, stop_ids=[], seed=7)
    b = generate_detailed(m, PROMPTS, 20, params, stop_ids=[], seed=7, use_cache=False)
    assert a.tokens == b.tokens


def test_seed_determinism():
    m = make()
    params = SamplingParams(temperature=1.0)
    a = generate(m, PROMPTS, 20, params, stop_ids=[], seed=123)
    b = generate(m, PROMPTS, 20, params, stop_ids=[], seed=123)
    c = generate(m, PROMPTS, 20, params, stop_ids=[], seed=124)
    assert a == b
    assert a != c
    assert generate(m, PROMPTS, 20, params, stop_ids=[], seed=123, temperature=0) != a  # sampling really samples


def test_stop_tokens_and_finish_reasons():
    m = make()
    free = generate_detailed(m, PROMPTS, 10, SamplingParams(0), stop_ids=[])
    assert free.finish_reasons == ["length"] * 4 and all(len(t) == 10 for t in free.tokens)
    stop = free.tokens[0][3]  # make row 0's 4th token a stop token
    res = generate_detailed(m, PROMPTS, 10, SamplingParams(0), stop_ids=[stop])
    assert res.tokens[0] == free.tokens[0][:4] and res.finish_reasons[0] == "stop"
    for t, f, r in zip(res.tokens, free.tokens, res.finish_reasons):
        k = f.index(stop) + 1 if stop in f else len(f)
        assert t == f[:k]  # other rows go on unchanged while row 0 is dropped from the batch
        assert r == ("stop" if stop in f else "length")


def test_fit_to_context_truncates_left_and_clamps():
    prompts, n_new, cut = fit_to_context([list(range(100)), [1, 2, 3]], max_new_tokens=10, context=48)
    assert prompts[0] == list(range(100))[-38:] and prompts[1] == [1, 2, 3]
    assert n_new == 10 and cut == [True, False]
    prompts, n_new, _ = fit_to_context([list(range(100))], max_new_tokens=1000, context=48)
    assert len(prompts[0]) == 24 and n_new == 24  # at least half the context stays for the prompt
    m = make()
    res = generate_detailed(m, [list(range(3, 103))], 1000, SamplingParams(0), stop_ids=[])
    assert len(res.prompts[0]) + len(res.tokens[0]) == BASE["max_seq_len"] and res.truncated == [True]
    with pytest.raises(Exception):
        fit_to_context([[]], 4, 48)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(m, [[2, V + 5]], 4)


def test_logprobs_sampling_mode_is_a_distribution():
    m = make()
    res = generate_detailed(m, PROMPTS[:1], 30, SamplingParams(temperature=0.5, top_k=5), stop_ids=[], seed=0,
                            logprobs="sampling")
    assert all(lp <= 0 for lp in res.logprobs[0]) and len(res.logprobs[0]) == 30
    model = generate_detailed(m, PROMPTS[:1], 30, SamplingParams(temperature=0.5, top_k=5), stop_ids=[], seed=0,
                              logprobs="model")
    assert model.tokens == res.tokens
    assert sum(res.logprobs[0]) > sum(model.logprobs[0])  # T=0.5 and top-k sharpen the sampled distribution


def test_stream_callback_sees_every_token():
    m = make()
    seen: dict[int, list[int]] = {}
    toks = generate(m, PROMPTS, 8, temperature=0, stop_ids=[3], stream_callback=lambda r, t: seen.setdefault(r, []).append(t))
    assert [seen[i] for i in range(len(PROMPTS))] == toks


# ---- sampling functions --------------------------------------------------------------------------

def test_repetition_penalty_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, -3.0]]  # positive ÷ 2, negative × 2, unseen untouched
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_temperature_top_k_top_p_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert apply_temperature(logits, 0.5).tolist() == [[2.0, 6.0, 4.0, 0.0]]
    k2 = top_k_filter(logits, 2)
    assert k2[0, 1] == 3.0 and k2[0, 2] == 2.0 and torch.isinf(k2[0, [0, 3]]).all()
    assert torch.equal(top_k_filter(logits, 0), logits)
    # probabilities of [1, 3, 2, 0]: 0.0871, 0.6439, 0.2369, 0.0321
    p = logits.softmax(-1)[0]
    assert p[1] == pytest.approx(0.6439, abs=1e-4)
    kept = lambda x: (~torch.isinf(x[0])).nonzero().flatten().tolist()  # noqa: E731
    assert kept(top_p_filter(logits, 0.5)) == [1]  # top token alone has 0.64 ≥ 0.5
    assert kept(top_p_filter(logits, 0.7)) == [1, 2]  # 0.64 < 0.7 → add 0.24
    assert kept(top_p_filter(logits, 0.9)) == [0, 1, 2]  # 0.88 < 0.9 → add 0.087
    assert kept(top_p_filter(logits, 1.0)) == [0, 1, 2, 3]
    assert kept(top_p_filter(logits, 1e-6)) == [1]  # never empty


def test_greedy_and_sampling_frequencies():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert choose(process_logits(logits, SamplingParams(0.0)), SamplingParams(0.0)).item() == 1
    params = SamplingParams(temperature=1.0, top_k=2)
    g = make_generator(0)
    draws = torch.cat([choose(process_logits(logits, params), params, g) for _ in range(4000)])
    assert set(draws.tolist()) == {1, 2}
    want = math.exp(3) / (math.exp(3) + math.exp(2))  # 0.731 after top-2 renormalisation
    assert (draws == 1).float().mean().item() == pytest.approx(want, abs=0.03)
    seen = torch.tensor([[False, True, False, False]])  # penalise token 1: 3/10 = 0.3 < 2 → greedy picks 2
    assert choose(process_logits(logits, SamplingParams(0.0, repetition_penalty=10.0), seen),
                  SamplingParams(0.0)).item() == 2


def test_sampling_params_validation():
    for bad in (dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5), dict(repetition_penalty=0)):
        with pytest.raises(Exception):
            SamplingParams(**bad)


# ---- text: incremental decoding and the reasoning split ----------------------------------------------

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tiaoyu_cli.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("gen_tok")
    rng = random.Random(0)
    words = "the cat dog sees runs big small tree house water".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(300)]
    (d / "t.jsonl").write_text("".join('{"text": "%s"}\n' % s for s in lines))
    return train_tokenizer([str(d / "t.jsonl")], d / "tok", vocab_size=300)


def test_incremental_decoder_handles_multibyte(tok):
    text = "the cat 你好 sees 😀 water"
    ids = tok.encode(text)
    assert any(tok.is_byte(i) for i in ids)  # unseen characters arrive as several byte tokens
    dec = IncrementalDecoder(tok)
    pieces = []
    for i in ids:
        for p in dec.push(i):
            assert "\ufffd" not in p.text  # never half a character
            pieces.append(p.text)
    pieces += [p.text for p in dec.flush()]
    assert "".join(pieces) == text
    assert len(pieces) > 3


def test_incremental_decoder_reasoning_segments(tok):
    think, answer = tok.encode("the dog runs"), tok.encode("big tree")
    dec = IncrementalDecoder(tok)
    out = []
    for i in [6] + think + [7] + answer + [5]:
        out += dec.push(i)
    out += dec.flush()
    assert "".join(p.text for p in out if p.reasoning) == "the dog runs"
    assert "".join(p.text for p in out if not p.reasoning) == "big tree"


def test_decode_response_split(tok):
    think, answer = tok.encode("the dog runs"), tok.encode("big tree")
    d = decode_response(tok, [6] + think + [7] + answer + [5])
    assert (d.response, d.reasoning, d.answer) == ("<think>the dog runs</think>big tree", "the dog runs", "big tree")
    d = decode_response(tok, answer + [3])
    assert (d.response, d.reasoning, d.answer) == ("big tree", None, None)
    d = decode_response(tok, think + [7] + answer)  # the prompt opened <think>
    assert (d.reasoning, d.answer) == ("the dog runs", "big tree")
    d = decode_response(tok, [6] + think)  # cut off while thinking
    assert (d.response, d.reasoning, d.answer) == ("<think>the dog runs", "the dog runs", "")


def test_stream_pieces_join_to_generated_text(tok):
    m = make(vocab_size=tok.vocab_size)
    prompt = tok.encode("the cat", bos=True)
    toks = generate(m, [prompt], 30, temperature=0, stop_ids=[3, 5])[0]
    got: list[int] = []
    text = "".join(p.text for p in stream(m, tok, prompt, 30, SamplingParams(0), tokens_out=got))
    assert got == toks
    assert text == decode_response(tok, toks).answer or text == tok.decode(toks)
