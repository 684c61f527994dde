#!/usr/bin/env bash
# One-shot GPU check: every GPU path of tiaoyu in one call, all figures in ONE JSON file.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]     # OUT_DIR default: $OUT, else ./gpu_check
#   bash benchmarks/gpu_check.sh --dry-run     # write the JSON with each step's command, run nothing
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh /tmp/gpu
#
# Steps (each under `timeout`; the whole script stays under 10 minutes on one GPU):
#   cuda_tests     pytest -m cuda (tests/test_cuda.py: CPU/GPU logits, KV cache, bf16 pretrain CLI)
#   data           synth corpus → tokenizer → token shards for the runs below
#   pretrain_bf16  benchmarks/bench_pretrain.py, preset small, bf16: tokens/s and MFU (+ nanoGPT fp32 ref)
#   torchrun_nccl  torchrun (1 process, 2 with 2+ GPUs) → tiaoyu pretrain on NCCL: tokens/s, MFU, loss
#   decode         benchmarks/bench_decode.py, preset small: tokens/s ours vs transformers
#   open           benchmarks/bench_open.py, SmolLM2-135M shape in bf16: sft/lora tokens/s and peak memory,
#                  decode tokens/s, ours vs transformers (+ PEFT)
#   fsdp           tiaoyu pretrain --fsdp on one GPU, when that option exists (else skipped, with the reason)
#
# Writes OUT_DIR/gpu_check.json (atomically) and OUT_DIR/logs/<step>.log. Without CUDA every step is
# recorded as skipped with reason "no CUDA" (that is what the CPU test checks).
# Exit status: 0 when no step failed, 1 when one failed or timed out, 2 for bad arguments.
set -u -o pipefail

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_check: $*" >&2; exit 2; }

DRY=0
OUT_DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY=1 ;;
    --) shift; [ $# -gt 0 ] && { [ -z "$OUT_DIR" ] || die "one output folder at most (got '$OUT_DIR' and '$1')"; OUT_DIR="$1"; shift; }
        [ $# -eq 0 ] || die "unexpected argument '$1'"; break ;;
    -*) die "unknown option '$1' (try --help)" ;;
    *) [ -z "$OUT_DIR" ] || die "one output folder at most (got '$OUT_DIR' and '$1')"; OUT_DIR="$1" ;;
  esac
  shift
done
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || die "python '$PY' not found (set PYTHON=…)"
[ -n "$OUT_DIR" ] || OUT_DIR="${OUT:-./gpu_check}"
[ -e "$OUT_DIR" ] && [ ! -d "$OUT_DIR" ] && die "output folder '$OUT_DIR' exists and is not a folder"
mkdir -p "$OUT_DIR/logs" || die "cannot create output folder '$OUT_DIR'"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
cd "$ROOT" || die "cannot enter $ROOT"

WORK="$OUT_DIR/work"
STEPS="$OUT_DIR/logs/steps.tsv"
: > "$STEPS"
T0=$(date +%s)

NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
NGPU=${NGPU:-0}
NPROC=1; [ "$NGPU" -ge 2 ] && NPROC=2
HAS_FSDP=0
"$PY" -m tiaoyu_cli pretrain --help 2>/dev/null | grep -q -- "--fsdp" && HAS_FSDP=1

# step NAME TIMEOUT_S COMMAND… : run it under timeout, log to logs/NAME.log, record one TSV row
# (name, status, rc, seconds, reason, command). A step is skipped when SKIP_REASON is set.
step() {
  local name="$1" limit="$2"; shift 2
  local cmd="$*" status rc t reason="${SKIP_REASON:-}"
  if [ -n "$reason" ]; then
    printf '%s\tskipped\t\t0\t%s\t%s\n' "$name" "$reason" "$cmd" >> "$STEPS"; return 0
  fi
  if [ "$DRY" = 1 ]; then
    printf '%s\tdry-run\t\t0\t\t%s\n' "$name" "$cmd" >> "$STEPS"; return 0
  fi
  echo "gpu_check: $name (limit ${limit}s)" >&2
  t=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "$cmd" > "$OUT_DIR/logs/$name.log" 2>&1
  rc=$?
  case $rc in 0) status=ok ;; 124|137) status=timeout; reason="ran past ${limit}s" ;; *) status=failed; reason="exit $rc" ;; esac
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(( $(date +%s) - t ))" "$reason" "$cmd" >> "$STEPS"
  [ $status = ok ]
}

if [ "$NGPU" -eq 0 ] && [ "$DRY" = 0 ]; then SKIP_REASON="no CUDA"; else SKIP_REASON=""; fi
TY="$PY -m tiaoyu_cli"
step cuda_tests 120 "$PY -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py"
DATA_OK=0
step data 60 "rm -rf '$WORK' && $TY synth '$WORK/synth' --text-mb 3 --records 200 \
  && $TY tokenize train '$WORK/synth/text.train.jsonl' -o '$WORK/tok' --vocab-size 2048 \
  && $TY tokenize encode '$WORK/synth/text.train.jsonl' -t '$WORK/tok' -o '$WORK/tokens' --val-ratio 0.02 -j 4" && DATA_OK=1
