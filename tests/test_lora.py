"""LoRA proofs: unchanged outputs before training (B = 0), trainable count = Σ r·(in + out), frozen
weights bit-identical after training, merged logits = base + adapter logits, PEFT applied to the
transformers-loaded base gives our logits (1e-4), adapters for another base are clear errors, the
`tiaoyu lora` / `lora merge` / `chat --adapter` CLI, exact resume — and, slow, that LoRA reaches most
of full SFT's answer-accuracy gain with a small share of trainable parameters."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tiaoyu_cli.checkpoint import load_model, load_tokenizer, save_model_files
from tiaoyu_cli.data.chat import ChatDataset, pack_examples
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.model import ModelConfig, Transformer
from tiaoyu_cli.model import lora as L
from tiaoyu_cli.train.engine.trainer import TrainConfig, Trainer
from tiaoyu_cli.train.objectives.sft import SFTConfig, SFTStage, count_parameters


CFG = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64)


def tiny(vocab: int = 96, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab, **{**CFG, **kw})).eval()


def randomize_lora(model, seed=1, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in L.lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * scale)


def lora_formula(cfg: ModelConfig, r: int, targets: list[str]) -> int:
    d, f, hd = cfg.dim, cfg.ffn_dim, cfg.head_dim
    shapes = {"q": (d, cfg.n_heads * hd), "k": (d, cfg.n_kv_heads * hd), "v": (d, cfg.n_kv_heads * hd),
              "o": (cfg.n_heads * hd, d), "gate": (d, f), "up": (d, f), "down": (f, d)}
    per_layer = sum(r * (i + o) for t, (i, o) in shapes.items() if t in targets)
    return cfg.n_layers * per_layer  # dense model


@pytest.mark.parametrize("targets", [["q", "k", "v", "o", "gate", "up", "down"], ["q", "v"], ["down"]])
def test_unchanged_before_training_and_count(targets):
    model = tiny()
    x = torch.randint(8, 96, (3, 20))
    with torch.no_grad():
        ref = model(x).logits.clone()
    names = L.apply_lora(model, L.LoraConfig(rank=4, alpha=8, dropout=0.1, targets=targets))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)  # B = 0: bit-identical outputs
    trainable, total = count_parameters(model)
    assert trainable == L.lora_parameter_count(model) == lora_formula(model.config, 4, targets)
    assert len(names) == 2 * len(targets)
    print(f"LoRA r=4 on {','.join(targets)}: trainable {trainable:,} of {total:,} ({trainable / total:.2%})")
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())


def test_moe_targets_expert_layers():
    model = tiny(n_experts=2, n_experts_per_tok=1)
    names = L.apply_lora(model, L.LoraConfig(rank=2, targets=["gate", "down"]))
    assert sorted({n.rsplit(".", 1)[1] for n in names}) == ["w1", "w2"]  # router "gate" untouched
    assert len(names) == 2 * 2 * 2  # layers × experts × targets
    with pytest.raises(TiaoyuError, match="unknown layer 'qq'"):
        L.LoraConfig(targets=["qq"]).validate()


def test_merge_equals_base_plus_adapter():
    model = tiny()
    L.apply_lora(model, L.LoraConfig(rank=4, alpha=8, dropout=0.0))
    randomize_lora(model)
    x = torch.randint(8, 96, (2, 24))
    with torch.no_grad():
        adapted = model(x).logits.clone()
        sd = L.merged_state_dict(model)
        L.merge_lora(model)
        merged = model(x).logits
    assert not L.lora_modules(model)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    assert set(sd) == set(model.state_dict())
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    plain = tiny()
    with torch.no_grad():
        assert not torch.allclose(plain(x).logits, merged, atol=1e-3)  # the adapter did change something


def test_training_touches_only_lora(tmp_path, tok_dir):
    from tiaoyu_cli.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_dir)
    model = tiny(vocab=tok.vocab_size)
    L.apply_lora(model, L.LoraConfig(rank=4, alpha=8))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    recs = [{"messages": [{"role": "user", "content": f"{i}+{i}?"}, {"role": "assistant", "content": str(2 * i)}]}
            for i in range(16)]
    stage = SFTStage(ChatDataset(recs, tok, 64).examples, SFTConfig(max_len=64, eval_samples=0), batch_size=8,
                     save_as="adapter", lora_cfg=L.LoraConfig(rank=4, alpha=8), base_info={})
    Trainer(model.train(), stage, TrainConfig(out=str(tmp_path / "a"), max_steps=3, batch_size=8, lr=1e-2,
                                              warmup_steps=0, log_every=100, device="cpu", dtype="fp32"),
            tokenizer=tok, log=lambda m: None).fit()
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n  # frozen: bit-identical
    step = tmp_path / "a" / "latest"
    assert (step / "adapter_model.safetensors").exists() and not (step / "model.safetensors").exists()


def save_base(folder: Path, model: Transformer, tok) -> Path:
    folder.mkdir(parents=True)
    save_model_files(folder, model, tok)
    return folder


def test_peft_parity(tmp_path, tok_dir):
    """Our adapter files, applied by PEFT to transformers' LlamaForCausalLM, give our logits."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from tiaoyu_cli.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_dir)
    model = tiny(vocab=tok.vocab_size, seed=3)
    base = save_base(tmp_path / "base", model, tok)
    cfg = L.LoraConfig(rank=4, alpha=12, dropout=0.05, targets=["q", "k", "v", "o", "gate", "up", "down"])
    L.apply_lora(model, cfg)
    randomize_lora(model, seed=5, scale=0.3)
    adir = tmp_path / "adapter"
    L.save_adapter(adir, model, cfg, L.base_info(model.config, tok, base))
    keys = set(__import__("safetensors.torch", fromlist=["load_file"]).load_file(str(adir / L.ADAPTER_WEIGHTS)))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    pc = json.loads((adir / L.ADAPTER_CONFIG).read_text())
    assert (pc["peft_type"], pc["r"], pc["lora_alpha"], pc["bias"], pc["task_type"]) == ("LORA", 4, 12, "none", "CAUSAL_LM")
    assert pc["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf, str(adir)).eval()
    x = torch.randint(8, tok.vocab_size, (2, 30))
    model.eval()
    with torch.no_grad():
        ours = model(x).logits
        theirs = pm(input_ids=x).logits
        base_logits = hf.get_base_model()(input_ids=x).logits if hasattr(hf, "get_base_model") else None
    torch.testing.assert_close(theirs.float(), ours, atol=1e-4, rtol=1e-4)
    diff = (ours - load_model(base)[0].eval()(x).logits).abs().max().item()
    assert diff > 1e-2  # the adapter really moves the logits, so the comparison means something
    del base_logits


def test_adapter_for_another_base_is_an_error(tmp_path, tok_dir):
    from tiaoyu_cli.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_dir)
    model = tiny(vocab=tok.vocab_size)
    base = save_base(tmp_path / "base", model, tok)
    cfg = L.LoraConfig(rank=2)
    L.apply_lora(model, cfg)
    adir = tmp_path / "ad"
    L.save_adapter(adir, model, cfg, L.base_info(model.config, tok, base))
    # other architecture
    other = tiny(vocab=tok.vocab_size, n_layers=3)
    with pytest.raises(TiaoyuError, match="another architecture.*n_layers 2 ≠ 3"):
        L.load_adapter(other, adir, tokenizer=tok, base_dir=None)
    # other tokenizer
    info = json.loads((adir / L.BASE_INFO).read_text())
    info["tokenizer_fingerprint"] = "0123456789abcdef"
    (adir / L.BASE_INFO).write_text(json.dumps(info))
    with pytest.raises(TiaoyuError, match="tokenizer 0123456789abcdef"):
        L.load_adapter(tiny(vocab=tok.vocab_size), adir, tokenizer=tok)
    # no fingerprint file (e.g. an adapter from elsewhere): shapes still checked
    (adir / L.BASE_INFO).unlink()
    with pytest.raises(TiaoyuError, match="has shape"):
        L.load_adapter(tiny(vocab=tok.vocab_size, dim=64, n_heads=4), adir, tokenizer=tok)
    # same architecture, other weights: a warning, not an error
    L.save_adapter(adir, model, cfg, L.base_info(model.config, tok, base))
    base2 = save_base(tmp_path / "base2", tiny(vocab=tok.vocab_size, seed=9), tok)
    _, warnings = L.load_adapter(load_model(base2)[0], adir, tokenizer=tok, base_dir=base2)
    assert warnings and "other weights" in warnings[0]


