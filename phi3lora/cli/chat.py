"""Talk to Phi-3-mini (or the built-in tiny demo model), with or without a LoRA adapter.

    python chat.py --model microsoft/Phi-3-mini-4k-instruct --adapter out/my-run/adapter
    python chat.py --model tiny --prompt "hello"                   # one reply, then exit
    printf 'hello\\nwhat is lora?\\n' | python chat.py --model tiny  # one reply line per input line

In a chat: /reset clears the history, /system TEXT sets the system message (and resets), /exit or Ctrl-D quits,
Ctrl-C stops the reply being generated (at the prompt it quits). When the history no longer fits the context
(max_position_embeddings - max_new_tokens), the oldest turns are dropped with a notice; the system message stays.

The prompt is rendered by `Tokenizer.encode_chat`, the renderer train.py trains on, so the prompt ids of a
conversation are exactly the prefix the adapter saw in training. Generation is `phi3mini.generate` (prefill, then
one token at a time against a KV cache under torch.inference_mode()); this file only wires it to a terminal.
Replies, and nothing else, go to stdout; notices, --stats and errors go to stderr (a reply cut short by
--max-new-tokens is followed there by `[cut at --max-new-tokens N]`).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from phi3lora import console
from phi3lora.cli.options import DEFAULT_MODEL, add_model_flags
from phi3lora.console import ArgumentParser
from phi3lora.phi3mini import Phi3, Tokenizer, default_stop_ids, generate, hub

# Phi-3's chat markers: a reply shown or kept in the history never contains them, even spelled out in plain text.
MARKERS = ("<|endoftext|>", "<|assistant|>", "<|system|>", "<|user|>", "<|end|>")
HELP = "commands: /reset (clear the history), /system TEXT (set the system message and reset), /exit"


class ChatError(Exception):
    """A problem the user can fix: printed as `error: ...`, exit code 2."""


class BrokenModel(Exception):
    """The model computes non-finite logits: no reply can be trusted, so the session ends (`error: ...`, exit 2)."""


def refuse_non_finite_logits(model: Phi3) -> None:
    """Make every forward pass of model check its logits (B, T, V): NaN or inf there means broken weights (an
    adapter trained at too high a learning rate, a damaged checkpoint) or an overflow, and greedy decoding would
    otherwise print an empty or garbage reply and exit 0. One device-to-host read per token, next to the one
    generate does anyway."""
    def check(module, args, logits):
        if not bool(torch.isfinite(logits).all()):
            raise BrokenModel("the model computes NaN or infinite logits, so it cannot reply: its weights or the "
                              "adapter's hold non-finite or huge values (an adapter trained with too high an --lr?); "
                              "try without --adapter, another checkpoint, or --dtype float32")

    model.register_forward_hook(check)


# ----- command line ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description="Chat with Phi-3-mini, with or without a LoRA adapter.",
                                epilog=f"In a chat, {HELP}. Ctrl-C stops a reply; Ctrl-D quits.")
    add_model_flags(p, default=DEFAULT_MODEL)
    p.add_argument("--adapter", help="LoRA adapter folder (ours, from train.py, or a PEFT one)")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the weights (in fp32, cast once)")
    p.add_argument("--system", help="system message")
    p.add_argument("--prompt", help="answer this one message, print the reply and exit")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest reply in tokens (default 512; 64 with --model tiny, whose random weights "
                        "rarely stop by themselves)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--stats", action="store_true", help="print time to first token and tokens/s to stderr")
    p.add_argument("--quantize", choices=hub.QUANTIZE_CHOICES, default="none", type=hub.quantize_name,
                   help="nf4: a 4-bit base (the decoder projections quantized while loading, as train.py --quantize); "
                        "none: as stored (default)")
    p.add_argument("--max-context", type=int, default=None,
                   help="tokens of prompt + reply to keep (default and maximum: the model's max_position_embeddings)")
    args = p.parse_args(argv)
    if args.max_new_tokens is None:
        args.max_new_tokens = 64 if args.model == "tiny" else 512
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    if not 0 <= args.temperature < math.inf:  # also refuses nan, which every comparison calls false
        p.error(f"--temperature must be a number >= 0 (0 is greedy), not {args.temperature}")
    if not 0 < args.top_p <= 1:
        p.error("--top-p must be in (0, 1]")
    if args.max_context is not None and args.max_context < 1:
        p.error(f"--max-context must be at least 1 token (leave it out for the model's whole context), "
                f"not {args.max_context}")
    if args.top_k < 0:
        p.error("--top-k must be >= 0")
    if args.merge and not args.adapter:
        p.error("--merge needs --adapter")
    return args


# ----- loading ---------------------------------------------------------------------------------------------------
def load(args, stderr=None) -> tuple[Phi3, Tokenizer]:
    """The model (with the adapter, merged if asked) and the tokenizer from the same checkpoint."""
    try:
        model, tokenizer = hub.load(args.model, args.device, args.dtype, args.quantize)
    except hub.LoadError as e:
        raise ChatError(str(e)) from None
    if args.adapter:
        load_adapter(model, args.adapter, merge=args.merge, stderr=stderr or sys.stderr)
    refuse_non_finite_logits(model)
    return model.eval(), tokenizer


def load_adapter(model: Phi3, adapter_dir: str, merge: bool, stderr=None) -> None:
    """lora's load_adapter_for_cli, its failure a ChatError."""
    from phi3lora import lora

    try:
        lora.load_adapter_for_cli(model, adapter_dir, merge=merge, stderr=stderr)
    except lora.AdapterError as e:
        raise ChatError(str(e)) from None


