"""The Hugging Face back-end of the tokenizer interface: a folder's `tokenizer.json` (the `tokenizers`
library), its special tokens looked up by role, and its own Jinja chat template.

The interface is the one `Tokenizer` (core.py, SentencePiece) offers and the rest of tiaoyu uses:

    encode(text, bos=False, eos=False)   bos=True: the ids `AutoTokenizer(text)` gives (the post-processor
                                         adds BOS where the folder's tokenizer does); False: no specials added
    decode(ids, skip_special=True)       as transformers decodes (clean_up_tokenization_spaces honoured)
    bos_id, eos_id, pad_id, unk_id       by role: tokenizer_config.json, special_tokens_map.json, then
                                         generation_config.json / config.json ids; None when the folder has none
    stop_ids                             end of a chat turn: eos and every `eos_token_id` of generation_config.json
    im_start_id, im_end_id,              the markers by their text when the vocabulary has them, else None
    tool_call_id, …
    think_id, end_think_id               <think>, </think> when the folder adds them as tokens, else None (text tags)
    render_chat / encode_chat            the folder's template (`chat_template.jinja`, or tokenizer_config.json
                                         `chat_template`), rendered in a sandbox as transformers renders it,
                                         encoded as `apply_chat_template(…, tokenize=True)` encodes it
    document_affixes()                   the ids around each document of a pretraining corpus (token shards)
    fingerprint                          16 hex chars of sha256 over tokenizer.json + tokenizer_config.json

The assistant-only loss mask of `encode_chat` comes from the template itself, for any template: the
`{% generation %}` blocks where the template marks them, else each assistant turn is found by rendering
the conversation up to its generation prompt (the learned span starts where that prefix ends) and runs
through its first end-of-turn token.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import Iterable, Sequence

from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.io import read_json
from tiaoyu_cli.tokenizer.core import TokenizerBase, str_items
from tiaoyu_cli.tokenizer.template import IM_END, IM_START, TOOL_TOKENS, check_messages

TOKENIZER_JSON = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP = "special_tokens_map.json"
TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG = "generation_config.json"
# files a tokenizer folder may hold besides tokenizer.json; copied unchanged when the tokenizer is saved
TOKENIZER_FILES = (TOKENIZER_JSON, CONFIG_FILE, SPECIAL_MAP, TEMPLATE_FILE, "added_tokens.json", "vocab.json",
                   "merges.txt", "tokenizer.model")
ROLES = ("bos", "eos", "pad", "unk")
END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>")  # the document separators of open vocabularies


def is_hf_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / TOKENIZER_JSON).is_file()


def _read_json(path: Path) -> dict:
    """An optional JSON object file of the folder: {} when it is absent, a clear error when it is malformed."""
    if not path.is_file():
        return {}
    d = read_json(path)
    if not isinstance(d, dict):
        raise TiaoyuError(f"{path} must hold a JSON object")
    return d


def _token_text(v) -> str | None:
    """A special token as tokenizer_config.json / special_tokens_map.json write it: a string or {"content": …}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) and v else None


def _ids(v) -> list[int]:
    if v is None:
        return []
    if isinstance(v, list):
        return [int(x) for x in v if x is not None]
    return [int(v)]


