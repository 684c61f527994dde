"""SFT proofs: the loss mask token by token (multi-turn, packed), packing computes what the records
compute alone, frozen parameters stay bit-identical and trainable counts match the formulas, bad
records are clear errors (or counted with skip_bad), the answer checker, and — slow — forgetting
control: with replay the base val loss rises less than without."""

from __future__ import annotations

import json

import pytest
import torch

from tiaoyu_cli.data.chat import ChatDataset, Example, collate, encode_example, pack_examples, shifted_labels
from tiaoyu_cli.errors import DataError, TiaoyuError
from tiaoyu_cli.model import ModelConfig, Transformer
from tiaoyu_cli.train.engine.trainer import TrainConfig, Trainer
from tiaoyu_cli.train.losses.lm import cross_entropy as sft_loss
from tiaoyu_cli.train.objectives.sft import SFTConfig, SFTStage, count_parameters, lm_forward, select_trainable
from tiaoyu_cli.train.rl import answers as A


@pytest.fixture(scope="module")
def tok(tok_dir):
    from tiaoyu_cli.tokenizer import Tokenizer

    return Tokenizer.load(tok_dir)


MULTI = {"messages": [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 3 + 4?"},
    {"role": "assistant", "content": "7"},
    {"role": "user", "content": "王丽最喜欢什么颜色？"},
    {"role": "assistant", "content": "红色", "reasoning": "王丽 likes 红色."},
]}


def learned_text(tok, ids, labels) -> str:
    """The tokens the loss scores (targets where labels ≠ -100), decoded with special tokens shown."""
    return tok.decode([l for l in labels if l != -100], skip_special=False)


def expected_mask(tok, messages) -> tuple[list[int], list[int]]:
    """The spec, message by message: <|im_start|> role\\n [<think> r </think>] content <|im_end|> \\n;
    learned = the assistant's reasoning block, content and <|im_end|>."""
    ids, mask = [], []
    for m in messages:
        head = [tok.im_start_id] + tok.encode(m["role"] + "\n")
        body = []
        if m["role"] == "assistant" and m.get("reasoning"):
            body += [tok.think_id] + tok.encode(m["reasoning"]) + [tok.end_think_id]
        body += tok.encode(m["content"]) + [tok.im_end_id]
        learn = 1 if m["role"] == "assistant" else 0
        ids += head + body + tok.encode("\n")
        mask += [0] * len(head) + [learn] * len(body) + [0] * len(tok.encode("\n"))
    return ids, mask


def test_loss_mask_multi_turn_token_by_token(tok):
    ex, what = encode_example(tok, MULTI["messages"], max_len=512)
    assert what == "ok"
    ids, mask = expected_mask(tok, MULTI["messages"])
    assert ex.ids == ids and ex.loss_mask == mask
    b = collate([ex])
    labels = b["labels"][0].tolist()
    for t in range(len(ids)):  # position t predicts token t+1 exactly when t+1 is an assistant token
        want = ids[t + 1] if t + 1 < len(ids) and mask[t + 1] else -100
        assert labels[t] == want, t
    assert learned_text(tok, ids, labels) == "7<|im_end|><think>王丽 likes 红色.</think>红色<|im_end|>"
    # nothing of the system prompt, the user turns or the headers is learned
    assert "Answer briefly" not in learned_text(tok, ids, labels)
    assert sum(l != -100 for l in labels) == sum(mask)


def test_loss_mask_with_packing(tok):
    recs = [MULTI["messages"],
            [{"role": "user", "content": "What colour is Ranay?"}, {"role": "assistant", "content": "grey"}],
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]]
    exs = [encode_example(tok, m, 512)[0] for m in recs]
    rows = pack_examples(exs, max_len=sum(len(e) for e in exs))  # room for all three: one row
    assert len(rows) == 1
    row = rows[0]
    b = collate(rows)
    labels = b["labels"][0].tolist()
    # each record's slice of the packed row carries exactly its own unpacked labels (last position: -100)
    start = 0
    for s in range(3):
        n = row.seq_ids.count(s)
        ex = next(e for e in exs if e.ids == row.ids[start:start + n])
        assert labels[start:start + n] == shifted_labels(ex.ids, ex.loss_mask)
        assert labels[start + n - 1] == -100  # never predicts the next record's first token
        assert row.position_ids[start:start + n] == list(range(n))
        start += n
    want = sorted(learned_text(tok, e.ids, shifted_labels(e.ids, e.loss_mask)) for e in exs)
    got = []
    start = 0
    for s in range(3):
        n = row.seq_ids.count(s)
        got.append(learned_text(tok, row.ids[start:start + n], labels[start:start + n]))
        start += n
    assert sorted(got) == want
    assert "grey<|im_end|>" in want and "Hello!<|im_end|>4<|im_end|>" in want