# ----- the conversation ------------------------------------------------------------------------------------------
def build_messages(system: str | None, turns: list[tuple[str, str]], user: str) -> list[dict]:
    """Chat messages for the next reply: the system message, earlier (user, reply) turns, then the new message."""
    messages = [{"role": "system", "content": system}] if system else []
    for u, a in turns:
        messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return messages + [{"role": "user", "content": user}]


def fit_prompt(tokenizer: Tokenizer, system: str | None, turns: list[tuple[str, str]], user: str,
               limit: int) -> tuple[list[int], int]:
    """Prompt ids for the next reply, and how many of the oldest turns had to go for it to fit in `limit` tokens.
    Raises ChatError when even the system message and the new message alone do not fit."""
    for dropped in range(len(turns) + 1):
        try:
            ids = tokenizer.encode_chat(build_messages(system, turns[dropped:], user), add_generation_prompt=True)
        except ValueError as e:  # a blank --prompt: check_messages names the message
            raise ChatError(str(e)) from None
        if len(ids) <= limit:
            return list(ids), dropped
    raise ChatError(f"the message is too long: {len(ids)} prompt tokens, but only {limit} fit "
                    "(the context minus --max-new-tokens)")


class Scrubber:
    """Removes Phi-3's chat markers and surrounding whitespace from streamed text. Holds back any tail that could
    still become a marker (or trailing whitespace), so what it has let out never needs to be taken back."""

    def __init__(self):
        self.buf, self.started = "", False

    def push(self, text: str) -> str:
        self.buf += text
        while any(m in self.buf for m in MARKERS):
            for m in MARKERS:
                self.buf = self.buf.replace(m, "")
        if not self.started:
            self.buf = self.buf.lstrip()
            self.started = bool(self.buf)
        keep = len(self.buf) - len(self.buf.rstrip())
        for m in MARKERS:
            keep = max(keep, next((k for k in range(len(m) - 1, 0, -1) if self.buf.endswith(m[:k])), 0))
        out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out

    def flush(self) -> str:
        out, self.buf = self.buf.rstrip(), ""
        return out