def clean_up_spaces(text: str) -> str:
    """transformers' `clean_up_tokenization_spaces`: no space before punctuation and English contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class HFTokenizer(TokenizerBase):
    """A tokenizer.json folder behind the `Tokenizer` interface (module docstring). `HFTokenizer.load(folder)`.

    `self.tk` is the encoder: a `tokenizers.Tokenizer` here; spfolder.py puts a SentencePiece model behind the same
    few calls (token_to_id, id_to_token, get_vocab_size, get_added_tokens_decoder, encode, encode_batch, decode)."""

    backend = "hf"  # a Hugging Face folder's tokenizer: specials by role, its own template
    main_file = TOKENIZER_JSON  # the file that holds the vocabulary (fingerprinted with tokenizer_config.json)

    def __init__(self, files: dict[str, bytes], path: Path | None = None, generation: dict | None = None,
                 model_config: dict | None = None):
        self.path = path
        self._files = dict(files)
        self._generation = dict(generation or {})
        self._model_config = dict(model_config or {})
        self.config = json.loads(files[CONFIG_FILE]) if CONFIG_FILE in files else {}
        special_map = json.loads(files[SPECIAL_MAP]) if SPECIAL_MAP in files else {}
        self.tk = self._make_encoder(files, str(path / self.main_file) if path else self.main_file, special_map)
        self.fingerprint = hashlib.sha256(files[self.main_file] + files.get(CONFIG_FILE, b"")).hexdigest()[:16]
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        added = self.tk.get_added_tokens_decoder()  # {id: AddedToken}
        self.special_ids = frozenset(i for i, t in added.items() if t.special)

        # special tokens by role: their text from tokenizer_config.json, then special_tokens_map.json
        self.special_tokens: dict[str, str] = {}
        for role in ROLES:
            text = _token_text(self.config.get(f"{role}_token")) or _token_text(special_map.get(f"{role}_token"))
            if text is not None and self.tk.token_to_id(text) is not None:
                self.special_tokens[f"{role}_token"] = text
        for key in ("sep_token", "cls_token", "mask_token"):
            text = _token_text(self.config.get(key)) or _token_text(special_map.get(key))
            if text is not None:
                self.special_tokens[key] = text

        def role_id(role: str) -> int | None:
            text = self.special_tokens.get(f"{role}_token")
            if text is not None:
                return self.tk.token_to_id(text)
            for source in (self._generation, self._model_config):  # ids, when no text names the token
                got = _ids(source.get(f"{role}_token_id"))
                if got and 0 <= got[0] < self.vocab_size:
                    return got[0]
            return None

        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (role_id(r) for r in ROLES)
        turn_ends = _ids(self._generation.get("eos_token_id")) or _ids(self._model_config.get("eos_token_id"))
        stops = [i for i in [self.eos_id, *turn_ends] if i is not None and 0 <= i < self.vocab_size]
        self.stop_ids = frozenset(stops)  # where a chat answer ends
        # markers by their text, when the vocabulary has them (None otherwise)
        self.im_start_id = self.tk.token_to_id(IM_START)
        self.im_end_id = self.tk.token_to_id(IM_END)
        # think tags count as tokens only when the folder adds them (Qwen3, DeepSeek-R1); otherwise a model writes
        # them as text, and reasoning is split from the answer on the text
        self.think_id, self.end_think_id = (i if i in added else None for i in
                                            (self.tk.token_to_id("<think>"), self.tk.token_to_id("</think>")))
        self.tool_call_id, self.end_tool_call_id, self.tool_response_id, self.end_tool_response_id = (
            self.tk.token_to_id(t) for t in TOOL_TOKENS)
        self._tool_markers = (self.tool_call_id in added and self.end_tool_call_id in added)
        self.chat_template = self._template()
        self._compiled = None
        self._tool_layout: tuple[str, str] | str | None = None  # (text before, after a result) or why not
        self._affixes: tuple[list[int], list[int]] | None = None

    def _make_encoder(self, files: dict[str, bytes], where: str, special_map: dict):
        from tokenizers import Tokenizer as _Fast

        try:
            return _Fast.from_str(files[TOKENIZER_JSON].decode("utf-8"))
        except Exception as e:  # tokenizers raises its own Exception type on a bad file
            raise TiaoyuError(f"{where} is not a valid tokenizers file ({e})") from None

    def _encode_with_offsets(self, text: str):
        """The encoding of rendered chat text, no specials added: `.ids` and `.offsets` (character spans)."""
        return self.tk.encode(text, add_special_tokens=False)

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def load(cls, path: str | os.PathLike) -> "HFTokenizer":
        """A folder holding tokenizer.json (and usually tokenizer_config.json, special_tokens_map.json,
        chat_template.jinja); generation_config.json and config.json beside them supply ids by role."""
        folder = Path(path)
        if folder.is_file() and folder.name == cls.main_file:
            folder = folder.parent
        if not (folder / cls.main_file).is_file():
            raise TiaoyuError(f"{folder}: no {cls.main_file}")
        files = {name: (folder / name).read_bytes() for name in TOKENIZER_FILES if (folder / name).is_file()}
        for name in (CONFIG_FILE, SPECIAL_MAP):
            if name in files:
                _read_json(folder / name)  # a clear error for a malformed file
        return cls(files, folder, _read_json(folder / GENERATION_CONFIG), _read_json(folder / "config.json"))

    def save(self, folder: str | os.PathLike) -> Path:
        """Copy the tokenizer files unchanged into `folder` (generation_config.json belongs to the model)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.path is not None and folder.resolve() == Path(self.path).resolve():
            return folder
        from tiaoyu_cli.io import atomic_write_bytes

        for name, data in self._files.items():
            atomic_write_bytes(folder / name, data)
        return folder

    def __getstate__(self):  # picklable for DataLoader workers: the files travel as bytes
        return {"files": self._files, "path": self.path, "generation": self._generation, "model": self._model_config}

    def __setstate__(self, state):
        self.__init__(state["files"], state["path"], state["generation"], state["model"])

    @property
    def model_max_length(self) -> int:
        n = self.config.get("model_max_length")
        return int(n) if isinstance(n, (int, float)) and n < 10 ** 9 else 1 << 20

    @property
    def generation_config(self) -> dict:
        """The folder's generation_config.json (written back unchanged with the model)."""
        return dict(self._generation)

    @property
    def num_special(self) -> int:  # no fixed block of special ids here: see is_special
        return 0

    def is_special(self, i: int) -> bool:
        return int(i) in self.special_ids

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Text -> ids. bos=True: what `AutoTokenizer(text)` gives (the folder's post-processor adds BOS, if it
        does); eos=True appends the eos id. Added tokens written in the text are matched, as transformers does."""
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        ids = self.tk.encode(text, add_special_tokens=bos).ids
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False,
                     num_threads: int = 0) -> list[list[int]]:
        texts = str_items(texts, "encode_batch")
        out = [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=bos)]
        if eos and self.eos_id is not None:
            for ids in out:
                ids.append(self.eos_id)
        return out

    def document_affixes(self) -> tuple[list[int], list[int]]:
        """(prefix, suffix): the ids that go around every document of a pretraining corpus. First what the folder's
        post-processor adds around a text — as `tokenizer(text)` in transformers: Llama 3's <|begin_of_text|>,
        nothing for Qwen — then, unless that already ends with one, the token that separates documents: the
        end-of-text token (<|endoftext|> of Qwen and GPT-2, <|end_of_text|> of Llama 3) when the vocabulary has it
        as a special token (an instruct model's eos is its end of turn instead), else the eos token."""
        if self._affixes is None:
            probe = "a b"
            plain = self.tk.encode(probe, add_special_tokens=False).ids
            full = self.tk.encode(probe, add_special_tokens=True).ids
            at = next((k for k in range(len(full) - len(plain) + 1) if full[k:k + len(plain)] == plain), None)
            where = str(self.path / self.main_file) if self.path else self.main_file
            if not plain or at is None:
                raise TiaoyuError(f"{where}: its post-processor changes the text's own ids, so documents cannot be "
                                  "joined as `tokenizer(text)` encodes them")
            prefix, suffix = full[:at], full[at + len(plain):]
            ends = [i for i in (self.tk.token_to_id(t) for t in END_OF_TEXT) if i is not None and i in self.special_ids]
            sep = ends[0] if ends else self.eos_id
            if sep is not None and not (suffix and suffix[-1] in (sep, self.eos_id)):
                suffix = suffix + [sep]
            if not prefix and not suffix:
                raise TiaoyuError(f"{where}: no end-of-text, eos or bos token to tell one document from the next "
                                  "(tokenizer_config.json names none)")
            self._affixes = (prefix, suffix)
        return list(self._affixes[0]), list(self._affixes[1])

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        for i in ids:
            if i < 0:
                raise TiaoyuError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        # an open model's embedding often has rows past the tokenizer's vocabulary (Qwen: 151936 rows, 151665
        # tokens); a model that emits one gets no text for it, as in transformers
        text = self.tk.decode([i for i in ids if i < self.vocab_size], skip_special_tokens=skip_special)
        if self.config.get("clean_up_tokenization_spaces"):
            text = clean_up_spaces(text)
        return text

    def id_to_piece(self, i: int) -> str:
        if not 0 <= int(i) < self.vocab_size:
            raise TiaoyuError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return self.tk.id_to_token(int(i))

    def piece_to_id(self, piece: str) -> int | None:
        return self.tk.token_to_id(piece)

    def is_byte(self, i: int) -> bool:
        p = self.tk.id_to_token(int(i)) or ""
        return len(p) == 6 and p.startswith("<0x") and p.endswith(">")

    # ------------------------------------------------------------------ chat template
    def _template(self) -> str | None:
        if TEMPLATE_FILE in self._files:
            return self._files[TEMPLATE_FILE].decode("utf-8")
        t = self.config.get("chat_template")
        if isinstance(t, list):  # named templates: the default one
            named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
            t = named.get("default")
        return t if isinstance(t, str) and t else None

    def _tool_template(self) -> str | None:
        t = self.config.get("chat_template")
        if isinstance(t, list):
            return {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}.get("tool_use")
        return None

    # ------------------------------------------------------------------ tool calls
    # Calls are read in the Hermes format that Qwen2.5, Qwen3, SmolLM3 and Hermes models write —
    # <tool_call>{"name": …, "arguments": {…}}</tool_call>, both markers single tokens — and the conversation
    # (the call, the tool's result, the next turn) is rendered back by the folder's own template.
    def _layout(self) -> tuple[str, str] | str:
        """(text the template writes between </tool_call> and a tool result, text after the result through the
        next assistant generation prompt), or a sentence saying why this folder cannot run tools."""
        if self._tool_layout is not None:
            return self._tool_layout
        self._tool_layout = self._probe_tools()
        return self._tool_layout

    def _probe_tools(self) -> tuple[str, str] | str:
        if not self._tool_markers:
            return ("its vocabulary has no <tool_call> and </tool_call> tokens: tiaoyu reads tool calls in the "
                    "Hermes format (Qwen2.5, Qwen3, SmolLM3, Hermes models), not this model's")
        template = self._tool_template() or self.chat_template
        if template is None:
            return "it has no chat template"
        kw = dict(self.special_tokens)
        user = [{"role": "user", "content": "hi"}]
        schema = [{"type": "function", "function": {"name": "probe", "description": "d",
                                                    "parameters": {"type": "object", "properties": {}}}}]
        sentinel = "TIAOYU7f3aRESULT"
        conv = user + [{"role": "assistant", "content": "",
                        "tool_calls": [{"id": "call_1", "type": "function",
                                        "function": {"name": "probe", "arguments": {}}}]},
                       {"role": "tool", "tool_call_id": "call_1", "name": "probe", "content": sentinel}]
        try:
            if render_template(template, user, schema, True, kw) == render_template(template, user, None, True, kw):
                return "its chat template does not render tools"
            text = render_template(template, conv, schema, True, kw)
        except TiaoyuError as e:
            return f"its chat template cannot render a tool call and its result ({e})"
        end = self.tk.id_to_token(self.end_tool_call_id)
        at = text.find(sentinel)
        cut = text.rfind(end, 0, max(at, 0))
        if at < 0 or cut < 0 or text.count(sentinel) != 1:
            return "its chat template does not render a tool call and its result"
        return text[cut + len(end):at], text[at + len(sentinel):]

    @property
    def has_tool_tokens(self) -> bool:
        return not isinstance(self._layout(), str)

    def require_tool_tokens(self) -> None:
        why = self._layout()
        if isinstance(why, str):
            where = str(self.path) if self.path else "this tokenizer"
            raise TiaoyuError(f"{where} cannot run tool calls: {why}")

    @property
    def tool_stop_ids(self) -> frozenset[int]:
        """Where a generation round with tools pauses: the end of a turn, or a finished call."""
        self.require_tool_tokens()
        return self.stop_ids | {self.end_tool_call_id}

    def tool_turn_ids(self, result: str) -> list[int]:
        """The ids the folder's template puts between a call's </tool_call> and the model's next turn: the end
        of the assistant turn, the tool turn holding `result`, the next assistant generation prompt."""
        self.require_tool_tokens()
        before, after = self._layout()
        return self.tk.encode(before + result + after, add_special_tokens=False).ids

    @property
    def assistant_start_ids(self) -> list[int]:
        """The template's generation prompt: the ids that open an assistant turn."""
        user = [{"role": "user", "content": "hi"}]
        bare = self.render_chat(user)
        full = self.render_chat(user, add_generation_prompt=True)
        return self.tk.encode(full[len(bare):] if full.startswith(bare) else "", add_special_tokens=False).ids

    def _check_messages(self, messages, tools=None) -> None:
        check_messages(messages, tools)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False,
                    tools: list[dict] | None = None, **template_kwargs) -> str:
        """The folder's chat template rendered as transformers' `apply_chat_template(…, tokenize=False)` does."""
        self._check_messages(messages, tools)
        return render_template(self._get_template(tools), messages, tools, add_generation_prompt,
                               {**self.special_tokens, **template_kwargs})

    def _get_template(self, tools):
        template = (tools and self._tool_template()) or self.chat_template
        if template is None:
            where = str(self.path) if self.path else "this tokenizer"
            raise TiaoyuError(f"{where} has no chat template (tokenizer_config.json chat_template or "
                              f"{TEMPLATE_FILE}): use --mode complete")
        return template

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False,
                    tools: list[dict] | None = None, **template_kwargs) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) of a conversation: ids as `apply_chat_template(…, tokenize=True)`; loss_mask 1 on what
        the model must produce after each assistant generation prompt, through its end-of-turn token."""
        self._check_messages(messages, tools)
        template = self._get_template(tools)
        kw = {**self.special_tokens, **template_kwargs}
        spans: list[tuple[int, int]] = []
        text = render_template(template, messages, tools, add_generation_prompt, kw, spans)
        enc = self._encode_with_offsets(text)
        ids = enc.ids
        if not spans:
            spans = self._assistant_spans(template, messages, tools, text, kw)
        mask = [0] * len(ids)
        for start, end in spans:
            for k, (a, b) in enumerate(enc.offsets):
                if b > start and a < end and b > a:
                    mask[k] = 1
                elif a == b == start and ids[k] in self.stop_ids:  # a zero-width match at the span's start
                    mask[k] = 1
        return ids, mask

    def _assistant_spans(self, template: str, messages: list[dict], tools, text: str, kw: dict) -> list[tuple[int, int]]:
        """Character spans of the assistant turns in `text`: from the end of the conversation rendered up to that
        turn's generation prompt, through the turn's first end-of-turn token (or the turn's own end)."""
        stop_texts = [self.tk.id_to_token(i) for i in sorted(self.stop_ids)]
        spans = []
        for k, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            before = render_template(template, messages[:k], tools, True, kw)
            if not text.startswith(before):
                raise TiaoyuError(f"chat template of {self.path or 'this tokenizer'}: the conversation up to "
                                  f"message {k} does not render as a prefix of the whole one; cannot tell "
                                  "which tokens the assistant said")
            upto = render_template(template, messages[:k + 1], tools, False, kw)
            end = len(upto) if text.startswith(upto) else len(text)
            ends = [text.find(s, len(before)) for s in stop_texts if s]
            ends = [e + len(s) for e, s in zip(ends, stop_texts) if 0 <= e < end]
            spans.append((len(before), min(ends) if ends else end))
        return spans


# ---- the sandboxed Jinja renderer ---------------------------------------------------------------------

_ENV = None


def _env():
    """One ImmutableSandboxedEnvironment set up as transformers sets up its own: trim_blocks, lstrip_blocks,
    loop controls, the `generation` block, `raise_exception`, `strftime_now` and a `tojson` that keeps
    non-ASCII characters and takes indent/separators/sort_keys."""
    global _ENV
    if _ENV is not None:
        return _ENV
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """`{% generation %}…{% endgeneration %}`: renders its body and records where it landed."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_mark", [nodes.Name("_tiaoyu_track", "load")]), [], [], body
                                   ).set_lineno(lineno)

        def _mark(self, track, caller):
            text = caller()
            if isinstance(track, _Track):  # rendering with spans asked for: where this block starts and ends
                start = sum(len(b) for b in track.blocks)
                track.spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):
        """`namespace(…)` that refuses underscore names (no reaching into Python internals)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = Namespace
    _ENV = env
    return env


_COMPILED: dict[str, object] = {}


def render_template(template: str, messages: list[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = False, variables: dict | None = None,
                    spans: list[tuple[int, int]] | None = None) -> str:
    """Render a chat template the way transformers does: messages without None-valued keys, a message's
    `reasoning` also given as `reasoning_content` and `thinking`, the special tokens and `variables` as
    template variables. `spans` (a list) receives the character spans of `{% generation %}` blocks."""
    import jinja2

    compiled = _COMPILED.get(template)
    if compiled is None:
        try:
            compiled = _env().from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise TiaoyuError(f"chat template: syntax error at line {e.lineno} ({e.message})") from None
        _COMPILED[template] = compiled
    msgs = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        if isinstance(m.get("tool_calls"), list):  # templates index a call's arguments as a mapping
            m["tool_calls"] = [_arguments_as_object(c) for c in m["tool_calls"]]
        reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        msgs.append(m)
    track = _Track() if spans is not None else None
    try:
        parts = compiled.generate(messages=msgs, tools=tools, add_generation_prompt=add_generation_prompt,
                                  _tiaoyu_track=track, **(variables or {}))
        if track is None:
            text = "".join(parts)
        else:  # streamed, so a generation block knows how much was written before it
            for part in parts:
                track.blocks.append(part)
            text = "".join(track.blocks)
            spans.extend(track.spans)
    except jinja2.TemplateError as e:
        raise TiaoyuError(f"chat template: {e}") from None
    return text


def _arguments_as_object(call):
    """An OpenAI call whose `arguments` is JSON text, with the arguments parsed (as transformers' templates
    expect: `tool_call.arguments | tojson`); anything else unchanged."""
    if not isinstance(call, dict):
        return call
    f = call.get("function") if isinstance(call.get("function"), dict) else None
    args = (f or call).get("arguments")
    if not isinstance(args, str):
        return call
    try:
        parsed = json.loads(args)
    except ValueError:
        return call
    if not isinstance(parsed, dict):
        return call
    if f is not None:
        return {**call, "function": {**f, "arguments": parsed}}
    return {**call, "arguments": parsed}


class _Track:
    """What a rendering with `{% generation %}` spans keeps: the output so far and the spans found."""

    def __init__(self):
        self.blocks: list[str] = []
        self.spans: list[tuple[int, int]] = []


def copy_hf_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