def test_resume_is_exact(tmp_path, tok_dir):
    """LoRA runs (adapter-only checkpoints and sft's merged ones) resume to the same weights."""
    from tiaoyu_cli.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_dir)
    recs = [{"messages": [{"role": "user", "content": f"{i} times 3?"}, {"role": "assistant", "content": str(3 * i)}]}
            for i in range(20)]
    rows = ChatDataset(recs, tok, 64).examples

    def run(out, steps, save_as, resume=False):
        model = tiny(vocab=tok.vocab_size)
        cfg = L.LoraConfig(rank=4, alpha=8, dropout=0.1)
        torch.manual_seed(0)
        L.apply_lora(model, cfg)
        stage = SFTStage(rows, SFTConfig(max_len=64, eval_samples=0), batch_size=4, save_as=save_as,
                         lora_cfg=cfg, base_info={})
        tr = Trainer(model.train(), stage, TrainConfig(out=str(out), max_steps=steps, batch_size=4, lr=5e-3,
                                                       warmup_steps=2, log_every=1, device="cpu", dtype="fp32",
                                                       resume=resume), tokenizer=tok, log=lambda m: None)
        tr.fit()
        return L.lora_state_dict(model), [h["loss"] for h in tr.history if "loss" in h]

    for save_as in ("adapter", "merged"):
        full, losses = run(tmp_path / f"{save_as}-full", 6, save_as)
        run(tmp_path / f"{save_as}-cut", 3, save_as)
        resumed, losses2 = run(tmp_path / f"{save_as}-cut", 6, save_as, resume=True)
        assert all(torch.equal(full[k], resumed[k]) for k in full), save_as
        assert losses[3:] == losses2


