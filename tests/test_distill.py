"""`tiaoyu distill`: KD losses against hand-computed values, temperature, masking, top-k cache,
the white-box stage (chat data and token shards), black-box data path, bad input, learning."""

from __future__ import annotations

import math

import pytest
import torch

from serve_process import chat_questions
from tiaoyu_cli.train.losses.kd import distill_loss, divergence, kd_loss, topk_kd_loss

# teacher p = softmax([0, 0]) = [1/2, 1/2]; student q = softmax([ln 3, 0]) = [3/4, 1/4]
P = [0.5, 0.5]
Q = [0.75, 0.25]
M = [0.625, 0.375]
FORWARD = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(p‖q) = ½ ln(4/3) ≈ 0.14384
REVERSE = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(q‖p) ≈ 0.13081
JSD = 0.5 * (0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375)
             + 0.75 * math.log(0.75 / 0.625) + 0.25 * math.log(0.25 / 0.375))  # ≈ 0.03382


def _pair(temperature: float = 1.0):
    """Logits that give p and q above after dividing by `temperature`."""
    teacher = torch.tensor([[0.0, 0.0]]) * temperature
    student = torch.tensor([[math.log(3.0), 0.0]]) * temperature
    return student, teacher


def test_hand_values_are_what_they_say():
    assert FORWARD == pytest.approx(0.5 * math.log(4 / 3))
    assert FORWARD == pytest.approx(0.143841, abs=1e-6)
    assert REVERSE == pytest.approx(0.130812, abs=1e-6)
    assert JSD == pytest.approx(0.033822, abs=1e-6)


@pytest.mark.parametrize("kind,expected", [("forward", FORWARD), ("reverse", REVERSE), ("jsd", JSD)])
def test_kd_loss_matches_hand_computed(kind, expected):
    s, t = _pair()
    assert float(kd_loss(s, t, temperature=1.0, divergence_kind=kind)) == pytest.approx(expected, rel=1e-5)
    # the divergence itself on probabilities
    d = divergence(torch.tensor(P).log(), torch.tensor(Q).log(), kind)
    assert float(d) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind,expected", [("forward", FORWARD), ("reverse", REVERSE), ("jsd", JSD)])
def test_temperature_divides_logits_and_scales_by_t_squared(kind, expected):
    # logits scaled by T give the same softened distributions, so the loss is T² × the T=1 value
    for T in (2.0, 4.0):
        s, t = _pair(T)
        assert float(kd_loss(s, t, temperature=T, divergence_kind=kind)) == pytest.approx(T * T * expected, rel=1e-5)
    # and on fixed logits a higher temperature softens both distributions (a different value)
    s, t = _pair()
    assert float(kd_loss(s, t, temperature=3.0, divergence_kind=kind)) != pytest.approx(expected, rel=1e-2)


def test_identical_distributions_give_zero_and_jsd_is_bounded():
    z = torch.randn(3, 5, 11)
    for kind in ("forward", "reverse", "jsd"):
        assert float(kd_loss(z, z.clone(), divergence_kind=kind)) == pytest.approx(0.0, abs=1e-6)
    # disjoint one-hot-like distributions: JSD → ln 2, KL is large
    a = torch.tensor([[50.0, -50.0]])
    b = torch.tensor([[-50.0, 50.0]])
    assert float(kd_loss(a, b, divergence_kind="jsd")) == pytest.approx(math.log(2), rel=1e-4)
    assert float(kd_loss(a, b, divergence_kind="forward")) > 50


def test_forward_and_reverse_differ_and_swap():
    torch.manual_seed(0)
    s, t = torch.randn(4, 7), torch.randn(4, 7)
    f = kd_loss(s, t, divergence_kind="forward")
    r = kd_loss(s, t, divergence_kind="reverse")
    assert float(f) != pytest.approx(float(r), rel=1e-3)
    # reverse KL(q‖p) is the forward KL with the roles swapped
    assert float(r) == pytest.approx(float(kd_loss(t, s, divergence_kind="forward")), rel=1e-5)