step pretrain_bf16 100 "$PY benchmarks/bench_pretrain.py --configs small --device cuda --dtype bf16 --rounds 2 --steps 20 --warmup 3"
SAVED_SKIP="$SKIP_REASON"
[ -z "$SKIP_REASON" ] && [ "$DRY" = 0 ] && [ "$DATA_OK" = 0 ] && SKIP_REASON="data step failed"
PRE="pretrain '$WORK/tokens' --preset small --seq-len 512 --batch-size 16 --max-steps 40 --log-every 10 --eval-every 0 \
  --save-every 40 --keep 1 --device cuda --dtype bf16 --warmup-steps 5"
step torchrun_nccl 90 "$PY -m torch.distributed.run --standalone --nproc_per_node $NPROC -m tiaoyu_cli $PRE -o '$WORK/ddp'"
if [ -z "$SKIP_REASON" ] && [ "$HAS_FSDP" = 0 ] && [ "$DRY" = 0 ]; then SKIP_REASON="tiaoyu pretrain has no --fsdp option yet"; fi
step fsdp 90 "$PY -m torch.distributed.run --standalone --nproc_per_node 1 -m tiaoyu_cli $PRE --fsdp --optim adamw -o '$WORK/fsdp'"
SKIP_REASON="$SAVED_SKIP"
step decode 60 "$PY benchmarks/bench_decode.py --device cuda --preset small --threads 0 --new-tokens 128 --rounds 3"
step open 150 "$PY benchmarks/bench_open.py --device cuda --dtype bf16 --steps 10 --warmup 3 --seq-len 512 --batch-size 8 \
  --new-tokens 128 --rounds 3 --threads 4"

# one JSON file: host facts, each step's status/rc/seconds, and the figures its output holds
"$PY" - "$OUT_DIR" "$STEPS" "$T0" "$NGPU" "$NPROC" "$DRY" <<'PYEOF'
import json, os, platform, subprocess, sys, time
from pathlib import Path

out, steps_tsv, t0, ngpu, nproc, dry = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1"


def last_json(path: Path):
    """The last line of a log that parses as a JSON object (the benchmarks print one)."""
    if not path.exists():
        return None
    for line in reversed(path.read_text(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def train_figures(run: Path):
    """Last logged training line of a pretrain run: loss, tokens/s, MFU."""
    m = run / "metrics.jsonl"
    if not m.exists():
        return None
    rows = [json.loads(l) for l in m.read_text().splitlines() if l.strip()]
    rows = [r for r in rows if "loss" in r and not r.get("eval")]
    if not rows:
        return None
    keep = ("step", "loss", "tokens_per_s", "mfu", "world_size")
    return {"first_loss": rows[0]["loss"], **{k: rows[-1][k] for k in keep if k in rows[-1]}}


steps = {}
for line in steps_tsv.read_text().splitlines():
    name, status, rc, secs, reason, cmd = (line.split("\t") + [""] * 6)[:6]
    s = {"status": status, "rc": int(rc) if rc else None, "seconds": int(secs or 0), "command": cmd}
    if reason:
        s["reason"] = reason
    log = out / "logs" / f"{name}.log"
    if log.exists():
        s["log"] = str(log.relative_to(out))
        if status != "ok":
            s["log_tail"] = log.read_text(errors="replace")[-2000:]
    fig = None
    if status == "ok":
        if name in ("pretrain_bf16", "decode", "open"):
            fig = last_json(log)
        elif name == "torchrun_nccl":
            fig = train_figures(out / "work" / "ddp")
            if fig is not None:
                fig.update(processes=nproc, backend="nccl")
        elif name == "fsdp":
            fig = train_figures(out / "work" / "fsdp")
        elif name == "cuda_tests":
            tail = log.read_text(errors="replace").strip().splitlines()
            fig = {"summary": tail[-1] if tail else ""}
    if fig is not None:
        s["figures"] = fig
    steps[name] = s

host = {"python": platform.python_version(), "machine": platform.machine(), "gpus": ngpu}
try:
    import torch
    host.update(torch=torch.__version__, cuda=torch.version.cuda,
                gpu_names=[torch.cuda.get_device_name(i) for i in range(ngpu)])
except Exception as e:  # noqa: BLE001 - a broken torch is itself a finding
    host["torch_error"] = repr(e)
try:
    host["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    pass
failed = [n for n, s in steps.items() if s["status"] in ("failed", "timeout")]
doc = {"check": "gpu", "dry_run": dry, "ok": not failed, "failed": failed, "seconds": int(time.time()) - t0,
       "host": host, "steps": steps}
tmp = out / ".gpu_check.json.tmp"
tmp.write_text(json.dumps(doc, indent=2) + "\n")
os.replace(tmp, out / "gpu_check.json")
print(json.dumps({"gpu_check": str(out / "gpu_check.json"), "ok": doc["ok"], "failed": failed,
                  "steps": {n: s["status"] for n, s in steps.items()}}))
sys.exit(1 if failed else 0)
PYEOF
