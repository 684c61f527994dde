"""`tiaoyu chat`: talk to a checkpoint — a REPL, one answer (`--prompt`), or JSONL in → JSONL out.

    tiaoyu chat ckpt/sft                                   # REPL on a terminal (/reset, /system TEXT, /exit)
    tiaoyu chat ckpt/sft --prompt "1+1=?" --temperature 0  # one answer on stdout
    tiaoyu chat teacher/ < prompts.jsonl > teacher.jsonl   # batch: each record + {"response": …}
    tiaoyu chat ckpt/sft --tools calculator                # the model may call tools (infer/tool_loop.py)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from tiaoyu_cli.cli.common import config_options
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.infer.tools import ToolOptions

EXAMPLES = """
Examples:

  tiaoyu chat ckpt/sft                                  # interactive, tokens stream

  tiaoyu chat ckpt/sft --prompt "What is 12 + 7?" --temperature 0

  tiaoyu chat ckpt/base --mode complete --prompt "Once upon a time"

  tiaoyu chat teacher/ < prompts.jsonl > answers.jsonl  # batch, one line out per line in

  tiaoyu chat ckpt/reason --prompt "3 * 14 = ?" --hide-thinking

  tiaoyu chat ckpt/sft-rag --retrieve index/ --rag --prompt "王丽住在哪里？"   # passages before the question
  tiaoyu chat ckpt/tools --tools calculator --prompt "What is 123 * 456?" --temperature 0

  tiaoyu chat ckpt/tools --tools calculator,search --tools-module my_tools.py < q.jsonl   # + "tool_calls"
