# recipes/pipeline.mk — the stage rules every recipe shares. A recipe sets the variables below
# (model preset, device, budgets, how to launch training) and includes this file.
#
# Each stage writes its own folder under $(OUT); make skips stages whose output exists, so an
# interrupted run continues where it stopped, and `make -f recipes/<r>/Makefile sft` reruns one
# stage (delete $(OUT)/sft first to redo it). SCALE multiplies every step budget.
TIAOYU   ?= tiaoyu
# how training stages launch (multi-gpu: torchrun … -m tiaoyu_cli)
TRAIN    ?= $(TIAOYU)
PYTHON   ?= python3
OUT      ?= runs/demo
SCALE    ?= 1
DEVICE   ?= cpu
# auto: bf16 autocast where the hardware is fast at it (CUDA with bf16, CPUs with AVX512-BF16 or AMX)
DTYPE    ?= auto
PRESET   ?= tiny
TEXT_MB  ?= 3
VOCAB    ?= 2048
SEQ      ?= 128
BATCH    ?= 16
PRETRAIN_STEPS ?= 1200
PRETRAIN_LR    ?= 0.002
SFT_STEPS      ?= 400
LORA_STEPS     ?= 400
RM_STEPS       ?= 200
DPO_STEPS      ?= 150
GRPO_STEPS     ?= 60
DISTILL_STEPS  ?= 300
REASON_STEPS   ?= 300
REASON_RL_STEPS ?= 40
TOOLS_STEPS    ?= 1200
TOOLS_MORE_STEPS ?= 300
TOOLS_DIRECT_STEPS ?= 600
TOOLS_GRPO_STEPS ?= 40
TOOLS_GRPO_PROMPTS ?= 32
# evaluate the first tool-SFT run every this many steps (besides its start and end; 0: only those two)
TOOLS_EVAL_EVERY ?= $(call steps,$(TOOLS_STEPS)/2)
# evaluate the direct-answer baseline every this many steps (besides its start and end; 0: only those two)
TOOLS_DIRECT_EVAL_EVERY ?= $(call steps,$(TOOLS_DIRECT_STEPS)/2)
# evaluate the agentic GRPO run every this many steps (besides its start and end; 0: only those two)
TOOLS_GRPO_EVAL_EVERY ?= $(call steps,$(TOOLS_GRPO_STEPS)/2)
# held-out problems in the agentic GRPO run's own evaluations (its row comes from the paired comparison on EVALN
# problems, so the figures do not depend on it)
TOOLS_GRPO_EVAL_SIZE ?= $(EVALN)
STUDENT  ?= --student-preset tiny --model dim=64 --model n_layers=2 --model n_heads=2 --model n_kv_heads=1 --model ffn_dim=192
RECIPE   ?= $(dir $(firstword $(MAKEFILE_LIST)))
RECIPES  := $(dir $(lastword $(MAKEFILE_LIST)))
D        := $(OUT)/data
steps     = $(shell $(PYTHON) -c "print(max(2, int($(1) * $(SCALE))))")
EVALN     = $(shell $(PYTHON) -c "print(max(8, int(400 * min(1.0, $(SCALE) * 4))))")
# the training seed of every stage (the synthetic data keeps seed 0): `SEED=1` is another draw of the same recipe
SEED     ?= 0
COMMON   := --device $(DEVICE) --dtype $(DTYPE) --seed $(SEED) --keep 1
# environment of the pretraining command alone (the tiny-cpu recipe gives it every core: nothing else can run
# beside it, and the losses are the same at any thread count)
PRETRAIN_ENV ?=

.PHONY: all data prep tokenizer tokens pretrain sft lora reward dpo grpo distill reason reason-rl tools tools-direct tools-grpo chat summary bench report clean

all: summary report

# 1. synthetic corpus: text, chat, preference, verifiable, reasoning, classification (+ val splits)
data: $(D)/manifest.json
$(D)/manifest.json:
	$(TIAOYU) synth $(D) --seed 0 --text-mb $(shell $(PYTHON) -c "print(max(0.3, round($(TEXT_MB) * min(1.0, $(SCALE) * 4), 2)))")