def test_mask_keeps_only_response_positions():
    torch.manual_seed(0)
    s, t = torch.randn(2, 6, 9), torch.randn(2, 6, 9)
    mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]])
    full = kd_loss(s, t, mask)
    # changing logits at masked-out positions changes nothing
    s2, t2 = s.clone(), t.clone()
    s2[mask == 0] += 10 * torch.randn_like(s2[mask == 0])
    t2[mask == 0] -= 7
    assert float(kd_loss(s2, t2, mask)) == pytest.approx(float(full), rel=1e-6)
    # = the mean over the selected positions (not over the whole batch)
    sel = kd_loss(s[mask == 1], t[mask == 1])
    assert float(full) == pytest.approx(float(sel), rel=1e-6)
    # changing a masked-in position does change it
    s2[0, 2, 0] += 3  # (one logit: adding a constant to all of them would not change the softmax)
    assert float(kd_loss(s2, t2, mask)) != pytest.approx(float(full), rel=1e-4)


def test_distill_loss_mixes_ce_and_kd():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 8)
    y = torch.randint(0, 8, (2, 5))
    y[0, :2] = -100
    total, ce, kd = distill_loss(s, t, y, alpha=0.3, temperature=2.0)
    ce_ref = torch.nn.functional.cross_entropy(s.reshape(-1, 8), y.reshape(-1), ignore_index=-100)
    kd_ref = kd_loss(s, t, y != -100, temperature=2.0)
    assert float(ce) == pytest.approx(float(ce_ref), rel=1e-6)
    assert float(kd) == pytest.approx(float(kd_ref), rel=1e-6)
    assert float(total) == pytest.approx(0.3 * float(ce_ref) + 0.7 * float(kd_ref), rel=1e-6)
    total.backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0
    # α = 1: plain CE; α = 0: the teacher alone
    assert float(distill_loss(s, t, y, alpha=1.0)[0]) == pytest.approx(float(ce_ref), rel=1e-6)
    assert float(distill_loss(s, t, y, alpha=0.0, temperature=2.0)[0]) == pytest.approx(float(kd_ref), rel=1e-6)
    with pytest.raises(ValueError):
        distill_loss(s, t, y, alpha=1.5)


def test_distill_loss_without_response_tokens_is_zero_not_nan():
    s, t = torch.randn(1, 3, 4, requires_grad=True), torch.randn(1, 3, 4)
    y = torch.full((1, 3), -100)
    total, ce, kd = distill_loss(s, t, y)
    assert float(total) == 0.0 and math.isfinite(float(ce))
    total.backward()


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_topk_with_full_support_equals_full_loss(kind):
    torch.manual_seed(1)
    s, t = torch.randn(2, 4, 10), torch.randn(2, 4, 10)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]])
    vals, idx = t.topk(10, dim=-1)
    full = kd_loss(s, t, mask, 2.0, kind)
    assert float(topk_kd_loss(s, vals, idx, mask, 2.0, kind)) == pytest.approx(float(full), rel=1e-5)


def test_topk_renormalises_on_the_support():
    # teacher logits [2, 1, 0, -1], top-2 = tokens {0, 1}: p̃ = softmax([2, 1]); student q̃ = softmax(s[{0,1}])
    t = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    s = torch.tensor([[0.0, 0.5, 9.0, 9.0]])  # lots of mass outside the support: invisible to the top-k loss
    vals, idx = t.topk(2, dim=-1)
    p = torch.softmax(torch.tensor([2.0, 1.0]), -1)
    q = torch.softmax(torch.tensor([0.0, 0.5]), -1)
    expected = float((p * (p.log() - q.log())).sum())
    assert float(topk_kd_loss(s, vals, idx)) == pytest.approx(expected, rel=1e-5)