"""


def register(app: typer.Typer) -> None:
    @app.command("chat", epilog=EXAMPLES, help="Chat with a checkpoint: REPL, --prompt, or JSONL prompts on stdin.")
    @config_options(ToolOptions, name="tool", skip=("tool_call_penalty",))
    def chat(
        ckpt: Path = typer.Argument(..., help="checkpoint folder (a step folder, or a run folder: its latest)"),
        prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="answer this once, print to stdout, exit"),
        system: Optional[str] = typer.Option(None, help="system prompt (chat mode)"),
        mode: str = typer.Option("auto", help="auto | chat | complete (auto: complete for a pretrain checkpoint)"),
        max_new_tokens: int = typer.Option(256, help="most tokens per answer"),
        temperature: float = typer.Option(0.7, help="0 = greedy"),
        top_k: int = typer.Option(0, help="sample from the k most likely tokens (0 = off)"),
        top_p: float = typer.Option(0.9, help="nucleus sampling mass (1 = off)"),
        repetition_penalty: float = typer.Option(1.0, help="CTRL penalty on tokens already present (1 = off)"),
        seed: Optional[int] = typer.Option(None, help="random seed (same seed, same answers)"),
        device: str = typer.Option("auto", help="auto | cpu | cuda | mps"),
        batch_size: int = typer.Option(16, help="prompts generated together in JSONL mode"),
        hide_thinking: bool = typer.Option(False, "--hide-thinking", help="do not show <think> reasoning"),
        adapter: Optional[Path] = typer.Option(None, "--adapter", help="apply this LoRA adapter (tiaoyu lora) to CKPT"),
        classify: bool = typer.Option(False, "--classify", help="label text with a classifier checkpoint "
                                      "(sft --task classify): --prompt TEXT, or JSONL {\"text\"} on stdin"),
        quantize: str = typer.Option("none", "--quantize", help="none | int8 (weight-only int8 Linear layers, CPU)"),
        retrieve: Optional[str] = typer.Option(None, "--retrieve", help="documents to search: an index folder "
                                               "(tiaoyu index) or a JSONL file of {\"text\"} records"),
        rag: bool = typer.Option(False, "--rag", help="put the top passages for each question into the prompt "
                                 "(the RAG layout of tiaoyu_cli/data/rag.py)"),
        retrieve_k: int = typer.Option(3, "--retrieve-k", help="passages retrieved per question"),
        tool_schemas: Optional[bool] = typer.Option(None, "--tool-schemas/--no-tool-schemas",
                                                    help="render the tools' schemas in the system turn. Default: "
                                                    "as the checkpoint was trained (trainer.json), else on"),
        *,
        tool: ToolOptions,
    ) -> None:
        from tiaoyu_cli.infer.sampling import SamplingParams
        from tiaoyu_cli.infer.session import GenerationOptions, load_chat_model

        if classify:  # the classifier's side of chat
            return classify_cli(ckpt, prompt, device, batch_size, adapter)

        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty)
        if max_new_tokens < 1:
            raise TiaoyuError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        if batch_size < 1:
            raise TiaoyuError(f"--batch-size must be >= 1, got {batch_size}")
        options = GenerationOptions(max_new_tokens=max_new_tokens, sampling=params, seed=seed)
        from tiaoyu_cli.infer.retrieval import make_search, open_retriever, rag_options
        from tiaoyu_cli.infer.tools import use_search

        wants_search = "search" in [t.strip() for t in (tool.tools or "").split(",")]
        rewrite = rag_options(retrieve, rag, retrieve_k, search_tool=wants_search)  # None without --retrieve/--rag
        if wants_search and retrieve is not None:
            use_search(make_search(open_retriever(retrieve), retrieve_k))
        from tiaoyu_cli.console import warn as _warn

        cm = load_chat_model(ckpt, device=device, mode=mode, adapter=adapter, on_warning=_warn)
        if quantize != "none":  # model/quant.py
            from tiaoyu_cli.model.quant import quantize_model

            quantize_model(cm.model, quantize)
        if system and cm.mode == "complete":
            from tiaoyu_cli.console import warn

            warn("--system is ignored in complete mode (plain text continuation; --mode chat to use it)")
        if tool.wanted:
            schemas = tool_schemas if tool_schemas is not None else cm.tool_schemas is not False
            return tools_chat(cm, tool, schemas, prompt, system, options, batch_size)
        try:
            if prompt is not None:
                answer_once(cm, prompt, system, options, hide_thinking, rewrite)
            elif sys.stdin.isatty():
                repl(cm, system, options, hide_thinking, rewrite)
            else:
                answer_jsonl(cm, sys.stdin.buffer, system, options, batch_size, rewrite)
        except KeyboardInterrupt:
            raise typer.Exit(130) from None


def _describe(cm) -> str:
    n = cm.model.num_parameters()
    stage = f"stage {cm.stage}, " if cm.stage else ""
    return f"{cm.path} ({n / 1e6:.2f}M parameters, {stage}{cm.mode} mode, {cm.device})"


def answer_once(cm, prompt: str, system: Optional[str], options, hide_thinking: bool, rewrite=None) -> None:
    """Stream one answer to stdout; reasoning (if any) between <think> and </think> unless hidden."""
    from tiaoyu_cli.infer.session import ChatSession

    session = ChatSession(cm, system=system, options=options, rewrite_user=rewrite)
    out = sys.stdout
    in_think = False
    for piece in session.send(prompt):
        if piece.reasoning and hide_thinking:
            continue
        if piece.reasoning != in_think:
            out.write("<think>" if piece.reasoning else "</think>")
            in_think = piece.reasoning
        out.write(piece.text)
        out.flush()
    if in_think and session.last is not None and "</think>" in session.last.response:
        out.write("</think>")  # the model closed its reasoning but wrote no answer after it
    out.write("\n")
    out.flush()


def repl(cm, system: Optional[str], options, hide_thinking: bool, rewrite=None) -> None:
    from tiaoyu_cli.console import console
    from tiaoyu_cli.infer.session import ChatSession

    session = ChatSession(cm, system=system, options=options, rewrite_user=rewrite)
    console.print(f"[bold]tiaoyu chat[/] {_describe(cm)}", highlight=False)
    console.print("[dim]/reset  /system TEXT  /exit  /help[/]")
    who = "you" if cm.mode == "chat" else "text"
    while True:
        try:
            line = console.input(f"[bold green]{who} ›[/] ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            break
        if not line.strip():
            continue
        try:
            cmd = session.handle_command(line)
        except TiaoyuError as e:
            console.print(f"[red]{e}[/]", highlight=False, markup=True)
            continue
        if cmd == "exit":
            break
        if cmd == "help":
            for c, what in session.COMMANDS.items():
                console.print(f"  {c:<14} {what}", highlight=False, markup=False)
            continue
        if cmd is not None:
            console.print(f"[dim]({cmd}: conversation cleared"
                          + (f"; system prompt: {session.system!r}" if cmd == "system" else "") + ")[/]",
                          highlight=False)
            continue
        console.print("[bold blue]bot ›[/] ", end="")
        try:
            for piece in session.send(line):
                if piece.reasoning:
                    if not hide_thinking:
                        console.out(piece.text, style="dim", end="", highlight=False)
                else:
                    console.out(piece.text, end="", highlight=False)
        except KeyboardInterrupt:
            console.print("[dim] (interrupted)[/]", end="")
        console.print()
        if session.dropped_turns:
            console.print(f"[dim](the {session.dropped_turns} oldest turn(s) no longer fit the context and were "
                          "forgotten)[/]")


def answer_jsonl(cm, stream, system: Optional[str], options, batch_size: int, rewrite=None) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tiaoyu_cli.console import console
    from tiaoyu_cli.data.jsonl import dumps
    from tiaoyu_cli.infer.session import answer_records, read_prompt_records

    records = read_prompt_records(stream, "<stdin>")
    if rewrite is not None:  # --retrieve … --rag: the asked user turn gets its passages
        from tiaoyu_cli.infer.retrieval import rag_record

        records = [(line, rag_record(rec, rewrite)) for line, rec in records]
    console.print(f"chat: {len(records)} prompt(s) → stdout, {_describe(cm)}", highlight=False, markup=False)
    out = sys.stdout.buffer
    progress = Progress(TextColumn("answering"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True, disable=not console.is_terminal)
    with progress:
        task = progress.add_task("answer", total=len(records))
        for rec in answer_records(cm, records, options, system=system, batch_size=batch_size,
                                  on_batch=lambda n: progress.advance(task, n)):
            out.write(dumps(rec))
            out.flush()


def classify_cli(ckpt: Path, text: Optional[str], device: str, batch_size: int, adapter: Optional[Path] = None) -> None:
    """`tiaoyu chat CKPT --classify`: one label for --prompt TEXT (stdout), or for every {"text"} record of
    JSONL on stdin (the record + "label" + "probs"; a record's own "label" is kept as "input_label", and the
    accuracy against those is reported on stderr)."""
    from tiaoyu_cli.console import say
    from tiaoyu_cli.data.jsonl import dumps
    from tiaoyu_cli.infer.session import read_prompt_records
    from tiaoyu_cli.checkpoint import load_model, load_tokenizer, resolve_checkpoint
    from tiaoyu_cli.train.objectives.classify import classify_texts
    from tiaoyu_cli.device import resolve_device
    from tiaoyu_cli.errors import DataError

    if adapter is not None:
        raise TiaoyuError("--adapter does not combine with --classify")
    if batch_size < 1:
        raise TiaoyuError(f"--batch-size must be >= 1, got {batch_size}")
    path = resolve_checkpoint(ckpt)
    model, path = load_model(path, device=resolve_device(device))
    if not model.config.num_labels:
        raise TiaoyuError(f"{path} has no classification head: train one with `tiaoyu sft BASE DATA --task classify`")
    tok = load_tokenizer(path)
    model.eval()
    if text is not None:
        res = classify_texts(model, tok, [text])[0]
        say("  ".join(f"{k} {v:.3f}" for k, v in res["probs"].items()))
        sys.stdout.write(res["label"] + "\n")
        return
    if sys.stdin.isatty():
        raise TiaoyuError("--classify: give --prompt TEXT, or JSONL records {\"text\": …} on stdin")
    records = read_prompt_records(sys.stdin.buffer, "<stdin>")
    texts = []
    for line, rec in records:
        t = rec.get("text")
        if not isinstance(t, str) or not t.strip():
            raise DataError("expected a non-empty string", "<stdin>", line, "text")
        texts.append(t)
    results = classify_texts(model, tok, texts, batch_size=batch_size)
    out = sys.stdout.buffer
    right = labelled = 0
    for (line, rec), res in zip(records, results):
        rec = dict(rec)
        if "label" in rec:
            labelled += 1
            right += str(rec["label"]).strip() == res["label"]
            rec["input_label"] = rec["label"]
        rec["label"], rec["probs"] = res["label"], res["probs"]
        out.write(dumps(rec))
    out.flush()
    say(f"classify: {len(records)} record(s) labelled by {path}"
        + (f"; accuracy {right / labelled:.3f} on the {labelled} that carried a label" if labelled else ""))


def tools_chat(cm, tool: ToolOptions, schemas: bool, prompt, system, options, batch_size: int) -> None:
    """chat with tools: --prompt, REPL or JSONL, the calls shown (REPL, --prompt: on stderr) or listed."""
    from tiaoyu_cli.console import console
    from tiaoyu_cli.infer.session import ContextError, context_budget
    from tiaoyu_cli.infer.tool_loop import ToolRunner
    from tiaoyu_cli.infer.tools import ToolCall

    if cm.mode != "chat":
        raise TiaoyuError("--tools needs chat mode (a checkpoint trained on conversations; or --mode chat)")
    runner = ToolRunner(cm.model, cm.tokenizer, tool.toolbox(), tool.max_tool_calls, schemas)
    history: list[dict] = [{"role": "system", "content": system}] if system else []

    def turn(text: str, out) -> None:
        history.append({"role": "user", "content": text})
        n, context = len(runner.prompt(history)), cm.model.config.max_seq_len
        if n > context_budget(context, options.max_new_tokens):  # an error, never a silent cut
            note = ""
            if runner.schemas:
                bare = len(cm.tokenizer.encode_chat(history, add_generation_prompt=True)[0])
                note = f" (the tools' schemas take {n - bare} of them; --no-tool-schemas leaves them out)"
            del history[-1]
            raise ContextError(n, context, options.max_new_tokens, note)
        for ev in runner.stream(history, options.max_new_tokens, options.sampling, options.seed):
            if isinstance(ev, ToolCall):
                console.print(f"[dim]→ {ev.name}({ev.arguments}) = {ev.result}[/]", highlight=False, markup=True)
            else:
                out(ev.text)
        if runner.last.finish == "tool_limit":
            console.print(f"[dim](stopped: more than --max-tool-calls {tool.max_tool_calls} calls)[/]")

    try:
        if prompt is not None:
            turn(prompt, lambda t: (sys.stdout.write(t), sys.stdout.flush()))
            sys.stdout.write("\n")
        elif sys.stdin.isatty():
            console.print(f"[bold]tiaoyu chat[/] {_describe(cm)}, tools: {', '.join(runner.toolbox.tools)}",
                          highlight=False)
            while True:
                try:
                    line = console.input("[bold green]you ›[/] ")
                except (EOFError, KeyboardInterrupt):
                    console.print()
                    break
                if line.strip() in ("/exit", "/quit"):
                    break
                if line.strip() == "/reset":
                    del history[1 if system else 0:]
                    continue
                if line.strip():
                    console.print("[bold blue]bot ›[/] ", end="")
                    turn(line, lambda t: console.out(t, end="", highlight=False))
                    console.print()
        else:
            _tools_jsonl(cm, runner, system, options, batch_size)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _tools_jsonl(cm, runner, system, options, batch_size: int) -> None:
    from tiaoyu_cli.console import console
    from tiaoyu_cli.data.jsonl import dumps
    from tiaoyu_cli.infer.session import read_prompt_records
    from tiaoyu_cli.infer.tool_loop import answer_records_with_tools

    records = read_prompt_records(sys.stdin.buffer, "<stdin>")
    console.print(f"chat: {len(records)} prompt(s) → stdout, {_describe(cm)}, tools: "
                  f"{', '.join(runner.toolbox.tools)}", highlight=False, markup=False)
    out = sys.stdout.buffer
    for rec in answer_records_with_tools(runner, records, options, system=system, batch_size=batch_size):
        out.write(dumps(rec))
        out.flush()