# ---- CLI -------------------------------------------------------------------------------------------

def test_cli_lora_merge_and_chat_adapter(cli, tmp_path, base_ckpt, synth_dir):
    out = tmp_path / "adapter"
    r = cli("lora", base_ckpt, synth_dir / "chat.val.jsonl", "-o", out, "--max-steps", 3, "--batch-size", 8,
            "--rank", 4, "--alpha", 8, "--targets", "q,v,down", "--lr", 5e-2, "--no-eval-before")
    assert r.returncode == 0, r.stderr
    assert "trainable" in r.stderr
    for f in ("adapter_model.safetensors", "adapter_config.json", "tiaoyu_base.json"):
        assert (out / f).exists() and (out / "latest" / f).exists()
    assert json.loads((out / "latest" / "trainer.json").read_text())["stage"] == "lora"
    from typer.testing import CliRunner

    from tiaoyu_cli.cli.main import app

    h = CliRunner().invoke(app, ["lora", "train", "--help"])  # the explicit subcommand exists too
    assert h.exit_code == 0 and "--rank" in h.output
    merged = tmp_path / "merged"
    r = cli("lora", "merge", base_ckpt, out, "-o", merged)
    assert r.returncode == 0, r.stderr
    base_model = load_model(base_ckpt)[0].eval()
    tok = load_tokenizer(base_ckpt)
    L.load_adapter(base_model, out, tokenizer=tok, base_dir=base_ckpt)
    x = torch.tensor([tok.encode_chat([{"role": "user", "content": "What is 3 + 4?"}], True)[0]])
    with torch.no_grad():
        torch.testing.assert_close(load_model(merged)[0].eval()(x).logits, base_model(x).logits, atol=1e-5, rtol=1e-5)
    assert cli("lora", "merge", base_ckpt, out, "-o", merged).returncode == 2  # never overwrites
    # chat with the adapter == chat with the merged checkpoint
    a = cli("chat", base_ckpt, "--adapter", out, "--mode", "chat", "--prompt", "What is 3 + 4?", "--temperature", 0,
            "--max-new-tokens", 8)
    b = cli("chat", merged, "--prompt", "What is 3 + 4?", "--temperature", 0, "--max-new-tokens", 8)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and a.stdout.endswith("\n")
    # an adapter on a base it does not fit
    other = tmp_path / "other"
    save_base(other, Transformer(load_model(base_ckpt)[0].config.replace(n_layers=2)), tok)
    r = cli("lora", "merge", other, out, "-o", tmp_path / "m2")
    assert r.returncode == 2 and "another architecture" in r.stderr and "Traceback" not in r.stderr


