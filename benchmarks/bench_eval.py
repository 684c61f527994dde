"""Items scored per second: `tiaoyu eval bench` against lm-evaluation-harness's `hf` model, same run.

    python benchmarks/bench_eval.py --ckpt runs/demo/base --data runs/demo/data/bench
    python benchmarks/bench_eval.py --ckpt runs/demo/base --data runs/demo/data/bench --style cloze

The data is a folder in the C-Eval CSV layout (`tiaoyu synth` writes one from the held-out facts:
DATA/val/{subject}_val.csv). The checkpoint is exported with `tiaoyu export --format hf`; lm-eval
0.4 (pip install lm-eval) reads the same CSV files through task YAMLs written into a temp folder,
with lm-eval's ceval prompt (`--style letters`: "question\\nA. …\\n答案：" → " A"…" D") or the bare
question and the answer texts (`--style cloze`; only subjects whose questions end in Latin text,
where the delimiter is always " "). Both sides: fp32, CPU, the same batch size, BOS first, the
same items; wall time of the whole call (model load included) and the scoring alone. The
accuracies must agree (printed too). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tiaoyu_cli.evals import bench_formats as bf  # noqa: E402
from tiaoyu_cli.evals.bench import BenchConfig, run_bench  # noqa: E402
from tiaoyu_cli.export.hf import export_hf  # noqa: E402

TAIL = """output_type: multiple_choice
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def task_yaml(name: str, val: Path, style: str, subject: str) -> str:
    if style == "letters":
        text = '"{{question.strip()}}\\nA. {{A}}\\nB. {{B}}\\nC. {{C}}\\nD. {{D}}\\n答案："'
        choice, desc = '["A", "B", "C", "D"]', f'"以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\\n\\n"'
    else:
        text, choice, desc = '"{{question.strip()}}"', '"{{[A|string, B|string, C|string, D|string]}}"', '""'
    return (f"task: {name}\ndataset_path: csv\ndataset_kwargs:\n  data_files:\n    val: {val}\n"
            f"  keep_default_na: false\nvalidation_split: val\ndescription: {desc}\ndoc_to_text: {text}\n"
            f"doc_to_choice: {choice}\ndoc_to_target: \"{{{{['A', 'B', 'C', 'D'].index(answer)}}}}\"\n{TAIL}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data", required=True, help="folder in the C-Eval layout (val/{subject}_val.csv)")
    ap.add_argument("--style", default="letters", choices=["letters", "cloze"])
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    files = bf.find_files(args.data, "ceval", "val")
    if args.style == "cloze":  # lm-eval has one delimiter per task: keep the subjects where ours is " "
        files = [f for f in files if all(d.delimiter == " " for d in bf.read_docs([f], "ceval", "cloze"))]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data" / "val"
        data.mkdir(parents=True)
        for f in files:
            (data / f.name).write_bytes(f.read_bytes())
        hf = tmp / "hf"
        export_hf(args.ckpt, hf)
        names = []
        for f in files:
            subject = bf.subject_of(f, "ceval")
            names.append(f"bench_{subject}")
            (tmp / f"bench_{subject}.yaml").write_text(task_yaml(names[-1], data / f.name, args.style, subject),
                                                       encoding="utf-8")
        cfg = BenchConfig(task="ceval", style=args.style, batch_size=args.batch_size, device="cpu")
        marks: dict[str, float] = {}

        def progress(total):
            marks["start"] = time.perf_counter()
            return None

        t0 = time.perf_counter()
        ours = run_bench(hf, tmp / "data", cfg, progress)
        ours_s = time.perf_counter() - t0
        ours_score_s = time.perf_counter() - marks["start"]

        tm = TaskManager(include_path=str(tmp))
        t0 = time.perf_counter()
        ref = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(hf), "dtype": "float32", "add_bos_token": True, "device": "cpu"},
            tasks=names, task_manager=tm, num_fewshot=0, batch_size=args.batch_size, verbosity="ERROR")
        ref_s = time.perf_counter() - t0
    n = ours["n"]
    ref_acc = sum(ref["results"][k]["acc,none"] * ref["n-samples"][k]["effective"] for k in names) / n
    print(json.dumps({
        "bench": "eval_bench", "style": args.style, "items": n, "choices_per_item": 4, "batch_size": args.batch_size,
        "ours_items_per_s": round(n / ours_s, 1), "ours_scoring_items_per_s": round(n / ours_score_s, 1),
        "lm_eval_items_per_s": round(n / ref_s, 1), "speedup": round(ref_s / ours_s, 2),
        "ours_acc": round(ours["acc"], 6), "lm_eval_acc": round(ref_acc, 6),
        "torch_threads": torch.get_num_threads(), "machine": f"{os.cpu_count()}-core {platform.machine()} CPU",
        "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "0.4",
    }))


if __name__ == "__main__":
    main()
