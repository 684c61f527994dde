"""`tiaoyu eval`: metrics per data kind checked against independent computations, wrong-kind errors,
the default-command group, and `eval plot`."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import orjson
import pytest
import torch
import torch.nn.functional as F

from cli_lines import run_main
from tiaoyu_cli.errors import TiaoyuError


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


def head_checkpoint(base: Path, out: Path, num_labels: int, id2label: dict, seed: int) -> Path:
    """A copy of the base model with a random `score` head: a reward model (1 output) or a classifier."""
    from tiaoyu_cli.model import Transformer
    from tiaoyu_cli.checkpoint import load_model, load_tokenizer, save_model_files

    lm, _ = load_model(base)
    torch.manual_seed(seed)
    model = Transformer(lm.config.replace(num_labels=num_labels, id2label=id2label))
    model.load_state_dict(lm.state_dict(), strict=False)
    torch.nn.init.normal_(model.score.weight, std=0.5)
    out.mkdir(parents=True)
    save_model_files(out, model, load_tokenizer(base))
    return out


@pytest.fixture(scope="module")
def heads(base_ckpt, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("heads")
    return {"reward": head_checkpoint(base_ckpt, root / "rm", 1, {"0": "reward"}, 1),
            "classifier": head_checkpoint(base_ckpt, root / "cls", 2, {"0": "negative", "1": "positive"}, 2)}


# ---- text --------------------------------------------------------------------------------------------

def test_text_loss_matches_a_direct_forward_pass(base_ckpt, tmp_path, capsys):
    """Three short documents fit one window: the loss is one forward pass over <s>d1</s><s>d2</s><s>d3</s>."""
    from tiaoyu_cli.checkpoint import load_model, load_tokenizer

    docs = ["Tosi has a pet named Vinay.", "3 plus 4 equals 7.", "王丽住在青石城。"]
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in docs])
    code, out, err = run_main(["eval", base_ckpt, data], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["kind"] == "text" and res["model"] == "lm" and res["records"] == 3
    tok = load_tokenizer(base_ckpt)
    model, _ = load_model(base_ckpt)
    ids = torch.tensor([t for d in docs for t in tok.encode(d, bos=True, eos=True)])
    with torch.no_grad():
        logits = model(ids[None, :-1]).logits[0]
    ref = float(F.cross_entropy(logits, ids[1:]))
    assert res["tokens"] == len(ids) - 1
    assert res["loss"] == pytest.approx(ref, abs=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)
    n_bytes = sum(len(d.encode()) for d in docs)
    assert res["bits_per_byte"] == pytest.approx(ref * (len(ids) - 1) / math.log(2) / n_bytes, rel=1e-5)
    assert "loss" in err and "bits_per_byte" in err  # the table on stderr


def test_windows_cover_every_token_once(base_ckpt, synth_dir):
    """Short windows (overlapping by one token) predict the same tokens as long ones; the pretrained base
    predicts its own held-out text far better than chance (ln 1024 ≈ 6.9 nats)."""
    from tiaoyu_cli.evals.evaluate import EvalConfig, evaluate

    a = evaluate(base_ckpt, synth_dir / "text.val.jsonl", EvalConfig(limit=20, seq_len=32))
    b = evaluate(base_ckpt, synth_dir / "text.val.jsonl", EvalConfig(limit=20, seq_len=200))
    assert a["tokens"] == b["tokens"]
    assert a["loss"] > b["loss"]  # less context per prediction
    assert b["loss"] < 2.0


def test_token_folder_uses_the_val_split(base_ckpt, tokens_dir):
    from tiaoyu_cli.evals.evaluate import EvalConfig, evaluate

    res = evaluate(base_ckpt, tokens_dir, EvalConfig(limit=3000))
    assert res["kind"] == "tokens" and res["split"].endswith("val")
    assert res["tokens"] == 2999 and res["loss"] < 2.0 and 0 < res["bits_per_byte"] < 2


# ---- preference pairs ------------------------------------------------------------------------------------

def test_reward_pairwise_accuracy_matches_direct_scores(heads, synth_dir, tmp_path, capsys):
    from tiaoyu_cli.checkpoint import load_model, load_tokenizer

    recs = [orjson.loads(x) for x in (synth_dir / "preference.val.jsonl").read_bytes().splitlines()[:12]]
    data = write_jsonl(tmp_path / "p.jsonl", recs)
    code, out, err = run_main(["eval", heads["reward"], data, "--batch-size", "5"], capsys)
    assert code == 0, err
    res = json.loads(out)
    model, _ = load_model(heads["reward"])
    tok = load_tokenizer(heads["reward"])

    def reward(prompt: str, answer: str) -> float:  # the score at the assistant's closing <|im_end|>
        ids, mask = tok.encode_chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
        last = max(i for i, m in enumerate(mask) if m)
        with torch.no_grad():
            return float(model(torch.tensor([ids[:last + 1]]), compute_logits=False).scores[0, -1, 0])

    diffs = [reward(r["prompt"], r["chosen"]) - reward(r["prompt"], r["rejected"]) for r in recs]
    assert res["pairwise_accuracy"] == pytest.approx(sum(d > 0 for d in diffs) / len(diffs))
    assert res["mean_margin"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-4)
    # swapping chosen and rejected mirrors the accuracy
    swapped = write_jsonl(tmp_path / "s.jsonl", [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in recs])
    code, out, _ = run_main(["eval", heads["reward"], swapped], capsys)
    assert json.loads(out)["pairwise_accuracy"] == pytest.approx(1 - res["pairwise_accuracy"])


def test_dpo_implicit_reward_with_a_reference(base_ckpt, heads, synth_dir, tmp_path):
    """Policy = reference: every implicit reward is 0, so every pair is a tie (accuracy ½, margin 0)."""
    from tiaoyu_cli.evals.evaluate import EvalConfig, evaluate

    recs = [orjson.loads(x) for x in (synth_dir / "preference.val.jsonl").read_bytes().splitlines()[:8]]
    data = write_jsonl(tmp_path / "p.jsonl", recs)
    res = evaluate(base_ckpt, data, EvalConfig(), ref=base_ckpt)
    assert res["pairwise_accuracy"] == 0.5 and res["mean_margin"] == 0.0


# ---- classification ----------------------------------------------------------------------------------------

def test_classifier_accuracy_matches_direct_argmax(heads, synth_dir, tmp_path, capsys):
    from tiaoyu_cli.checkpoint import load_model, load_tokenizer

    recs = [orjson.loads(x) for x in (synth_dir / "classification.val.jsonl").read_bytes().splitlines()[:20]]
    data = write_jsonl(tmp_path / "c.jsonl", recs)
    code, out, err = run_main(["eval", heads["classifier"], data], capsys)
    assert code == 0, err
    res = json.loads(out)
    model, _ = load_model(heads["classifier"])
    tok = load_tokenizer(heads["classifier"])
    right = 0
    for r in recs:
        ids = torch.tensor([tok.encode(r["text"], bos=True, eos=True)])
        with torch.no_grad():
            k = int(model(ids, compute_logits=False).scores[0, -1].argmax())
        right += ["negative", "positive"][k] == r["label"]
    assert res["accuracy"] == pytest.approx(right / len(recs))
    assert set(res["per_label_accuracy"]) == {"negative", "positive"}
    bad = write_jsonl(tmp_path / "bad.jsonl", recs[:2] + [{"text": "meh", "label": "neutral"}])
    code, _, err = run_main(["eval", heads["classifier"], bad], capsys)
    assert code == 2 and "bad.jsonl:3" in err and "neutral" in err


# ---- answers -----------------------------------------------------------------------------------------------

def test_answer_accuracy_counts_matching_answers(base_ckpt, synth_dir, tmp_path):
    """Using the model's own greedy answers as the references gives accuracy 1; the real references
    give the (low) accuracy of a model that never saw a question."""
    from tiaoyu_cli.infer.generate import decode_response, generate
    from tiaoyu_cli.checkpoint import load_model, load_tokenizer
    from tiaoyu_cli.evals.evaluate import EvalConfig, evaluate

    recs = [orjson.loads(x) for x in (synth_dir / "verifiable.val.jsonl").read_bytes().splitlines()[:8]]
    model, _ = load_model(base_ckpt)
    tok = load_tokenizer(base_ckpt)
    prompts = [tok.encode_chat([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)[0] for r in recs]
    own = [decode_response(tok, t).response for t in generate(model, prompts, 12, temperature=0)]
    mine = write_jsonl(tmp_path / "own.jsonl", [{"prompt": r["prompt"], "answer": a or "x"} for r, a in zip(recs, own)])
    res = evaluate(base_ckpt, mine, EvalConfig(max_new_tokens=12))
    assert res["kind"] == "verifiable" and res["total"] == 8
    assert res["answer_accuracy"] == pytest.approx(sum(bool(a.strip()) for a in own) / 8)
    real = evaluate(base_ckpt, write_jsonl(tmp_path / "v.jsonl", recs), EvalConfig(max_new_tokens=12))
    assert real["answer_accuracy"] < res["answer_accuracy"]


def test_chat_records_give_answer_loss_and_accuracy(base_ckpt, synth_dir, tmp_path):
    from tiaoyu_cli.evals.evaluate import EvalConfig, evaluate

    recs = [orjson.loads(x) for x in (synth_dir / "chat.val.jsonl").read_bytes().splitlines()[:6]]
    res = evaluate(base_ckpt, write_jsonl(tmp_path / "c.jsonl", recs), EvalConfig(max_new_tokens=8))
    assert res["kind"] == "chat" and res["total"] == 6
    assert 0 <= res["answer_accuracy"] <= 1 and res["answer_loss"] > 0 and res["answer_tokens"] > 6


# ---- wrong kinds, bad data ------------------------------------------------------------------------------------

def test_wrong_kind_for_the_checkpoint_is_a_clear_error(base_ckpt, heads, synth_dir, capsys):
    cases = [
        (base_ckpt, "preference", "need a reward checkpoint"),
        (base_ckpt, "classification", "need a classifier checkpoint"),
        (heads["reward"], "text", "evaluate it on preference pairs"),
        (heads["reward"], "classification", "need a classifier checkpoint"),
        (heads["classifier"], "preference", "need a reward checkpoint"),
        (heads["classifier"], "chat", "evaluate it on classification records"),
    ]
    for ckpt, kind, msg in cases:
        code, out, err = run_main(["eval", ckpt, synth_dir / f"{kind}.val.jsonl"], capsys)
        assert code == 2 and msg in err and out == "", (kind, err)
        assert "Traceback" not in err


def test_bad_data_names_file_and_line(base_ckpt, tmp_path, capsys):
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "a b c"}, {"prompt": "x", "chosen": "y", "rejected": "z"}])
    code, _, err = run_main(["eval", base_ckpt, mixed], capsys)
    assert code == 2 and "mixed.jsonl:2" in err and "expected a text record" in err
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"foo": 1}])
    code, _, err = run_main(["eval", base_ckpt, unknown], capsys)
    assert code == 2 and "u.jsonl:1" in err and "unknown record kind" in err
    code, _, err = run_main(["eval", base_ckpt, tmp_path / "missing.jsonl"], capsys)
    assert code == 2 and "no such file" in err
    code, _, err = run_main(["eval", tmp_path, mixed], capsys)
    assert code == 2 and "not a checkpoint" in err
    code, _, err = run_main(["eval", base_ckpt, mixed, "--ref", base_ckpt], capsys)
    assert code == 2


def test_group_takes_ckpt_data_without_a_subcommand(base_ckpt, tmp_path, capsys):
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": "3 plus 4 equals 7."}])
    a = run_main(["eval", base_ckpt, data], capsys)
    b = run_main(["eval", "run", base_ckpt, data], capsys)
    c = run_main(["eval", "--batch-size", "2", base_ckpt, data], capsys)  # an option first
    assert a[0] == b[0] == c[0] == 0
    assert json.loads(a[1])["loss"] == json.loads(b[1])["loss"] == json.loads(c[1])["loss"]
    code, out, _ = run_main(["eval", "--help"], capsys)
    assert code == 0 and "plot" in out


# ---- plots ---------------------------------------------------------------------------------------------------

def test_plot_overlays_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    runs = []
    for name, scale in (("a", 1.0), ("b", 2.0)):
        run = tmp_path / name
        run.mkdir()
        lines = [{"step": s, "loss": scale * 5 / s, "lr": 1e-3, "tokens_per_s": 1000.0 + s} for s in range(1, 30)]
        lines.append({"step": 29, "eval": True, "val_loss": scale})
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"step\": 30, \"lo")  # torn
        runs.append(run)
    out = tmp_path / "curves.png"
    code, _, err = run_main(["eval", "plot", *runs, "-o", out], capsys)
    assert code == 0, err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "a: loss 29 points, val_loss 1 points" in err and "b:" in err
    code, _, err = run_main(["eval", "plot", tmp_path / "nope", "-o", out], capsys)
    assert code == 2 and "no such run folder" in err


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    from tiaoyu_cli.evals.plots import plot_runs

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(TiaoyuError, match=r"tiaoyu\[plot\]"):
        plot_runs([str(tmp_path)], tmp_path / "x.png")