# ---- it learns ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_lora_reaches_most_of_full_sft_gain(tmp_path, base_ckpt, synth_dir):
    """Full SFT vs LoRA (r=8 on q,k,v,o,gate,up,down) on the same data and steps. Measured before and after:
    greedy answer accuracy on chat.val (facts seen only in pretraining) and on questions about train facts,
    and the loss on the answer tokens of chat.val (its closing <|im_end|> apart: see the README)."""
    import torch.nn.functional as F

    from tiaoyu_cli.data.chat import collate
    from tiaoyu_cli.train.rl.answers import answer_accuracy
    from tiaoyu_cli.train.objectives.sft import lm_forward, select_trainable

    tok = load_tokenizer(base_ckpt)
    ds = ChatDataset(synth_dir / "chat.train.jsonl", tok, 128)
    rows = pack_examples(ds.examples, 128)
    ev = ChatDataset(synth_dir / "chat.val.jsonl", tok, 128)
    val = [{"messages": m} for m in ev.messages][:100]
    seen = [{"messages": m} for m in ds.messages if len(m) == 2][:100]
    evb = collate(ev.examples)
    steps = int(os.environ.get("TIAOYU_TEST_SFT_STEPS", "100"))

    @torch.no_grad()
    def measure(model):
        model.eval()
        logits = lm_forward(model, evb).logits
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), evb["labels"].reshape(-1), reduction="none",
                              ignore_index=-100).reshape(evb["labels"].shape)
        content = (evb["labels"] != -100) & (evb["labels"] != tok.im_end_id)
        return (answer_accuracy(model, tok, val, max_new_tokens=8).accuracy,
                answer_accuracy(model, tok, seen, max_new_tokens=8).accuracy, float(nll[content].mean()))

    res = {}
    for method, lr in (("full", 3e-3), ("lora", 5e-3)):
        torch.manual_seed(0)
        model, _ = load_model(base_ckpt)
        if method == "lora":
            L.apply_lora(model, L.LoraConfig(rank=8, alpha=16, dropout=0.0))
        else:
            select_trainable(model, "full")
        trainable, total = count_parameters(model)
        before = measure(model)
        stage = SFTStage(rows, SFTConfig(max_len=128, eval_samples=0), batch_size=8)
        Trainer(model.train(), stage, TrainConfig(out=str(tmp_path / method), max_steps=steps, batch_size=8, lr=lr,
                                                  warmup_steps=10, weight_decay=0.0, log_every=1000, device="cpu",
                                                  dtype="fp32"), tokenizer=tok, log=lambda m: None).fit()
        res[method] = (before, measure(model), trainable / total)
    for m, (b, a, share) in res.items():
        print(f"{m}: val acc {b[0]:.2f} → {a[0]:.2f}, train-fact acc {b[1]:.2f} → {a[1]:.2f}, "
              f"val answer-token loss {b[2]:.2f} → {a[2]:.2f}, trainable {share:.1%}")
    (fb, fa, fshare), (lb, la, lshare) = res["full"], res["lora"]
    assert fb[:2] == lb[:2] and max(fb[:2]) <= 0.02  # the base cannot answer in the chat template
    full_acc_gain, lora_acc_gain = fa[0] + fa[1] - fb[0] - fb[1], la[0] + la[1] - lb[0] - lb[1]
    assert full_acc_gain >= 0.04  # at least 8 of the 200 questions
    assert lora_acc_gain >= 0.5 * full_acc_gain  # most of the accuracy gain …
    assert (lb[2] - la[2]) >= 0.8 * (fb[2] - fa[2])  # … and of the answer-loss drop
    assert lshare < 0.1 and fshare == 1.0  # … with a small share of trainable parameters