# 2. prep: clean + dedup the pretraining text (the synthetic text is clean; prep shows the counts)
prep: $(OUT)/prep/text.jsonl
$(OUT)/prep/text.jsonl: $(D)/manifest.json
	$(TIAOYU) prep $(D)/text.train.jsonl -o $@

# 3. tokenizer (BPE, byte fallback) and 4. token shards
tokenizer: $(OUT)/tok/tokenizer.model
$(OUT)/tok/tokenizer.model: $(OUT)/prep/text.jsonl
	$(TIAOYU) tokenize train $(OUT)/prep/text.jsonl $(D)/chat.train.jsonl $(D)/reasoning.train.jsonl -o $(OUT)/tok --vocab-size $(VOCAB)

tokens: $(OUT)/tokens/meta.json
$(OUT)/tokens/meta.json: $(OUT)/tok/tokenizer.model
	$(TIAOYU) tokenize encode $(OUT)/prep/text.jsonl --val $(D)/text.val.jsonl --tokenizer $(OUT)/tok -o $(OUT)/tokens --workers 2

# 5. pretrain the tiny model (~1.5M parameters)
pretrain: $(OUT)/base/latest/model.safetensors
$(OUT)/base/latest/model.safetensors: $(OUT)/tokens/meta.json
	$(PRETRAIN_ENV) $(TRAIN) pretrain $(OUT)/tokens -o $(OUT)/base --config $(RECIPE)pretrain.json $(COMMON) \
	  --preset $(PRESET) --seq-len $(SEQ) --batch-size $(BATCH) --lr $(PRETRAIN_LR) \
	  --max-steps $(call steps,$(PRETRAIN_STEPS)) --eval-every $(call steps,$(PRETRAIN_STEPS)/4)

# 6. supervised fine-tuning on chat (answer accuracy on held-out questions before → after)
sft: $(OUT)/sft/latest/model.safetensors
$(OUT)/sft/latest/model.safetensors: $(OUT)/base/latest/model.safetensors
	$(TRAIN) sft $(OUT)/base $(D)/chat.train.jsonl -o $(OUT)/sft --config $(RECIPE)sft.json $(COMMON) \
	  --eval-data $(D)/chat.val.jsonl --eval-samples $(EVALN) --batch-size $(BATCH) \
	  --max-steps $(call steps,$(SFT_STEPS)) --eval-every $(call steps,$(SFT_STEPS)/2)

# 7. LoRA on the same data from the base (a small fraction of the parameters), then merged
lora: $(OUT)/lora-merged/model.safetensors
$(OUT)/lora-merged/model.safetensors: $(OUT)/base/latest/model.safetensors
	$(TRAIN) lora $(OUT)/base $(D)/chat.train.jsonl -o $(OUT)/lora --rank 8 --alpha 16 $(COMMON) \
	  --eval-data $(D)/chat.val.jsonl --eval-samples $(EVALN) --lr 0.003 --batch-size $(BATCH) --max-steps $(call steps,$(LORA_STEPS)) --eval-every $(call steps,$(LORA_STEPS)/2)
	rm -rf $(OUT)/lora-merged
	$(TIAOYU) lora merge $(OUT)/base $(OUT)/lora -o $(OUT)/lora-merged

# 8. reward model on preference pairs (pairwise accuracy on held-out pairs)
reward: $(OUT)/rm/latest/model.safetensors
$(OUT)/rm/latest/model.safetensors: $(OUT)/sft/latest/model.safetensors
	$(TRAIN) rlhf reward $(OUT)/sft $(D)/preference.train.jsonl --val $(D)/preference.val.jsonl -o $(OUT)/rm $(COMMON) \
	  --lr 0.0005 --batch-size $(BATCH) --max-steps $(call steps,$(RM_STEPS)) --eval-every $(call steps,$(RM_STEPS)/2)

# 9. DPO from the SFT model (held-out preference accuracy and margin)
dpo: $(OUT)/dpo/latest/model.safetensors
$(OUT)/dpo/latest/model.safetensors: $(OUT)/sft/latest/model.safetensors
	$(TRAIN) rlhf dpo $(OUT)/sft $(D)/preference.train.jsonl --val $(D)/preference.val.jsonl -o $(OUT)/dpo --beta 0.1 $(COMMON) \
	  --lr 0.0002 --batch-size $(BATCH) --max-steps $(call steps,$(DPO_STEPS)) --eval-every $(call steps,$(DPO_STEPS)/2)

