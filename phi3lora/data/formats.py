"""Chat records in the formats people have, each turned into messages [{"role", "content"}, ...].

The form is detected per record (a JSONL line, a JSON list item, a parquet/arrow row), so forms may be mixed:
  {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
      content may also be OpenAI's list of parts [{"type": "text", "text": "..."}, ...]: the text parts are joined
      with "\\n" (as vLLM does); any other part (an image, audio) is refused
  {"conversations": [{"from": "system" | "human" | "gpt", "value": "..."}, ...]}        ShareGPT
      "user" and "assistant" are accepted as "from" too; tool/function turns are refused
  {"text": "<|user|>\\n...<|end|>\\n<|assistant|>\\n...<|end|>\\n"}                      Phi-3's chat format as text
  {"prompt": "...", "completion": "..."}        a user turn and a reply; either may be a list of messages (TRL)
  {"instruction": "...", "input": "...", "output": "...", "system": "..."}             Alpaca
      input and system are optional; a non-empty input follows the instruction after a blank line

The checks that need the tokenizer (special-token text inside a message, text the tokenizer cannot take) are made
once, on the token ids, in data_store.py.
"""
from __future__ import annotations

import re

from phi3lora.phi3mini.tokenizer import ROLES, check_messages

# roles a record may use; whether the tokenizer's chat format has them is checked when it encodes (Phi-4-mini: tool)
RECORD_ROLES = ROLES + ("tool",)


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file (and line or row) and what is wrong."""


# "<|role|>\n{content}<|end|>\n" blocks of a Phi-3 chat string (the newline after each special token is optional:
# Phi-3's special tokens absorb it anyway)
_TURN = re.compile(r"<\|(system|user|assistant)\|>\n?(.*?)<\|end\|>\n?", re.DOTALL)
_SPECIAL = re.compile(r"<\|[a-z0-9_]+\|>")
_PHI3_TAG = re.compile(r"<\|(system|user|assistant|end|endoftext|placeholder\d+)\|>")  # Phi-3's special tokens

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
FORMS = ('expected a "messages", "text" or "prompt" + "completion" field, or ShareGPT "conversations", or Alpaca '
         '"instruction" + "output"')


def parse_phi3_text(text: str) -> list[dict]:
    """A string in Phi-3's chat format back into messages; ValueError if it is not in that format."""
    s = text.strip()
    if s.startswith("<s>"):
        s = s[3:].lstrip()
    if s.endswith("<|endoftext|>"):
        s = s[: -len("<|endoftext|>")].rstrip()
    messages, pos = [], 0
    for m in _TURN.finditer(s):
        if m.start() != pos:
            break
        tag = _PHI3_TAG.search(m.group(2))
        if tag:  # the turn swallowed the next one: trained as reply text, the model would learn to emit <|user|>
            raise ValueError(f"{tag.group(0)} inside the {m.group(1)} turn at character {m.start(2) + tag.start()} "
                             f"(a missing <|end|>?)")
        messages.append({"role": m.group(1), "content": m.group(2)})
        pos = m.end()
    if pos != len(s) or not messages:
        rest = s[pos:pos + 40]
        tag = _SPECIAL.match(rest)
        if tag and tag.group(0) not in ("<|system|>", "<|user|>", "<|assistant|>"):
            raise ValueError(f"unknown role tag {tag.group(0)} in text at character {pos}")
        raise ValueError(f"text is not in Phi-3's chat format at character {pos} ({rest!r}...): expected "
                         "'<|user|>\\n...<|end|>\\n' / '<|assistant|>\\n...<|end|>\\n' / '<|system|>...' blocks")
    return messages


def _text_of_parts(parts: list, i: int) -> str:
    """OpenAI content parts -> the text parts joined with newlines; other parts are refused."""
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            what = f"a {kind!r} part" if kind else f"{part!r:.60}"
            raise ValueError(f"message {i} content part {j} is {what}: only {{\"type\": \"text\", \"text\": ...}} "
                             "parts are read (this is a text model)")
        texts.append(part["text"])
    return "\n".join(texts)


def _openai_messages(messages: list) -> list:
    # content given as a list of parts becomes a string; everything else is checked by check_messages
    out = []
    for i, msg in enumerate(messages):
        if isinstance(msg, dict) and isinstance(msg.get("content"), list):
            msg = {"role": msg.get("role"), "content": _text_of_parts(msg["content"], i)}
        out.append(msg)
    return out


def _sharegpt_messages(turns) -> list[dict]:
    if not isinstance(turns, list):
        raise ValueError(f'"conversations" must be a list, got {type(turns).__name__}')
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f'conversations turn {i} must be an object with "from" and "value", got {turn!r:.80}')
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"conversations turn {i} is from {turn['from']!r}: only system, human and gpt turns "
                             "are read (tool and function turns have no place in Phi-3's chat format)")
        out.append({"role": role, "content": turn["value"]})
    return out


def _alpaca_messages(obj: dict) -> list[dict]:
    for key in ("instruction", "input", "output", "system"):
        if key in obj and obj[key] is not None and not isinstance(obj[key], str):
            raise ValueError(f'"{key}" must be a string, got {type(obj[key]).__name__}')
    prompt = obj["instruction"]
    if obj.get("input") and obj["input"].strip():
        prompt = f"{prompt}\n\n{obj['input']}"
    system = [{"role": "system", "content": obj["system"]}] if obj.get("system") else []
    return system + [{"role": "user", "content": prompt}, {"role": "assistant", "content": obj["output"]}]


def _as_messages(value, role: str, what: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise ValueError(f'"{what}" must be a string or a list of messages, got {type(value).__name__}')


def record_to_messages(obj) -> list[dict]:
    """One record (a parsed JSON object or a table row) in any of the forms above -> messages; ValueError says
    what is wrong (the caller adds the file and line)."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if obj.get("messages") is not None:
        messages = obj["messages"]
        if not isinstance(messages, list):
            raise ValueError(f'"messages" must be a list, got {type(messages).__name__}')
        messages = _openai_messages(messages)
    elif obj.get("conversations") is not None:
        messages = _sharegpt_messages(obj["conversations"])
    elif obj.get("text") is not None:
        if not isinstance(obj["text"], str):
            raise ValueError(f'"text" must be a string, got {type(obj["text"]).__name__}')
        messages = parse_phi3_text(obj["text"])
    elif obj.get("prompt") is not None and obj.get("completion") is not None:
        messages = _as_messages(obj["prompt"], "user", "prompt") + \
            _as_messages(obj["completion"], "assistant", "completion")
        messages = _openai_messages(messages)
    elif obj.get("instruction") is not None and obj.get("output") is not None:
        messages = _alpaca_messages(obj)
    else:
        raise ValueError(f"{FORMS}, got keys {sorted(obj)}")
    checked = check_messages(messages, RECORD_ROLES)
    # a system message's "tools" (Phi-4-mini's format) travels with it; every other key is dropped
    return [{"role": role, "content": content, **({"tools": m["tools"]} if m.get("tools") is not None else {})}
            for (role, content), m in zip(checked, messages)]


__all__ = ["DataError", "parse_phi3_text", "record_to_messages", "SHAREGPT_ROLES"]