# ---- stage, CLI and data paths ----------------------------------------------------------------------

import json  # noqa: E402
from pathlib import Path  # noqa: E402

from tiaoyu_cli.errors import TiaoyuError  # noqa: E402
from tiaoyu_cli.train.engine.trainer import TrainConfig  # noqa: E402
from tiaoyu_cli.train.objectives.distill import DistillConfig
from tiaoyu_cli.train.stages.distill.run import Config as DistillRun, run as run_distill  # noqa: E402

SMALL = ["dim=64", "n_layers=2", "n_heads=2", "n_kv_heads=1", "ffn_dim=192"]


def _train(out, **kw) -> TrainConfig:
    base = dict(out=str(out), max_steps=2, batch_size=4, lr=2e-3, warmup_steps=0, log_every=1, device="cpu",
                dtype="fp32", keep=1)
    base.update(kw)
    return TrainConfig(**base)


def _quiet(msg: str) -> None:
    pass


def _prompts(synth_dir: Path, tmp_path: Path, n: int) -> Path:
    """The first n chat.train questions as {"prompt": …} records (and one as a chat record)."""
    recs = chat_questions(synth_dir, n)
    recs[-1] = {"messages": [{"role": "user", "content": recs[-1]["prompt"]}, {"role": "assistant", "content": "x"}]}
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def other_student(tmp_path_factory, synth_dir):
    """A tiny model with a *different* tokenizer (another vocabulary size)."""
    import torch

    from tiaoyu_cli.model import Transformer, preset
    from tiaoyu_cli.tokenizer import train_tokenizer
    from tiaoyu_cli.checkpoint import save_model_files

    root = tmp_path_factory.mktemp("other")
    tok = train_tokenizer([str(synth_dir / "chat.train.jsonl")], root / "tok", vocab_size=600, num_threads=1)
    torch.manual_seed(0)
    net = Transformer(preset("tiny", vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                             ffn_dim=64, max_seq_len=128))
    (root / "ckpt").mkdir()
    save_model_files(root / "ckpt", net, tok)
    return root / "ckpt"


def test_white_box_refuses_different_tokenizers(base_ckpt, synth_dir, other_student, tmp_path):
    opts = DistillRun(teacher=base_ckpt, student=other_student, data=synth_dir / "chat.train.jsonl", mode="white")
    with pytest.raises(TiaoyuError, match="another tokenizer.*--mode black"):
        run_distill(opts, _train(tmp_path / "o"), log=_quiet)
    assert not (tmp_path / "o" / "latest").exists()


def test_cli_bad_input_is_one_clear_line(base_ckpt, tokens_dir, synth_dir, other_student, tmp_path, capfd):
    from tiaoyu_cli.cli.main import main

    def run(*args):
        with pytest.raises(SystemExit) as e:
            main(["distill", *map(str, args)])
        out, err = capfd.readouterr()
        return e.value.code, out, " ".join(err.split())

    code, out, err = run("--teacher", base_ckpt, "--student", other_student, synth_dir / "chat.train.jsonl",
                         "-o", tmp_path / "a", "--max-steps", "1")
    assert code == 2 and "another tokenizer" in err and "Traceback" not in err and out == ""
    code, _, err = run("--teacher", base_ckpt, "--student-preset", "tiny", "--data", tokens_dir, "--mode", "black",
                       "-o", tmp_path / "b", "--max-steps", "1")
    assert code == 2 and "black-box distillation needs prompts" in err
    code, _, err = run("--teacher", base_ckpt, "--student-preset", "tiny", "--student", base_ckpt, tokens_dir,
                       "-o", tmp_path / "c", "--max-steps", "1")
    assert code == 2 and "give the student once" in err
    code, _, err = run("--teacher", base_ckpt, "--student-preset", "tiny", tokens_dir, "-o", tmp_path / "d",
                       "--max-steps", "1", "--divergence", "kl")
    assert code == 2 and "--divergence 'kl'" in err
    code, _, err = run("--teacher", base_ckpt, "--student-preset", "tiny", tokens_dir, "-o", tmp_path / "e",
                       "--max-steps", "1", "--cache-topk", "8")
    assert code == 2 and "--cache-topk needs a finite chat dataset" in err