def test_packing_keeps_every_example_once_and_fits():
    exs = [Example(list(range(8, 8 + n)), [0] * (n - 1) + [1]) for n in (5, 17, 3, 30, 12, 9, 1 + 1, 25, 7)]
    rows = pack_examples(exs, max_len=32, seed=3)
    assert all(len(r) <= 32 for r in rows)
    assert sorted(len(e) for e in exs) == sorted(r.seq_ids.count(s) for r in rows for s in set(r.seq_ids))
    assert sum(len(r) for r in rows) == sum(len(e) for e in exs)
    assert len(rows) < len(exs)
    with pytest.raises(TiaoyuError, match="does not fit"):
        pack_examples([Example([8] * 40, [1] * 40, "f:1")], max_len=32)


@pytest.mark.parametrize("kw", [{}, {"position": "learned"}, {"n_experts": 4, "n_experts_per_tok": 2}])
def test_packed_forward_equals_records_alone(kw):
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                                max_seq_len=64, **kw)).eval()
    g = torch.Generator().manual_seed(1)
    exs = [Example(torch.randint(8, 64, (n,), generator=g).tolist(), [1] * n) for n in (7, 12, 5, 9)]
    rows = pack_examples(exs, max_len=40, seed=None)
    b = collate(rows)
    with torch.no_grad():
        packed = m(b["input_ids"], position_ids=b["position_ids"], seq_ids=b["seq_ids"]).logits
        naive = m(b["input_ids"]).logits  # attention across records, positions running on
        for r, row in enumerate(rows):
            start = 0
            for s in sorted(set(row.seq_ids)):
                n = row.seq_ids.count(s)
                alone = m(torch.tensor([row.ids[start:start + n]])).logits[0]
                torch.testing.assert_close(packed[r, start:start + n], alone, atol=1e-5, rtol=1e-5)
                start += n
        assert any(len(set(r.seq_ids)) > 1 for r in rows)
        assert not torch.allclose(packed, naive, atol=1e-3)  # the block mask is what makes them equal


def test_unpacked_right_padding_changes_nothing(tok):
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                ffn_dim=48, max_seq_len=128)).eval()
    a = encode_example(tok, MULTI["messages"], 128)[0]
    c = encode_example(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], 128)[0]
    b = collate([a, c])
    with torch.no_grad():
        both = lm_forward(m, b).logits
        alone = m(torch.tensor([c.ids])).logits
    torch.testing.assert_close(both[1, :len(c)], alone[0], atol=1e-5, rtol=1e-5)
    assert int((b["labels"][1, len(c):] != -100).sum()) == 0


# ---- bad input ---------------------------------------------------------------------------------------

BAD = [
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     "messages[0].role", "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]},
     "messages[0].content", "empty content"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
     "messages[1].content", "expected a string"),
    ({"text": "x", "label": "pos"}, "messages", "classification record"),
    ({"messages": "hello"}, "messages", "non-empty list"),
]


@pytest.mark.parametrize("rec,field,msg", BAD)
def test_bad_records_name_file_line_field(tmp_path, tok, rec, field, msg):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    p = tmp_path / "chat.jsonl"
    p.write_text(json.dumps(good) + "\n" + json.dumps(rec, ensure_ascii=False) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(DataError) as e:
        ChatDataset(p, tok, 64)
    assert f"{p}:2" in str(e.value) and f"field '{field}'" in str(e.value) and msg in str(e.value)
    ds = ChatDataset(p, tok, 64, skip_bad=True)
    assert len(ds) == 2 and ds.stats.bad == 1 and "1 bad records skipped" in ds.stats.summary()


def test_malformed_json_and_all_bad(tmp_path, tok):
    p = tmp_path / "c.jsonl"
    p.write_text('{"messages": [\n')
    with pytest.raises(DataError, match=r"c.jsonl:1"):
        ChatDataset(p, tok, 64)
    with pytest.raises(TiaoyuError, match="no valid chat records"):
        ChatDataset(p, tok, 64, skip_bad=True)


def test_overflow_truncate_and_skip(tok):
    long = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 80}]
    only_prompt_fits = [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "a"}]
    short = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    recs = [{"messages": m} for m in (long, only_prompt_fits, short)]
    t = ChatDataset(recs, tok, 32, overflow="truncate")
    assert (t.stats.kept, t.stats.truncated, t.stats.skipped_overflow) == (2, 1, 1)
    assert all(len(e) <= 32 for e in t.examples)
    s = ChatDataset(recs, tok, 32, overflow="skip")
    assert (s.stats.kept, s.stats.truncated, s.stats.skipped_overflow) == (1, 0, 2)


