"""Tiny Hugging Face tokenizer folders for the open-model tests, built here (nothing is downloaded):
a byte-level BPE trained on a few sentences, saved through transformers' PreTrainedTokenizerFast with

  qwen    ChatML (<|im_start|>role\\n…<|im_end|>), a default system prompt, tools as JSON (tojson),
          <think>reasoning</think> in assistant turns; no BOS; eos <|im_end|>, pad <|endoftext|>;
          generation_config eos_token_id [<|im_end|>, <|endoftext|>]; template in chat_template.jinja
  llama3  <|begin_of_text|> added by the post-processor and by the template, <|start_header_id|>role
          <|end_header_id|>\\n\\n…<|eot_id|>; generation_config eos_token_id [<|end_of_text|>, <|eot_id|>];
          template in tokenizer_config.json `chat_template`; `raise_exception` on a bad conversation
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog. What is 12 + 7? It is 19.",
    "你好，世界！今天天气很好。我们一起学习语言模型。",
    "system user assistant tool You are a helpful assistant.",
    "def add(a, b):\n    return a + b\n",
    '{"name": "calculator", "arguments": {"expression": "1+1"}}',
] * 4

QWEN_TEMPLATE = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' }}
{%- if message.reasoning_content is defined %}{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}{%- endif %}
{{- message.content + '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'assistant' %}
{{- raise_exception('Conversations must start with a user or system message') }}
{%- endif %}
{%- for message in messages %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# the llama3 layout with the assistant's part marked, for transformers' return_assistant_tokens_mask
LLAMA3_GENERATION_TEMPLATE = """{{- bos_token }}
{%- for message in messages %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
{%- if message['role'] == 'assistant' %}
{%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}
{%- else %}
{{- message['content'] | trim + '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_EXTRA = ["<think>", "</think>", "<tool_call>", "</tool_call>"]  # added, not special (as in Qwen)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


# Qwen2's split (transformers' Qwen2Tokenizer rebuilds its pipeline with this, whatever tokenizer.json says)
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
              r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def _bpe(specials: list[str], vocab_size: int, qwen_split: bool = False):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if qwen_split:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def make_qwen_tokenizer(folder: Path, vocab_size: int = 400) -> Path:
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    tok = _bpe(QWEN_SPECIALS, vocab_size, qwen_split=True)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_EXTRA])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = QWEN_TEMPLATE
    folder = Path(folder)
    fast.save_pretrained(folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    ids = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ids, "pad_token_id": ids[1]}))
    return folder


def make_llama3_tokenizer(folder: Path, vocab_size: int = 400, template: str = LLAMA3_TEMPLATE) -> Path:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _bpe(LLAMA3_SPECIALS, vocab_size)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    folder = Path(folder)
    fast.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template  # the transformers 4.x place for it
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["clean_up_tokenization_spaces"] = True
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    ids = [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")]
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": ids}))
    return folder


def auto_tokenizer(folder: Path):
    import warnings

    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(str(folder))