def test_black_box_end_to_end(base_ckpt, synth_dir, other_student, tmp_path):
    """teacher → JSONL (the `tiaoyu chat` path) → SFT of a student with its own tokenizer."""
    from tiaoyu_cli.data.jsonl import read_jsonl
    from tiaoyu_cli.infer.sampling import SamplingParams
    from tiaoyu_cli.infer.session import GenerationOptions, answer_records, load_chat_model
    from tiaoyu_cli.checkpoint import load_tokenizer, load_trainer_info

    prompts = _prompts(synth_dir, tmp_path, 6)
    keep = tmp_path / "teacher.jsonl"
    opts = DistillRun(teacher=base_ckpt, student=other_student, data=prompts, mode="black", keep_teacher_data=keep,
                          max_new_tokens=12, gen_batch_size=4)
    res = run_distill(opts, _train(tmp_path / "student", max_steps=2, batch_size=2), log=_quiet)
    assert res["step"] == 2
    got = read_jsonl(keep)
    assert len(got) >= 1
    # the same answers `tiaoyu chat teacher/ < prompts.jsonl` gives (greedy)
    cm = load_chat_model(base_ckpt, device="cpu", mode="chat")
    ref = list(answer_records(cm, [(i + 1, r) for i, r in enumerate(read_jsonl(prompts))],
                              GenerationOptions(max_new_tokens=12, sampling=SamplingParams(temperature=0.0)),
                              batch_size=4))
    ref_answers = [r["response"].strip() for r in ref if r["response"].strip()]
    assert [g["messages"][-1]["content"] for g in got] == ref_answers
    for g, p in zip(got, read_jsonl(prompts)):
        assert g["messages"][-1]["role"] == "assistant" and g["messages"][0]["role"] == "user"
    assert got[-1]["messages"][-1]["content"] != "x"  # a trailing assistant turn is answered anew
    # the student kept its own tokenizer and is a distill checkpoint
    out = tmp_path / "student" / "latest"
    assert load_tokenizer(out).fingerprint == load_tokenizer(other_student).fingerprint
    info = load_trainer_info(out)
    assert info["stage"] == "distill" and info["parent"] == str(other_student)