# ---- what trains -----------------------------------------------------------------------------------

def tiny_model(vocab: int, **kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                                   max_seq_len=128, **kw))


def chat_rows(tok, n=24):
    recs = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": str(2 * i)}]} for i in range(n)]
    return ChatDataset(recs, tok, 64).examples


def train_steps(model, tok, rows, tmp_path, steps=3, prompt=None, name="t"):
    stage = SFTStage(rows, SFTConfig(max_len=64, eval_samples=0), batch_size=8, prompt=prompt)
    cfg = TrainConfig(out=str(tmp_path / name), max_steps=steps, batch_size=8, lr=1e-2, warmup_steps=0,
                      weight_decay=0.1, log_every=100, device="cpu", dtype="fp32")
    Trainer(model, stage, cfg, tokenizer=tok, log=lambda m: None).fit()
    return stage


def formula(cfg: ModelConfig, part: str) -> int:
    d, f, L, hd = cfg.dim, cfg.ffn_dim, cfg.n_layers, cfg.head_dim
    attn = L * (d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2)  # q, o + k, v
    ffn = L * 3 * d * f
    emb = cfg.vocab_size * d
    head = d + (emb if cfg.tie_embeddings else cfg.vocab_size * d)  # final norm + output matrix
    return {"attn": attn, "ffn": ffn, "embeddings": emb, "head": head}[part]


@pytest.mark.parametrize("part,kw", [("ffn", {}), ("attn", {}), ("embeddings", {}), ("head", {}),
                                     ("head", {"tie_embeddings": False})])
def test_frozen_parameters_bit_identical(tmp_path, tok, part, kw):
    model = tiny_model(tok.vocab_size, **kw)
    names = select_trainable(model, part)
    trainable, total = count_parameters(model)
    assert trainable == formula(model.config, part)
    print(f"--train {part} {kw}: trainable {trainable:,} of {total:,} ({trainable / total:.1%})")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, tok, chat_rows(tok), tmp_path)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    frozen = set(before) - set(names)
    assert frozen and not (changed & frozen)  # bit-identical
    assert changed <= set(names)
    assert any(n in changed for n in names if n.endswith("weight") and before[n].ndim == 2)


def test_adapter_and_prompt_methods_train_only_their_weights(tmp_path, tok):
    from tiaoyu_cli.model.adapters import SoftPrompt, apply_bottleneck

    model = tiny_model(tok.vocab_size)
    wrapped = apply_bottleneck(model, 4)
    trainable, total = count_parameters(model)
    assert trainable == len(wrapped) * 2 * 4 * model.config.dim == 2 * 2 * 2 * 4 * 32  # 2 layers × (o, down)
    x = torch.randint(8, tok.vocab_size, (2, 10))
    ref = tiny_model(tok.vocab_size)
    torch.testing.assert_close(model(x).logits, ref(x).logits)  # zero-init up projection: unchanged at start
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_steps(model, tok, chat_rows(tok), tmp_path, name="ad")
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)

    model = tiny_model(tok.vocab_size)
    for p in model.parameters():
        p.requires_grad_(False)
    prompt = SoftPrompt(5, 32, init_from=model.model.embed_tokens.weight)
    assert count_parameters(model, prompt) == (5 * 32, sum(p.numel() for p in model.parameters()) + 5 * 32)
    snap = {n: p.detach().clone() for n, p in model.named_parameters()}
    p0 = prompt.prompt_embeddings.detach().clone()
    stage = train_steps(model, tok, chat_rows(tok), tmp_path, prompt=prompt, name="pr")
    assert all(torch.equal(p, snap[n]) for n, p in model.named_parameters())
    assert not torch.equal(stage.trainer.extras["soft_prompt"].prompt_embeddings, p0)
    saved = tmp_path / "pr" / "latest"
    assert (saved / "sft_extras.safetensors").exists() and (saved / "sft_extras.json").exists()