# 10. GRPO on verifiable arithmetic (held-out answer accuracy): 16 questions × 16 answers per optimizer step
# (measured: 4 × 16 split into four micro-steps of one group each moved 1.8 → 3.5 % in 150 steps, within
# noise; one step per 256 answers reached 10.8 % in 60)
grpo: $(OUT)/grpo/paired.json
$(OUT)/grpo/latest/model.safetensors: $(OUT)/sft/latest/model.safetensors
	$(TRAIN) rlhf grpo $(OUT)/sft $(D)/verifiable.train.jsonl --val $(D)/verifiable.val.jsonl -o $(OUT)/grpo $(COMMON) \
	  --group-size 16 --rollout-batch-size 16 --batch-size 16 --grad-accum 16 --eval-size $(EVALN) --lr 0.0003 \
	  --max-steps $(call steps,$(GRPO_STEPS)) --eval-every $(call steps,$(GRPO_STEPS)/2)

# the same held-out questions answered greedily before and after, compared pair by pair (recipes/paired.py)
$(OUT)/grpo/paired.json: $(OUT)/grpo/latest/model.safetensors
	$(PYTHON) $(RECIPES)paired.py $(OUT)/sft $(OUT)/grpo $(D)/verifiable.val.jsonl --tools none --n $(EVALN) -o $@.tmp && mv $@.tmp $@

# 11. white-box distillation of the SFT model into a smaller student
distill: $(OUT)/student/latest/model.safetensors
$(OUT)/student/latest/model.safetensors: $(OUT)/sft/latest/model.safetensors
	$(TRAIN) distill --teacher $(OUT)/sft $(STUDENT) \
	  $(D)/chat.train.jsonl --val $(D)/chat.val.jsonl -o $(OUT)/student --mode white $(COMMON) \
	  --eval-samples $(EVALN) --lr 0.003 --batch-size $(BATCH) --max-steps $(call steps,$(DISTILL_STEPS)) --eval-every $(call steps,$(DISTILL_STEPS)/2)

# 12. reasoning: think-format SFT on traces, then GRPO with verifiable rewards
reason: $(OUT)/reason/latest/model.safetensors
$(OUT)/reason/latest/model.safetensors: $(OUT)/sft/latest/model.safetensors
	$(TRAIN) reason $(OUT)/sft $(D)/reasoning.train.jsonl --eval-data $(D)/reasoning.val.jsonl -o $(OUT)/reason $(COMMON) \
	  --eval-samples $(EVALN) --lr 0.001 --batch-size $(BATCH) --max-steps $(call steps,$(REASON_STEPS)) --eval-every $(call steps,$(REASON_STEPS)/2)

reason-rl: $(OUT)/reason-rl/paired.json
$(OUT)/reason-rl/latest/model.safetensors: $(OUT)/reason/latest/model.safetensors
	$(TRAIN) reason --rl $(OUT)/reason $(D)/verifiable.train.jsonl --eval-data $(D)/verifiable.val.jsonl -o $(OUT)/reason-rl $(COMMON) \
	  --eval-samples $(EVALN) --lr 0.00005 --rollout-batch-size 16 --batch-size 32 --grad-accum 4 \
	  --max-steps $(call steps,$(REASON_RL_STEPS)) --eval-every $(call steps,$(REASON_RL_STEPS)/2)

$(OUT)/reason-rl/paired.json: $(OUT)/reason-rl/latest/model.safetensors
	$(PYTHON) $(RECIPES)paired.py $(OUT)/reason $(OUT)/reason-rl $(D)/verifiable.val.jsonl --tools none --n $(EVALN) -o $@.tmp && mv $@.tmp $@

# 13. tool use: SFT on calculator calls (held-out arithmetic answered with `--eval-tools calculator`) in two
# runs — TOOLS_STEPS at lr 3e-3, then 300 more at 1e-3 — the same questions answered directly by the same base
# fine-tuned without the tool, then agentic GRPO. The three SFT runs train with Muon: on the same bases it gets
# the model to copy the operands in far fewer steps than AdamW, and far more reliably across seeds (docs/tools.md)
TOOLS_SFT = --optim muon --pack --max-len 256 --eval-data $(D)/tools.val.jsonl --eval-tools calculator --eval-samples $(EVALN) \
	  --eval-max-new-tokens 64 --batch-size 8