class Chat:
    """A conversation: the history, the commands, and one streamed reply per user message."""

    def __init__(self, model: Phi3, tokenizer: Tokenizer, args, stdout, stderr):
        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.stdout, self.stderr = stdout, stderr
        self.system = args.system if args.system and args.system.strip() else None  # blank: none, as with /system
        self.turns: list[tuple[str, str]] = []  # (user message, reply) pairs
        max_pos = model.config.max_position_embeddings
        context = min(args.max_context or max_pos, max_pos)
        self.limit = context - args.max_new_tokens  # prompt tokens that leave room for a full reply
        if self.limit < 1:
            raise ChatError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in a context "
                            f"of {context} tokens")
        self.stop_ids = default_stop_ids(model, tokenizer)
        device = next(model.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(args.seed)

    def notice(self, text: str) -> None:
        console.info(f"[{text}]", file=self.stderr)

    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        name, _, rest = line.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.turns = []
            self.notice("history cleared")
        elif name == "/system":
            self.system, self.turns = rest.strip() or None, []
            self.notice(f"system message {'set' if self.system else 'removed'}; history cleared")
        else:
            self.notice(f"unknown command {name}; {HELP}")
        return True

    def ask(self, user: str) -> str:
        """Stream the reply to `user` to stdout, add the turn to the history, return the reply."""
        ids, dropped = fit_prompt(self.tokenizer, self.system, self.turns, user, self.limit)
        if dropped:
            self.notice(f"the conversation no longer fits in {self.limit} prompt tokens: dropped the oldest "
                        f"{dropped} turn{'s' if dropped > 1 else ''}")
            self.turns = self.turns[dropped:]
        reply = self.reply(ids)
        if reply:  # an empty assistant message cannot be rendered (check_messages): that turn is not kept
            self.turns.append((user, reply))
        else:
            self.notice("empty reply: this turn is not kept in the history")
        return reply

    def reply(self, ids: list[int]) -> str:
        decoder, scrub, shown, times = self.tokenizer.stream_decoder(skip_special_tokens=True), Scrubber(), [], []
        last: list[int] = []  # the newest token: a stop id, or the reply ran into --max-new-tokens

        def show(text: str) -> None:
            if text:
                shown.append(text)
                self.stdout.write(text)
                self.stdout.flush()

        def on_token(token: int) -> None:
            times.append(time.perf_counter())
            last[:] = [token]
            if token not in self.stop_ids:
                show(scrub.push(decoder.push(token)))

        a = self.args
        start = time.perf_counter()
        try:
            generate(self.model, ids, a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                     stop_ids=self.stop_ids, generator=self.generator, on_token=on_token)
            interrupted = False
        except KeyboardInterrupt:  # Ctrl-C: keep what was shown, back to the prompt
            interrupted = True
        show(scrub.push(decoder.flush()))
        show(scrub.flush())
        self.stdout.write("\n")
        self.stdout.flush()
        if interrupted:
            self.notice("interrupted")
        elif len(times) >= a.max_new_tokens and last and last[0] not in self.stop_ids:
            # on stderr: stdout holds the reply and nothing else (its last line is the reply's last line)
            self.notice(f"cut at --max-new-tokens {a.max_new_tokens}")
        if a.stats and times:
            n, ttft = len(times), times[0] - start
            decode = f", decode {(n - 1) / (times[-1] - times[0]):.1f} tokens/s" if n > 1 else ""
            console.info(f"[stats] {len(ids)} prompt tokens, time to first token {ttft * 1000:.0f} ms, {n} new "
                         f"tokens in {times[-1] - start:.2f} s: {n / (times[-1] - start):.1f} tokens/s{decode}",
                         file=self.stderr)
        return "".join(shown)


def read_line(stdin, stdout, interactive: bool) -> str:
    """The next input line without its newline; EOFError at the end."""
    if interactive and stdin is sys.stdin and stdout is sys.stdout:
        return input("> ")  # line editing through readline
    if interactive:
        stdout.write("> ")
        stdout.flush()
    line = stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\r\n")


def run_chat(chat: Chat, stdin, stdout) -> int:
    interactive = stdin.isatty()
    if interactive:
        chat.notice(f"chatting with {chat.args.model}"
                    f"{' + adapter ' + chat.args.adapter if chat.args.adapter else ''}; {HELP}; Ctrl-D quits")
        try:  # importing readline gives input() line editing and history
            import readline  # noqa: F401
        except ImportError:
            pass
    while True:
        try:
            line = read_line(stdin, stdout, interactive)
        except (EOFError, KeyboardInterrupt):
            if interactive:
                stdout.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        try:
            if text.startswith("/"):
                if not chat.command(text):
                    return 0
            else:
                chat.ask(text)
        except ChatError as e:
            console.error(str(e), file=chat.stderr)


def check_streams(args, stdin, stdout) -> None:
    """A closed stdin (`<&-`) or stdout (`>&-`) is None in sys: say so before loading anything."""
    if stdout is None:
        raise ChatError("stdout is closed: there is nowhere to write the replies (run without >&-)")
    if stdin is None and args.prompt is None:
        raise ChatError("stdin is closed: pass --prompt TEXT, or give the messages on stdin (one per line)")


def quiet_broken_pipe(stdout) -> int:
    """The reader of stdout went away (`| head -c 1`): stop without a word, as Unix tools do (they die of
    SIGPIPE, which the shell reports as 128 + 13). Later flushes of sys.stdout, at exit too, go to /dev/null
    instead of raising again."""
    if stdout is sys.__stdout__ and stdout is not None:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stdout.fileno())
        except (OSError, ValueError):
            pass
    return 128 + 13


def main(argv=None, stdin=None, stdout=None, stderr=None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    stderr = stderr or sys.stderr or open(os.devnull, "w")
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage and the error
        return int(e.code or 0)
    try:
        check_streams(args, stdin, stdout)
        model, tokenizer = load(args, stderr)
        chat = Chat(model, tokenizer, args, stdout, stderr)
        if args.prompt is not None:
            chat.ask(args.prompt)
            return 0
        return run_chat(chat, stdin, stdout)
    except (ChatError, BrokenModel) as e:
        console.error(str(e), file=stderr)
        return 2
    except BrokenPipeError:
        return quiet_broken_pipe(stdout)
    except KeyboardInterrupt:
        try:
            stdout.write("\n")
        except (OSError, AttributeError):
            pass
        return 130


if __name__ == "__main__":
    sys.exit(main())