def test_soft_prompt_generation_matches_forward(tok):
    """SoftPromptModel with the KV cache (grown by the prompt) gives the greedy tokens of full recompute."""
    from tiaoyu_cli.infer.generate import generate
    from tiaoyu_cli.model.adapters import SoftPrompt, SoftPromptModel

    model = tiny_model(tok.vocab_size).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not n.endswith("norm.weight"):
                p.normal_(0.0, 0.25)  # spread-out logits: greedy choices are not near-ties
    wrapped = SoftPromptModel(model, SoftPrompt(4, 32, init_from=model.model.embed_tokens.weight, seed=1))
    prompts = [[4, 20, 21, 22], [4, 30], [4, 40, 41, 42, 43, 44]]
    cached = generate(wrapped, prompts, 8, temperature=0, stop_ids=[])
    full = generate(wrapped, prompts, 8, temperature=0, stop_ids=[], use_cache=False)
    plain = generate(model, prompts, 8, temperature=0, stop_ids=[])
    assert cached == full
    assert cached != plain  # the prompt matters


# ---- the answer checker ------------------------------------------------------------------------------

def test_answer_checker():
    assert A.extract_answer("<think>3 + 4 = 7.</think>7") == "7"
    assert A.extract_answer("<think>unfinished") is None
    assert A.normalize(" Red. ") == "red" and A.normalize("“红色”。") == "红色"
    assert A.is_correct("68", "68") and A.is_correct("The answer is 68.", "68")
    assert not A.is_correct("68 or 69", "68") and not A.is_correct("680", "68") and not A.is_correct("", "68")
    assert A.is_correct("<think>5 + 3 = 8.</think>8", "8") and not A.is_correct("<think>8", "8")
    assert A.is_correct("-3", "-3") and not A.is_correct("3", "-3")
    assert A.is_correct("Grey.", "grey") and not A.is_correct("grey cat", "grey") and not A.is_correct("red", "红色")
    assert A.format_ok("<think>a</think>b", require_think=True) and not A.format_ok("b", require_think=True)
    assert A.format_ok("b") and not A.format_ok("<think>a</think>") and not A.format_ok("x<think>a</think>b")
    assert A.split_record({"prompt": "q?", "answer": 5}) == ([{"role": "user", "content": "q?"}], "5")
    with pytest.raises(DataError, match="answer"):
        A.split_record({"prompt": "q?", "answer": None}, "f", 3)


# ---- CLI: bad input, stage record ------------------------------------------------------------------------

def test_cli_errors(cli, tmp_path, base_ckpt, synth_dir, tok_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
                   '{"messages": [{"role": "user", "content": "only a question"}]}\n')
    r = cli("sft", base_ckpt, bad, "-o", tmp_path / "o1", "--max-steps", 1)
    assert r.returncode == 2 and f"{bad}:2" in r.stderr and "no assistant turn" in r.stderr
    assert "Traceback" not in r.stderr
    # --replay shards made with another tokenizer
    from tiaoyu_cli.tokenizer import train_tokenizer
    from tiaoyu_cli.tokenizer.encode import encode_corpus

    other = tmp_path / "tok2"
    train_tokenizer([str(synth_dir / "text.val.jsonl")], other, vocab_size=800)
    encode_corpus([str(synth_dir / "text.val.jsonl")], other, tmp_path / "tokens2", workers=1)
    r = cli("sft", base_ckpt, synth_dir / "chat.val.jsonl", "-o", tmp_path / "o2", "--max-steps", 1,
                "--replay", tmp_path / "tokens2")
    assert r.returncode == 2 and "--replay" in r.stderr and "tokenizer mismatch" in r.stderr
    r = cli("sft", base_ckpt, synth_dir / "chat.val.jsonl", "-o", tmp_path / "o3", "--method", "magic")
    assert r.returncode == 2 and "--method 'magic'" in r.stderr


def test_cli_sft_records_stage_and_counts(cli, tmp_path, base_ckpt, synth_dir):
    out = tmp_path / "sft"
    r = cli("sft", base_ckpt, synth_dir / "chat.val.jsonl", "-o", out, "--max-steps", 2, "--batch-size", 4,
                "--train", "ffn", "--eval-data", synth_dir / "chat.val.jsonl", "--eval-samples", 4,
                "--eval-max-new-tokens", 4, "--pack", "--max-len", 128)
    assert r.returncode == 0, r.stderr
    info = json.loads((out / "latest" / "trainer.json").read_text())
    assert info["stage"] == "sft"
    cfg = ModelConfig.from_hf_dict(json.loads((out / "latest" / "config.json").read_text()))
    assert info["stage_config"]["trainable_params"] == formula(cfg, "ffn")
    assert "trainable" in r.stderr and "%" in r.stderr
    assert "answer_acc" in info["eval"] and "answer_acc" in info["stage_config"]["eval_before"]
    from tiaoyu_cli.checkpoint import load_model

    load_model(out)  # an ordinary checkpoint