tools: $(OUT)/tools/latest/model.safetensors
$(OUT)/tools-1/latest/model.safetensors: $(OUT)/base/latest/model.safetensors
	$(TRAIN) sft $(OUT)/base $(D)/tools.train.jsonl -o $(OUT)/tools-1 $(COMMON) $(TOOLS_SFT) \
	  --lr 0.003 --max-steps $(call steps,$(TOOLS_STEPS)) --eval-every $(TOOLS_EVAL_EVERY)
$(OUT)/tools/latest/model.safetensors: $(OUT)/tools-1/latest/model.safetensors
	$(TRAIN) sft $(OUT)/tools-1 $(D)/tools.train.jsonl -o $(OUT)/tools $(COMMON) $(TOOLS_SFT) --no-eval-before \
	  --lr 0.001 --max-steps $(call steps,$(TOOLS_MORE_STEPS)) --eval-every $(call steps,$(TOOLS_MORE_STEPS))

tools-direct: $(OUT)/tools-direct/latest/model.safetensors
$(OUT)/tools-direct/latest/model.safetensors: $(OUT)/base/latest/model.safetensors
	$(TRAIN) sft $(OUT)/base $(D)/tools-direct.train.jsonl -o $(OUT)/tools-direct $(COMMON) --optim muon --pack --max-len 256 \
	  --eval-data $(D)/tools.val.jsonl --eval-samples $(EVALN) --eval-max-new-tokens 64 \
	  --lr 0.003 --batch-size 8 --max-steps $(call steps,$(TOOLS_DIRECT_STEPS)) --eval-every $(TOOLS_DIRECT_EVAL_EVERY)

# agentic GRPO from the first tool-SFT run (tools-1, before its +300 steps): 32 questions × 8 answers per step (measured: 8 × 8
# left the accuracy within noise at any rate tried; a larger rate only hurt) at lr 2e-5 (from the Muon start 1e-4
# drifted: AdamW's noise outweighed the reward's signal; docs/tools.md has the figures), then the same held-out
# questions answered greedily before and after, compared pair by pair (recipes/paired.py: the summary's row
# takes before and after from it). Both runs that continue tools-1 skip their step-0 evaluation: tool SFT +300
# takes tools-1's last one as its before (summary.py's BEFORE_FROM), agentic GRPO the paired comparison's
tools-grpo: $(OUT)/tools-grpo/paired.json
$(OUT)/tools-grpo/latest/model.safetensors: $(OUT)/tools-1/latest/model.safetensors
	$(TRAIN) rlhf grpo $(OUT)/tools-1 $(D)/tools.train.jsonl --val $(D)/tools.val.jsonl -o $(OUT)/tools-grpo $(COMMON) \
	  --tools calculator --max-tool-calls 3 --max-new-tokens 64 --eval-size $(TOOLS_GRPO_EVAL_SIZE) --lr 0.00002 --no-eval-before \
	  --rollout-batch-size $(TOOLS_GRPO_PROMPTS) --group-size 8 --batch-size 16 --grad-accum $(shell echo $$(( $(TOOLS_GRPO_PROMPTS) / 2 ))) \
	  --max-steps $(call steps,$(TOOLS_GRPO_STEPS)) --eval-every $(TOOLS_GRPO_EVAL_EVERY)
$(OUT)/tools-grpo/paired.json: $(OUT)/tools-grpo/latest/model.safetensors
	$(PYTHON) $(RECIPES)paired.py $(OUT)/tools-1 $(OUT)/tools-grpo $(D)/tools.val.jsonl --n $(EVALN) -o $@.tmp && mv $@.tmp $@

# 14. talk to the result
chat: $(OUT)/chat.jsonl
$(OUT)/chat.jsonl: $(OUT)/sft/latest/model.safetensors $(OUT)/reason-rl/latest/model.safetensors
	$(TIAOYU) chat $(OUT)/sft --prompt "What is 3 + 4?" --temperature 0
	head -n 5 $(D)/verifiable.val.jsonl | $(TIAOYU) chat $(OUT)/reason-rl --temperature 0 > $@.tmp && mv $@.tmp $@

