"""tiaoyu prep engine: every input format, every cleaning rule, dedup, shuffle, split, every error path."""

from __future__ import annotations

import gzip
import random
from collections import Counter
from pathlib import Path

import orjson
import pytest

from tiaoyu_cli.data.clean import CleanConfig, clean_text
from tiaoyu_cli.data.dedup import MinHashDedup, U64Set, choose_bands
from tiaoyu_cli.data.formats import convert
from tiaoyu_cli.data.prep import PrepConfig, output_paths, run_prep
from tiaoyu_cli.data.shuffle import ExternalShuffle, interleave
from tiaoyu_cli.errors import DataError, TiaoyuError


def jl(*objs) -> bytes:
    return b"".join(orjson.dumps(o) + b"\n" for o in objs)


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def prep(tmp_path: Path, inputs, **kw):
    """Run prep into tmp/out.jsonl; return (records, stats)."""
    out = tmp_path / "out.jsonl"
    stats = run_prep([str(i) for i in inputs], str(out), PrepConfig(**kw))
    assert stats.read == stats.kept + sum(stats.dropped.values())
    return [orjson.loads(x) for x in out.read_bytes().splitlines()], stats


def chat(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


# ----- input formats ----------------------------------------------------------------------------


def test_plain_text_split_on_blank_lines_md_and_no_extension(tmp_path):
    write(tmp_path / "raw" / "a.txt", "first doc\nline two\n\n\n\nsecond doc\n")
    write(tmp_path / "raw" / "sub" / "b.md", "# Title\n\nA paragraph.\r\n")
    write(tmp_path / "raw" / "notes", "no extension\n")
    recs, st = prep(tmp_path, [tmp_path / "raw"])
    assert recs == [{"text": "first doc\nline two"}, {"text": "second doc"}, {"text": "no extension"},
                    {"text": "# Title"}, {"text": "A paragraph."}]
    assert st.files == 3 and st.kinds == {"text": 5}


def test_separator_keeps_blank_lines_inside_documents(tmp_path):
    f = write(tmp_path / "fortunes", "A fortune.\n\nStill the same one.\n%\nSecond one.\n%\n\n%\n")
    recs, _ = prep(tmp_path, [f], separator="%")
    assert recs == [{"text": "A fortune.\n\nStill the same one."}, {"text": "Second one."}]


def test_seed_form_is_split_into_documents(tmp_path):
    f = write(tmp_path / "seed.jsonl", jl({"text": "<s>床前明月光，疑是地上霜。</s> <s>星星之火，可以燎原。</s>"},
                                          {"text": "before <s>inside</s> after"}))
    recs, _ = prep(tmp_path, [f])
    assert [r["text"] for r in recs] == ["床前明月光，疑是地上霜。", "星星之火，可以燎原。", "before", "inside", "after"]


CHAT_FORMATS = [
    ({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     chat(("system", "S"), ("user", "q"), ("assistant", "a"))),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": "S"},
     chat(("system", "S"), ("user", "q"), ("assistant", "a"))),
    ({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     chat(("user", "q"), ("assistant", "a"))),
    ({"instruction": "Translate", "input": "猫", "output": "cat", "id": 7},
     chat(("user", "Translate\n\n猫"), ("assistant", "cat"))),
    ({"instruction": "q2", "input": "", "output": "a2", "history": [["q1", "a1"]], "system": "S"},
     chat(("system", "S"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2"))),
    ({"prompt": "q", "completion": "a"}, chat(("user", "q"), ("assistant", "a"))),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]},
     chat(("user", "q"), ("assistant", "a"))),
    ({"prompt": "q", "response": "a"}, chat(("user", "q"), ("assistant", "a"))),
    ({"instruction": "q", "context": "c", "response": "a"}, chat(("user", "q\n\nc"), ("assistant", "a"))),
]


@pytest.mark.parametrize("raw,want", CHAT_FORMATS)
def test_chat_formats(raw, want):
    assert convert(raw) == ("chat", [want])


@pytest.mark.parametrize("raw", [
    {"prompt": "1+2?", "reasoning": "1 + 2 = 3.", "answer": "3"},
    {"question": "1+2?", "steps": ["1 + 2 = 3."], "answer": 3},
    {"instruction": "1+2?", "think": "1 + 2 = 3.", "output": "3"},
    {"messages": [{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": "<think>1 + 2 = 3.</think>\n3"}]},
    {"messages": [{"role": "user", "content": "1+2?"}, {"role": "assistant", "reasoning_content": "1 + 2 = 3.", "content": "3"}]},
])
def test_reasoning_records_become_chat_with_reasoning_field(raw):
    assert convert(raw) == ("chat", [{"messages": [
        {"role": "user", "content": "1+2?"}, {"role": "assistant", "reasoning": "1 + 2 = 3.", "content": "3"}]}])


def test_steps_list_joined_by_newlines():
    _, [r] = convert({"problem": "p", "steps": ["a", "b"], "final_answer": "x"})
    assert r["messages"][1] == {"role": "assistant", "reasoning": "a\nb", "content": "x"}


def test_preference_verifiable_classification_text():
    assert convert({"prompt": "p", "chosen": "good", "rejected": "bad", "meta": 1}) == (
        "preference", [{"prompt": "p", "chosen": "good", "rejected": "bad"}])
    u, a, b = ({"role": "user", "content": "q"}, {"role": "assistant", "content": "yes"}, {"role": "assistant", "content": "no"})
    assert convert({"chosen": [u, a], "rejected": [u, b]}) == ("preference", [{"prompt": [u], "chosen": [a], "rejected": [b]}])
    assert convert({"question": "2+2?", "answer": 4}) == ("verifiable", [{"prompt": "2+2?", "answer": "4"}])
    assert convert({"text": "nice", "label": 1}) == ("classification", [{"text": "nice", "label": "1"}])
    assert convert({"text": "plain", "source": "x"}) == ("text", [{"text": "plain"}])


def test_json_array_object_wrapped_list_and_misnamed_jsonl(tmp_path):
    a = write(tmp_path / "a.json", orjson.dumps([{"text": "one"}, {"text": "two"}]))
    b = write(tmp_path / "b.json", orjson.dumps({"prompt": "p", "answer": "1"}, option=orjson.OPT_INDENT_2))
    c = write(tmp_path / "c.json", orjson.dumps({"version": 2, "data": [{"text": "three"}]}))
    d = write(tmp_path / "d.json", jl({"text": "four"}, {"text": "five"}))
    recs, _ = prep(tmp_path, [a, b, c, d], to=None)
    assert recs == [{"text": "one"}, {"text": "two"}, {"prompt": "p", "answer": "1"}, {"text": "three"},
                    {"text": "four"}, {"text": "five"}]


def test_gzip_inputs(tmp_path):
    a = write(tmp_path / "a.jsonl.gz", gzip.compress(jl({"text": "zipped json"})))
    b = write(tmp_path / "b.txt.gz", gzip.compress("zipped text\n\nsecond".encode()))
    recs, _ = prep(tmp_path, [a, b])
    assert recs == [{"text": "zipped json"}, {"text": "zipped text"}, {"text": "second"}]


def test_globs_hidden_files_and_binary_files(tmp_path):
    write(tmp_path / "r" / "x.txt", "kept")
    write(tmp_path / "r" / ".hidden.txt", "hidden")
    write(tmp_path / "r" / ".git" / "y.txt", "git internals")
    write(tmp_path / "r" / "deep" / "z.txt", "deep")
    write(tmp_path / "r" / "image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    write(tmp_path / "r" / "blob.dat", bytes(random.Random(0).getrandbits(8) for _ in range(4000)).replace(b"\x00", b"\x01"))
    recs, st = prep(tmp_path, [tmp_path / "r"])
    assert recs == [{"text": "kept"}, {"text": "deep"}]  # a folder's own files first, then its subfolders
    assert sorted(Path(p).name for p in st.binary) == ["blob.dat", "image.png"]
    recs, _ = prep(tmp_path, [str(tmp_path / "r" / "**" / "*.txt")])
    assert recs == [{"text": "deep"}, {"text": "kept"}]


def test_to_forces_a_kind(tmp_path):
    f = write(tmp_path / "v.jsonl", jl({"prompt": "2+2?", "answer": "4"}))
    recs, _ = prep(tmp_path, [f], to="chat")
    assert recs == [chat(("user", "2+2?"), ("assistant", "4"))]
    g = write(tmp_path / "c.jsonl", jl(chat(("system", "S"), ("user", "q"), ("assistant", "a")), chat(("user", "q2"), ("assistant", "a2"))))
    recs, _ = prep(tmp_path, [g], to="verifiable")
    assert recs[1] == {"prompt": "q2", "answer": "a2"}
    assert recs[0]["prompt"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]
    recs, _ = prep(tmp_path, [g], to="text")
    assert recs == [{"text": "S\nq\na"}, {"text": "q2\na2"}]
    with pytest.raises(DataError, match=r"c\.jsonl:1: cannot convert a chat record to preference"):
        prep(tmp_path, [g], to="preference")
    t = write(tmp_path / "t.txt", "plain")
    with pytest.raises(DataError, match="plain text becomes text records only"):
        prep(tmp_path, [t], to="chat")


def test_synth_output_passes_through_unchanged(tmp_path):
    from tiaoyu_cli.data.synth import KINDS, SynthConfig, write_corpus

    write_corpus(tmp_path / "s", SynthConfig(text_mb=0.05, records=60, val_records=10))
    for kind in KINDS:
        src = tmp_path / "s" / f"{kind}.train.jsonl"
        out = tmp_path / f"{kind}.jsonl"
        st = run_prep([str(src)], str(out), PrepConfig(dedup=False))
        assert out.read_bytes() == src.read_bytes(), kind
        assert st.kept == st.read


# ----- cleaning -------------------------------------------------------------------------------------


def test_clean_rules():
    assert clean_text("a\r\nb\rc") == "a\nb\nc"
    assert clean_text("\x1b[1;31mred\x1b[0m \x1b]0;title\x07done\x1b(B") == "red done"
    assert clean_text("e\u0301") == "\u00e9"  # NFC
    assert clean_text("ＡＢＣ１２３，好") == "ＡＢＣ１２３，好"
    assert clean_text("ＡＢＣ１２３，好", CleanConfig(nfkc=True)) == "ABC123,好"
    assert clean_text("a\x00b\x07c\x7fd\x85e\u200bf\ufeffg\th") == "abcdefg\th"
    assert clean_text("  x  =   1 \t\n    indented  y\n\n\n\n\nz\u00a0\u3000w  ") == "x = 1\n    indented y\n\nz w"
    assert clean_text("  x  =   1  ", CleanConfig(collapse_whitespace=False)) == "  x  =   1  "


def test_cleaning_applies_to_every_string_of_a_record(tmp_path):
    f = write(tmp_path / "c.jsonl", jl({"messages": [{"role": "user", "content": " hi\x1b[0m  there "},
                                                     {"role": "assistant", "reasoning": "r\x00 ", "content": "ok\r\n"}]}))
    recs, _ = prep(tmp_path, [f])
    assert recs == [{"messages": [{"role": "user", "content": "hi there"},
                                  {"role": "assistant", "reasoning": "r", "content": "ok"}]}]


def test_length_filters_empty_and_identical_pairs(tmp_path):
    f = write(tmp_path / "a.jsonl", jl({"text": "abc"}, {"text": "abcdefgh"}, {"text": "x" * 30}, {"text": " \x00 "},
                                       {"prompt": "p", "chosen": "same", "rejected": "same "},
                                       chat(("user", "q"), ("assistant", " "))))
    recs, st = prep(tmp_path, [f], min_chars=5, max_chars=20)
    assert recs == [{"text": "abcdefgh"}]
    assert st.dropped["too short"] == 1 and st.dropped["too long"] == 1 and st.dropped["empty"] == 2
    assert st.dropped["chosen = rejected"] == 1


def test_long_plain_text_document_is_dropped_without_holding_it(tmp_path):
    f = write(tmp_path / "big.txt", "short doc\n\n" + ("y" * 50 + "\n") * 1000 + "\nafter")
    recs, st = prep(tmp_path, [f], max_chars=100)
    assert recs == [{"text": "short doc"}, {"text": "after"}] and st.dropped["too long"] == 1


# ----- dedup ------------------------------------------------------------------------------------


def test_exact_dedup_across_files_and_no_dedup(tmp_path):
    a = write(tmp_path / "a.jsonl", jl({"text": "same"}, {"text": "other"}))
    b = write(tmp_path / "b.txt", "same\n\n  same  \n")
    recs, st = prep(tmp_path, [a, b])
    assert recs == [{"text": "same"}, {"text": "other"}] and st.dropped["duplicate"] == 2
    recs, _ = prep(tmp_path, [a, b], dedup=False)
    assert len(recs) == 4


def test_near_dup(tmp_path):
    words = [f"w{random.Random(i).randint(0, 10 ** 6)}" for i in range(120)]
    base = " ".join(words)
    near = " ".join(words[:60] + ["CHANGED"] + words[61:])
    far = " ".join(reversed(words[:40])) + " entirely different tail of the document"
    f = write(tmp_path / "a.jsonl", jl({"text": base}, {"text": near}, {"text": far}, {"text": "你好世界，今天天气很好，我们去公园散步吧。"},
                                       {"text": "你好世界，今天天气很好，我们去公园散步吧！"}))
    recs, st = prep(tmp_path, [f], near_dup=True)
    assert [r["text"] for r in recs] == [base, far, "你好世界，今天天气很好，我们去公园散步吧。"]
    assert st.dropped["near-duplicate"] == 2
    recs, _ = prep(tmp_path, [f])
    assert len(recs) == 5
    # decisions are batched: a near copy of the first record 600 records later is still caught
    rng = random.Random(1)
    many = [" ".join(f"t{rng.randint(0, 10 ** 6)}" for _ in range(30)) for _ in range(600)]
    g = write(tmp_path / "b.jsonl", jl(*({"text": t} for t in many + [many[0] + " !"])))
    recs, st = prep(tmp_path, [g], near_dup=True)
    assert [r["text"] for r in recs] == many and st.dropped["near-duplicate"] == 1


def test_minhash_estimates_jaccard_and_band_choice():
    b, r = choose_bands(128, 0.8)
    assert b * r <= 128 and abs((1 / b) ** (1 / r) - 0.8) < 0.1
    m = MinHashDedup(0.8)
    rng = random.Random(0)
    errors = []
    for _ in range(50):  # pairs of documents with Jaccard similarity spread over [0, 1]
        words = [f"w{rng.randint(0, 9999)}" for _ in range(80)]
        k = rng.randint(0, 80)
        x, y = " ".join(words), " ".join(words[:k] + [f"v{rng.randint(0, 9999)}" for _ in range(80 - k)])
        a, c = set(m.shingles(x).tolist()), set(m.shingles(y).tolist())
        sig = m.signatures([x, y])
        errors.append(abs(float((sig[0] == sig[1]).mean()) - len(a & c) / len(a | c)))
    assert sum(errors) / len(errors) < 0.05 and max(errors) < 0.2
    assert m.check(["same text here", "other words entirely", "same text here"]) == [False, False, True]


def test_u64set_grows_and_answers_membership():
    s = U64Set(2)
    rng = random.Random(3)
    xs = [rng.getrandbits(64) | 1 for _ in range(5000)]
    assert all(s.add(x) for x in xs)
    assert not any(s.add(x) for x in xs[:100])
    assert len(s) == 5000 and all(x in s for x in xs) and (2 not in s)


# ----- shuffle and split ------------------------------------------------------------------------------


def test_external_shuffle_is_a_uniform_permutation_with_spills(tmp_path):
    lines = [f"{i}\n".encode() for i in range(500)]
    sh = ExternalShuffle(seed=1, budget_bytes=300, tmp_dir=str(tmp_path), max_runs=4)  # many spills and merges
    for x in lines:
        sh.add(x)
    out = list(sh)
    assert sorted(out) == sorted(lines) and out != lines
    assert not list(tmp_path.iterdir())  # temp files removed
    counts: Counter = Counter()
    for seed in range(360):
        sh = ExternalShuffle(seed=seed, budget_bytes=1, max_runs=2)  # every line its own run, merged as it goes
        for x in (b"a\n", b"b\n", b"c\n"):
            sh.add(x)
        counts[b"".join(sh)] += 1
    assert len(counts) == 6 and min(counts.values()) > 30 and max(counts.values()) < 90  # expected 60 each


def test_interleave_weights_sources_by_lines_left():
    # a uniform shuffle puts the lone "x" first (or last) with probability 1/4, not 1/2
    first = last = 0
    rng = random.Random(0)
    for _ in range(4000):
        out = list(interleave([iter([b"x"]), iter([b"a", b"b", b"c"])], [1, 3], rng))
        assert out.index(b"x") >= 0 and [o for o in out if o != b"x"] == [b"a", b"b", b"c"]
        first += out[0] == b"x"
        last += out[-1] == b"x"
    assert 850 < first < 1150 and 850 < last < 1150


def test_shuffle_option_permutes_and_is_deterministic(tmp_path):
    f = write(tmp_path / "a.jsonl", jl(*({"text": f"doc {i}"} for i in range(300))))
    plain, _ = prep(tmp_path, [f])
    s1, _ = prep(tmp_path, [f], shuffle=True, seed=5, shuffle_budget_mb=0.005)
    s2, _ = prep(tmp_path, [f], shuffle=True, seed=5)
    s3, _ = prep(tmp_path, [f], shuffle=True, seed=6)
    assert s1 != plain and sorted(map(str, s1)) == sorted(map(str, plain))
    assert s2 != s3 and sorted(map(str, s2)) == sorted(map(str, plain))


def test_split_is_by_content_and_files_are_named(tmp_path):
    docs = [{"text": f"doc number {i}"} for i in range(2000)]
    f = write(tmp_path / "a.jsonl", jl(*docs))
    g = write(tmp_path / "b.jsonl", jl(*reversed(docs)))
    st = run_prep([str(f)], str(tmp_path / "o.jsonl"), PrepConfig(val_frac=0.1, seed=0))
    train = (tmp_path / "o.train.jsonl").read_bytes().splitlines()
    val = (tmp_path / "o.val.jsonl").read_bytes().splitlines()
    assert 120 < len(val) < 280 and len(train) + len(val) == 2000 and not set(train) & set(val)
    assert st.kept_val == len(val)
    run_prep([str(g)], str(tmp_path / "d") + "/", PrepConfig(val_frac=0.1, seed=0))
    assert set((tmp_path / "d" / "val.jsonl").read_bytes().splitlines()) == set(val)
    run_prep([str(f)], str(tmp_path / "e.jsonl"), PrepConfig(val_frac=0.1, seed=1))
    assert set((tmp_path / "e.val.jsonl").read_bytes().splitlines()) != set(val)
    assert output_paths(str(tmp_path / "d"), 0.0) == (str(tmp_path / "d" / "data.jsonl"), None)
    with pytest.raises(TiaoyuError, match="--split writes two files"):
        output_paths(None, 0.1)


# ----- errors -------------------------------------------------------------------------------------


def test_malformed_line_names_file_and_line_and_leaves_no_output(tmp_path):
    f = write(tmp_path / "a.jsonl", jl({"text": "ok"}) + b'{"text": "broken\n' + jl({"text": "later"}))
    out = tmp_path / "out.jsonl"
    out.write_text("previous content")
    with pytest.raises(DataError, match=r"a\.jsonl:2: malformed JSON"):
        run_prep([str(f)], str(out), PrepConfig())
    assert out.read_text() == "previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "out.jsonl"]  # no temp file left
    with pytest.raises(DataError, match=r"a\.jsonl:2"):
        run_prep([str(f)], str(tmp_path / "s.jsonl"), PrepConfig(val_frac=0.5, shuffle=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "out.jsonl"]


@pytest.mark.parametrize("obj,msg", [
    ({"text": 5}, r"x\.jsonl:1: field 'text': expected a string, got a number"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ["a"]}]},
     r"field 'messages\[1\]\.content': expected a string, got a list"),
    ({"messages": [{"role": "robot", "content": "q"}]}, r"field 'messages\[0\]\.role': unknown role 'robot'"),
    ({"messages": [{"role": "tool", "content": "q"}]}, r"field 'messages\[0\]': a tool message with no tool call before it"),
    ({"messages": [{"role": "user", "content": "q"}]}, r"field 'messages': no assistant message"),
    ({"messages": "hi"}, r"field 'messages': expected a list of messages, got a string"),
    ({"prompt": "p", "chosen": 1, "rejected": "r"}, r"field 'chosen': expected a string or a list of messages"),
    ({"text": "t", "label": [1]}, r"field 'label': expected a string or an integer"),
    ({"prompt": "p", "steps": [1, 2], "answer": "a"}, r"field 'steps\[0\]': expected a string"),
    ({"foo": 1, "bar": 2}, r"cannot tell the record kind from its fields \(bar, foo\)"),
])
def test_wrong_field_types_name_the_field(tmp_path, obj, msg):
    f = write(tmp_path / "x.jsonl", jl(obj))
    with pytest.raises(DataError, match=msg):
        prep(tmp_path, [f])


def test_non_object_lines_and_json_items(tmp_path):
    with pytest.raises(DataError, match=r"a\.jsonl:2: expected a JSON object, got a list"):
        prep(tmp_path, [write(tmp_path / "a.jsonl", b'{"text": "x"}\n[1, 2]\n')])
    with pytest.raises(DataError, match=r"b\.json\[1\]: expected a JSON object, got a number"):
        prep(tmp_path, [write(tmp_path / "b.json", b'[{"text": "x"}, 3]')])
    with pytest.raises(DataError, match=r"c\.json:3: malformed JSON"):
        prep(tmp_path, [write(tmp_path / "c.json", b'[\n{"text": "x"},\n{oops}\n]')])


def test_skip_bad_counts_bad_records(tmp_path):
    f = write(tmp_path / "a.jsonl", jl({"text": "ok"}) + b"not json\n" + jl({"text": 3}, [1], {"zzz": 1}, {"text": "fine"}))
    recs, st = prep(tmp_path, [f], skip_bad=True)
    assert recs == [{"text": "ok"}, {"text": "fine"}] and st.dropped["bad record"] == 4


def test_invalid_utf8_strict_replace_skip(tmp_path):
    f = write(tmp_path / "a.jsonl", jl({"text": "good"}) + b'{"text": "bad \xff byte"}\n')
    t = write(tmp_path / "b.txt", b"fine doc\n\nbroken \xc3\x28 doc\nmore\n\nlast")
    with pytest.raises(DataError, match=r"a\.jsonl:2: invalid UTF-8"):
        prep(tmp_path, [f])
    with pytest.raises(DataError, match=r"b\.txt:3: invalid UTF-8"):
        prep(tmp_path, [t])
    recs, _ = prep(tmp_path, [f, t], errors="replace")
    assert [r["text"] for r in recs] == ["good", "bad \ufffd byte", "fine doc", "broken \ufffd( doc\nmore", "last"]
    recs, st = prep(tmp_path, [f, t], errors="skip")
    assert [r["text"] for r in recs] == ["good", "fine doc", "last"] and st.dropped["invalid UTF-8"] == 2


def test_empty_missing_and_unmatched_inputs(tmp_path):
    e = write(tmp_path / "empty.jsonl", b"\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: empty input"):
        prep(tmp_path, [e])
    with pytest.raises(TiaoyuError, match=r"nope\.txt: no such file or folder"):
        prep(tmp_path, [tmp_path / "nope.txt"])
    with pytest.raises(TiaoyuError, match="no file matches"):
        prep(tmp_path, [str(tmp_path / "*.none")])
    only_bin = write(tmp_path / "bin" / "x.bin", b"\x00\x01\x02" * 100)
    with pytest.raises(DataError, match=r"1 binary file\(s\) skipped"):
        prep(tmp_path, [only_bin.parent])
    d = write(tmp_path / "dups.jsonl", jl({"text": "a"}, {"text": "a"}))
    with pytest.raises(TiaoyuError, match="no records kept"):
        prep(tmp_path, [d], min_chars=5)
    with pytest.raises(DataError, match=r"bad\.gz: not a valid gzip file"):
        prep(tmp_path, [write(tmp_path / "bad.gz", b"\x1f\x8b\x08\x00garbage-garbage-garbage")])
    assert not (tmp_path / "out.jsonl").exists()


def test_config_errors():
    for kw in (dict(to="poem"), dict(errors="ignore"), dict(val_frac=1.0), dict(min_chars=10, max_chars=5),
               dict(near_dup_threshold=1.5), dict(separator="  ")):
        with pytest.raises(TiaoyuError):
            PrepConfig(**kw).check()