# ---- forgetting ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_replay_limits_forgetting(tmp_path, base_ckpt, synth_dir, tokens_dir):
    """Same SFT run with and without replay; base val loss (pretraining val split) rises less with it."""
    from tiaoyu_cli.data.shards import open_tokens
    from tiaoyu_cli.checkpoint import load_model, load_tokenizer

    tok = load_tokenizer(base_ckpt)
    train_sh, val_sh = open_tokens(tokens_dir)
    ds = ChatDataset(synth_dir / "chat.train.jsonl", tok, 128)
    rows = pack_examples(ds.examples, 128)
    res = {}
    for ratio in (0.0, 0.5):
        torch.manual_seed(0)
        model, _ = load_model(base_ckpt)
        stage = SFTStage(rows, SFTConfig(max_len=128, replay_ratio=ratio, eval_samples=0, base_val_windows=16),
                         batch_size=4, replay=train_sh if ratio else None, base_val=val_sh)
        cfg = TrainConfig(out=str(tmp_path / f"r{ratio}"), max_steps=40, batch_size=4, lr=3e-3, warmup_steps=0,
                          weight_decay=0.0, log_every=100, device="cpu", dtype="fp32")
        tr = Trainer(model, stage, cfg, tokenizer=tok, log=lambda m: None)
        model.eval()
        before = stage.evaluate(model)["base_val_loss"]
        model.train()
        after = tr.fit()["base_val_loss"]
        res[ratio] = (before, after)
    (b0, a0), (b1, a1) = res[0.0], res[0.5]
    print(f"base val loss: no replay {b0:.3f} → {a0:.3f}; replay 0.5 {b1:.3f} → {a1:.3f}")
    assert b0 == pytest.approx(b1)
    assert a0 - b0 > 0.05  # fine-tuning alone forgets
    assert a1 - b1 < 0.5 * (a0 - b0)  # replay keeps at least half of that


def test_resume_is_exact_with_packing_and_replay(tmp_path, tok, tokens_dir):
    """Interrupted after 3 steps and resumed = the uninterrupted 6 steps (weights and losses)."""
    from tiaoyu_cli.data.shards import open_tokens

    train_sh, val_sh = open_tokens(tokens_dir)
    rows = pack_examples(chat_rows(tok, 40), 64)

    def run(out, steps, resume=False):
        model = tiny_model(tok.vocab_size)
        stage = SFTStage(rows, SFTConfig(max_len=64, eval_samples=0, replay_ratio=0.25), batch_size=4,
                         replay=train_sh, base_val=val_sh)
        tr = Trainer(model, stage, TrainConfig(out=str(out), max_steps=steps, batch_size=4, lr=5e-3, warmup_steps=2,
                                               log_every=1, device="cpu", dtype="fp32", resume=resume),
                     tokenizer=tok, log=lambda m: None)
        tr.fit()
        return model.state_dict(), [h["loss"] for h in tr.history if "loss" in h]

    full, losses = run(tmp_path / "full", 6)
    run(tmp_path / "cut", 3)
    resumed, losses2 = run(tmp_path / "cut", 6, resume=True)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert losses[3:] == losses2


def test_losses_by_hand():
    """sft_loss: mean −log p(target) over positions with a label; classification_loss: mean over rows."""
    from tiaoyu_cli.train.losses.classify import classification_loss

    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]]])
    labels = torch.tensor([[0, 2, -100]])
    lse0 = torch.log(torch.exp(torch.tensor(2.0)) + 2)
    lse1 = torch.log(torch.exp(torch.tensor(1.0)) + 2)
    want = ((lse0 - 2.0) + (lse1 - 0.0)) / 2
    assert torch.isclose(sft_loss(logits, labels), want)
    scores = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    want = ((torch.log(torch.exp(torch.tensor(1.0)) + torch.exp(torch.tensor(3.0))) - 3.0) + torch.log(torch.tensor(2.0))) / 2
    assert torch.isclose(classification_loss(scores, torch.tensor([1, 0])), want)