# what a run's figures depend on (OUT/settings.json); SPREAD: those figures measured over seeds and CPU
# capabilities at the same settings (recipes/spread.py), shown beside this run's when the settings match.
# COMMANDS fingerprints the recipe's commands (this file, the recipe's Makefile and its JSON configs, comments
# and blank lines left out): a spread measured with other commands is refused, not compared
RECIPE_FILES = $(RECIPES)pipeline.mk $(firstword $(MAKEFILE_LIST)) $(filter-out $(RECIPE)spread%,$(wildcard $(RECIPE)*.json))
COMMANDS := sha-$(shell $(PYTHON) -c "import hashlib, sys; h = hashlib.sha256(); [h.update(l.strip().encode() + b'\n') \
	for f in sys.argv[1:] for l in open(f, encoding='utf-8') if l.strip() and not l.strip().startswith('#')]; print(h.hexdigest()[:12])" \
	$(RECIPE_FILES))
SETTINGS = COMMANDS SEED SCALE EVALN DEVICE DTYPE PRESET TEXT_MB VOCAB SEQ BATCH PRETRAIN_STEPS PRETRAIN_LR SFT_STEPS LORA_STEPS RM_STEPS \
	DPO_STEPS GRPO_STEPS DISTILL_STEPS REASON_STEPS REASON_RL_STEPS TOOLS_STEPS TOOLS_MORE_STEPS TOOLS_DIRECT_STEPS \
	TOOLS_GRPO_STEPS TOOLS_GRPO_PROMPTS TOOLS_GRPO_EVAL_EVERY TOOLS_EVAL_EVERY TOOLS_DIRECT_EVAL_EVERY
SPREAD  ?= $(RECIPE)spread.json

# 15. one table: stage, metric, before → after ± standard error (also runs/demo/summary.json), and the loss curves.
# The order of its prerequisites is the order `make -j` starts the stages in: make walks this list and gives a
# free process slot to the next stage whose inputs are done, coming back to a stage skipped (inputs still
# training) only after it has walked the whole list once. With this order the demo's two cores stay busy to
# its last half-minute: beside tool SFT run chat SFT, lora, the direct baseline and then rlhf grpo; as tool SFT
# ends, reasoning, agentic GRPO and tool SFT +300 start, and the short stages fill the gaps (docs/demo.md)
summary: grpo reason tools-grpo tools sft reward reason-rl chat pretrain dpo distill lora tools-direct
	$(PYTHON) $(RECIPES)summary.py $(OUT) --spread $(SPREAD) --settings $(foreach v,$(SETTINGS),$(v)=$($(v)))
	-$(TIAOYU) eval plot $(OUT)/base $(OUT)/sft $(OUT)/lora $(OUT)/student $(OUT)/reason -o $(OUT)/curves.png

# 16. the benchmark of held-out facts (data/bench/, written by `tiaoyu synth`) on each language-model
# checkpoint, then one report card: stages before → after, curves, scores, flagged drops
BENCH_RUNS ?= base sft lora-merged dpo grpo student reason reason-rl
REPORT_RUNS ?= base sft lora rm dpo grpo student reason reason-rl
bench: $(foreach r,$(BENCH_RUNS),$(OUT)/bench/$(r).json)
# each benchmark as soon as its checkpoint is written (side by side with the training still running)
$(foreach r,$(BENCH_RUNS),$(eval $(OUT)/bench/$(r).json: $(if $(filter lora-merged,$(r)),$(OUT)/lora-merged/model.safetensors,$(OUT)/$(r)/latest/model.safetensors)))
$(OUT)/bench/%.json:
	$(TIAOYU) eval bench $(OUT)/$* $(D)/bench --task ceval --style cloze --device $(DEVICE) -o $@

report: $(OUT)/report/report.html
$(OUT)/report/report.html: bench | summary
	$(TIAOYU) report $(foreach r,$(REPORT_RUNS),$(OUT)/$(r)) $(foreach r,$(BENCH_RUNS),--bench $(OUT)/bench/$(r).json) -o $(OUT)/report

clean:
	rm -rf $(OUT)