def test_topk_cache_matches_full_teacher_and_is_reused(base_ckpt, synth_dir, tmp_path):
    """--cache-topk V (the whole vocabulary) trains exactly like running the teacher every step; the cache
    is a safetensors file in -o that a resumed run reads back instead of running the teacher again."""
    import torch

    from tiaoyu_cli.tokenizer import Tokenizer
    from tiaoyu_cli.train.objectives.distill import TopKCache

    data = tmp_path / "chat.jsonl"
    data.write_text("".join((synth_dir / "chat.train.jsonl").read_text(encoding="utf-8").splitlines(True)[:12]),
                    encoding="utf-8")
    V = Tokenizer.load(base_ckpt).vocab_size
    losses = {}
    for k in (0, V):
        opts = DistillRun(teacher=base_ckpt, student_preset="tiny", model=SMALL, data=data,
                              mode="white", distill=DistillConfig(alpha=0.3, temperature=2.0, cache_topk=k))
        run_distill(opts, _train(tmp_path / f"k{k}", max_steps=3), log=_quiet)
        hist = [json.loads(x) for x in (tmp_path / f"k{k}" / "metrics.jsonl").read_text().splitlines()]
        losses[k] = [h["loss"] for h in hist if "loss" in h]
    assert losses[V] == pytest.approx(losses[0], rel=2e-3)
    cache = tmp_path / f"k{V}" / "teacher-topk.safetensors"
    assert cache.exists()
    # reused on --resume: the file is not rewritten, and the run continues
    mtime = cache.stat().st_mtime_ns
    logs = []
    opts = DistillRun(teacher=base_ckpt, student_preset="tiny", model=SMALL, data=data, mode="white",
                          distill=DistillConfig(alpha=0.3, temperature=2.0, cache_topk=V))
    run_distill(opts, _train(tmp_path / f"k{V}", max_steps=4, resume=True), log=logs.append)
    assert cache.stat().st_mtime_ns == mtime and any("reusing the top-" in m for m in logs)
    # a small k keeps only the k best logits per response token
    from safetensors.torch import load_file

    t = load_file(str(cache))
    assert t["values"].shape[1] == V and t["values"].dtype == torch.float16 and t["offsets"][-1] == t["values"].shape[0]
    assert bool((t["values"][:, :-1] >= t["values"][:, 1:]).all())  # sorted, largest first
    # a small k: the k largest teacher logits at each response token, found again by a batch's rows
    import contextlib

    from tiaoyu_cli.data.chat import ChatDataset, collate
    from tiaoyu_cli.checkpoint import load_model

    teacher, _ = load_model(base_ckpt)
    teacher.eval()
    rows = ChatDataset(data, Tokenizer.load(base_ckpt), 128).examples
    small = TopKCache.build(teacher, rows, 4, V, 8, torch.device("cpu"), contextlib.nullcontext)
    batch = collate([rows[2], rows[0]])
    vals, idx = small.lookup(batch)
    mask = batch["labels"] != -100
    assert vals.shape == (2, batch["labels"].shape[1], 4) and bool((vals[~mask] == 0).all())
    with torch.no_grad():
        z = teacher(batch["input_ids"]).logits[..., :V]
    assert torch.equal(idx[mask][:, 0], z[mask].argmax(-1))
    assert torch.allclose(vals[mask].float(), z[mask].topk(4, -1).values, atol=1e-2)


@pytest.mark.slow
def test_white_box_student_closes_half_the_gap(base_ckpt, tokens_dir, tmp_path):
    """Distillation during pretraining: a 0.16M student from the 0.9M base closes ≥ half of the held-out
    loss gap between its untrained self and the teacher (measured: 67% at this budget)."""
    opts = DistillRun(teacher=base_ckpt, student_preset="tiny", model=SMALL, data=tokens_dir,
                          mode="white", distill=DistillConfig(alpha=0.5, temperature=1.0), seq_len=64)
    res = run_distill(opts, _train(tmp_path / "s", max_steps=200, batch_size=8, lr=3e-3, warmup_steps=10,
                                   log_every=100), log=_quiet)
    before, after, teacher = res["before"]["val_loss"], res["val_loss"], res["teacher_val_loss"]
    assert teacher < after < before
    assert (before - after) / (before - teacher) >= 0.5, (before, after, teacher)


def test_resume_continues_exactly(base_ckpt, tokens_dir, tmp_path):
    """White box on token shards: 2 steps + --resume 2 steps log the same losses as 4 steps at once."""
    def losses(run):
        return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(x)]

    def opts():
        return DistillRun(teacher=base_ckpt, student_preset="tiny", model=SMALL, data=tokens_dir,
                              mode="white", distill=DistillConfig(alpha=0.5), seq_len=32)

    # (a constant LR: a shorter first budget would otherwise change the cosine schedule itself)
    run_distill(opts(), _train(tmp_path / "full", max_steps=4, schedule="constant"), log=_quiet)
    run_distill(opts(), _train(tmp_path / "cut", max_steps=2, schedule="constant"), log=_quiet)
    run_distill(opts(), _train(tmp_path / "cut", max_steps=4, schedule="constant", resume=True), log=_quiet)
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "full"), rel=1e-5)
    assert len(losses(tmp_path / "full")) == 4
