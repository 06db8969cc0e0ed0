"""The Phi family's tokenizers and chat formats over the `tokenizers` library.

Phi-4-mini's tokenizer.json is a byte-level BPE (GPT-4o's family) and needs nothing more. Phi-3-mini uses Llama 2's
SentencePiece BPE (32000 pieces, byte fallback) plus eleven added tokens at 32000-32010. Its tokenizer.json does
SentencePiece's "▁" handling in the normalizer (prepend "▁", spaces become "▁"), with no pre-tokenizer, so every
stretch of text between two added tokens is normalized on its own: the text right after a special token starts with
"▁" (SentencePiece's "legacy" behaviour, the one tokenizer.json, transformers' fast tokenizer and llama.cpp share).
All added tokens but <|endoftext|> are rstrip tokens: the whitespace after them
("\\n" in the chat format) is absorbed into the token.

The chat format comes from the checkpoint (chat_format.py): Phi-3's "<|role|>\\n{content}<|end|>\\n" per message
and "<|assistant|>\\n" for a generation prompt, or Phi-4-mini's, the same without the newlines and with tools in
the system turn; the eos token closes a training example. No BOS: the current templates have no bos_token, so
transformers' `apply_chat_template(..., tokenize=True)` adds none and neither does `encode_chat`. The
chat_template found in tokenizer_config.json is kept (and written back by save_pretrained) but not executed: the
format is rendered in Python, so it needs no Jinja.

Conversations are encoded message by message (`render_message` renders one). Every message starts and ends at an
added token, which is also where the `tokenizers` library splits the whole rendered string, so the concatenation
equals the ids of the rendered string (what transformers produces), and the position of every message's tokens is
known exactly. Training labels come from those positions: phi3lora.data's `ChatEncoder` builds them (and refuses
special-token text inside a content). Here, as in transformers, special-token text inside a message's content
("<|end|>") is read as that special token.

Like Phi-3's own, the tokenizer is lossless except for U+2581 ("▁") in the text, which decodes as a space.

Deviation: `Tokenizer.tiny()` builds a small deterministic vocabulary in code (no download; phi3mini/tiny.py) with
Phi-3's ids for <unk>, <s>, </s>, the 256 byte tokens and the added tokens; its other ids are unused filler pieces.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer as _Backend

from phi3lora import atomic
from .chat_format import BASE_ROLES as ROLES
from .chat_format import EOS_TOKEN, PHI3_ADDED_TOKENS  # noqa: F401  (their home is chat_format; named here too)
from .chat_format import END_TOKEN, PHI3_CHAT_TEMPLATE, PHI4_CHAT_TEMPLATE, for_checkpoint
from .download import find_folder
from .tiny import tiny_tokenizer_config, tiny_tokenizer_json

IGNORE = -100  # label of a token the loss must not see (torch's cross_entropy ignore_index); defined here only



def check_messages(messages, roles: Sequence[str] = ROLES) -> list[tuple[str, str]]:
    """A conversation [{"role", "content"}, ...] -> [(role, content), ...]; ValueError naming the bad message.
    Roles are system, user and assistant (and those `roles` adds, e.g. Phi-4-mini's tool); content a string with
    something besides whitespace (whitespace alone would vanish into the newline after <|role|>: an empty turn).
    A system message may carry "tools" (a string, or None for none); whether the chat format can render them is
    the tokenizer's check. The renderer and the dataset reader share this validator."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"message {i} must be an object with \"role\" and \"content\", got {msg!r:.80}")
        role, content = msg["role"], msg["content"]
        if role not in roles:
            raise ValueError(f"message {i} has unknown role {role!r} (expected one of {', '.join(roles)})")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}) content must be a string, got {type(content).__name__}")
        if not content.strip():
            raise ValueError(f"message {i} ({role}) has empty content")
        tools = msg.get("tools")
        if tools is not None and (role != "system" or not isinstance(tools, str)):
            raise ValueError(f"message {i} ({role}): \"tools\" must be a string (the tool definitions as JSON text) "
                             "on a system message")
        out.append((role, content))
    return out


class TokenizerError(ValueError):
    """A tokenizer folder or file that cannot be used; the message names the file."""


# ----- loading ----------------------------------------------------------------------------------------------------

def _token_content(value) -> str | None:
    # tokenizer_config.json writes special tokens as "<s>" or as {"content": "<s>", ...} (older AddedToken dicts)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


class Tokenizer:
    """Phi-3's tokenizer: a `tokenizers.Tokenizer` plus the special tokens and the chat format.

    Build one with `Tokenizer.from_pretrained(folder)` (tokenizer.json, and tokenizer_config.json /
    special_tokens_map.json when present) or `Tokenizer.tiny()` (built in code, for tests and demos).
    """

    def __init__(self, backend: _Backend, config: dict | None = None, source: str = "tokenizer"):
        self.backend = backend
        self._vocab_size = None  # computed on first use (vocab_size)
        self.config = dict(config or {})
        self.source = source
        template = self.config.get("chat_template")
        # the chat format comes from the checkpoint: its template text, else its special tokens (chat_format.py)
        self.chat_format, self.template_known = for_checkpoint(
            template if isinstance(template, str) else None, lambda text: backend.token_to_id(text) is not None)
        self.chat_template = template or self.chat_format.templates[0]
        tokens = {
            "bos": _token_content(self.config.get("bos_token")) or "<s>",
            "eos": _token_content(self.config.get("eos_token")) or EOS_TOKEN,
            "unk": _token_content(self.config.get("unk_token")) or "<unk>",
        }
        tokens["pad"] = _token_content(self.config.get("pad_token")) or tokens["eos"]
        self.special_tokens = tokens  # kind -> token text
        ids = {}
        for kind, text in tokens.items():
            ids[kind] = backend.token_to_id(text)
            if ids[kind] is None and kind in ("eos", "pad"):
                raise TokenizerError(f"{source}: its {kind} token {text!r} is not in the vocabulary")
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = ids["bos"], ids["eos"], ids["unk"], ids["pad"]
        self.eos_token = tokens["eos"]
        # the chat format's tokens; None when this is not a Phi-style vocabulary (chat methods then refuse)
        self.roles = self.chat_format.roles(lambda text: backend.token_to_id(text) is not None)
        self.role_ids = {role: backend.token_to_id(f"<|{role}|>") for role in self.roles}
        self.end_id = backend.token_to_id(END_TOKEN)
        stops = [self.end_id, backend.token_to_id(EOS_TOKEN), self.eos_id]
        self.stop_ids = tuple(dict.fromkeys(i for i in stops if i is not None))

    # ----- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_hub_id) -> "Tokenizer":
        """Load from a folder holding tokenizer.json (or the path of a tokenizer.json itself), or a Hub id.
        tokenizer_config.json (special tokens, added tokens, chat template), chat_template.jinja and
        special_tokens_map.json are read when present."""
        path = Path(path_or_hub_id).expanduser()
        if path.is_file():
            folder, tok_file = path.parent, path
        else:
            folder = find_folder(path_or_hub_id, TokenizerError)
            tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"{tok_file}: no such file (a tokenizer folder needs tokenizer.json; "
                                 "tokenizer.model alone is not read)")
        try:
            backend = _Backend.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a plain Exception for any malformed file
            raise TokenizerError(f"{tok_file}: not a valid tokenizer.json ({e})") from None
        config = {}
        cfg_file = folder / "tokenizer_config.json"
        if cfg_file.is_file():
            config = _read_json(cfg_file)
            cls._check_added_tokens(backend, config.get("added_tokens_decoder") or {}, cfg_file)
        jinja = folder / "chat_template.jinja"  # where transformers 5 writes the template
        if jinja.is_file() and not config.get("chat_template"):
            config["chat_template"] = jinja.read_text(encoding="utf-8")
        map_file = folder / "special_tokens_map.json"
        if map_file.is_file():  # like transformers: its named tokens take precedence over tokenizer_config.json
            for key, value in _read_json(map_file).items():
                if key in ("bos_token", "eos_token", "unk_token", "pad_token") and _token_content(value):
                    config[key] = _token_content(value)
        tokenizer = cls(backend, config, source=str(folder))
        if not tokenizer.template_known:
            warnings.warn(f"{folder}: its chat_template is not Phi-3's or Phi-4-mini's; this tokenizer renders "
                          f"and trains on the {tokenizer.chat_format.name} chat format (chosen from its special "
                          "tokens) and only keeps the file's template for saving", stacklevel=2)
        return tokenizer

    @staticmethod
    def _check_added_tokens(backend: _Backend, added: dict, where: Path) -> None:
        """tokenizer_config.json's added_tokens_decoder must agree with tokenizer.json; missing tokens are added
        (with their flags) when their id is the next free one."""
        from tokenizers import AddedToken

        try:
            order = sorted(added, key=int)
        except (TypeError, ValueError):
            raise TokenizerError(f"{where}: added_tokens_decoder keys must be token ids") from None
        for key in order:
            spec = added[key] if isinstance(added[key], dict) else {"content": added[key]}
            content, want = _token_content(spec), int(key)
            got = backend.token_to_id(content) if content else None
            if got == want:
                continue
            if got is None and want == backend.get_vocab_size(with_added_tokens=True):
                token = AddedToken(content, single_word=spec.get("single_word", False),
                                   lstrip=spec.get("lstrip", False), rstrip=spec.get("rstrip", False),
                                   normalized=spec.get("normalized", False), special=spec.get("special", True))
                if spec.get("special", True):
                    backend.add_special_tokens([token])
                else:
                    backend.add_tokens([token])
                continue
            raise TokenizerError(f"{where}: added token {content!r} has id {want} there but "
                                 f"{got} in tokenizer.json")

    @classmethod
    def tiny(cls) -> "Tokenizer":
        """A small Phi-3-style tokenizer built in code (no download, deterministic): see phi3mini/tiny.py."""
        return cls(_Backend.from_str(tiny_tokenizer_json()), tiny_tokenizer_config(), source="tiny")

    def save_pretrained(self, out_dir) -> None:
        """Write tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json, in
        the layout `transformers.AutoTokenizer.from_pretrained` reads. Each file is written to a temporary name and
        renamed (phi3mini.atomic)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        added = {}
        for tid, tok in sorted(self.backend.get_added_tokens_decoder().items()):
            added[str(tid)] = {"content": tok.content, "lstrip": tok.lstrip, "normalized": tok.normalized,
                               "rstrip": tok.rstrip, "single_word": tok.single_word, "special": tok.special}
        config = dict(self.config)
        config.pop("auto_map", None)  # no remote code: the files alone describe the tokenizer
        config.update({
            "added_tokens_decoder": added,
            "bos_token": self.special_tokens["bos"], "eos_token": self.special_tokens["eos"],
            "unk_token": self.special_tokens["unk"], "pad_token": self.special_tokens["pad"],
            "chat_template": self.chat_template,
            "clean_up_tokenization_spaces": False,
            # The generic fast tokenizer uses tokenizer.json as it is. transformers 5's LlamaTokenizer (the class
            # Phi-3's own file names) rebuilds the pre-tokenizer from `legacy` instead, which changes the ids of
            # text that follows a special token in a folder without a phi3 config.json.
            "tokenizer_class": "PreTrainedTokenizerFast",
        })
        config.setdefault("add_bos_token", False)
        config.setdefault("add_eos_token", False)
        config.setdefault("model_max_length", 4096)
        special_map = {f"{k}_token": v for k, v in self.special_tokens.items()}
        files = {"tokenizer.json": self.backend.to_str(pretty=True),
                 "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
                 "special_tokens_map.json": json.dumps(special_map, indent=2, ensure_ascii=False)}
        for name, text in files.items():
            atomic.write_file(out / name, text + "\n")

    # ----- plain text ----------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """One past the largest token id, added tokens included (32011 for Phi-3, whose embedding is padded to
        32064). Equal to the number of tokens for a vocabulary without gaps in its ids, as the Hub's are."""
        if self._vocab_size is None:
            self._vocab_size = max(self.backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        return self._vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`. Special-token text in it ("<|end|>") becomes that token, as in transformers with
        add_special_tokens=False; no BOS unless add_bos."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is None:
            raise TokenizerError(f"{self.source}: no BOS token {self.special_tokens['bos']!r} in the vocabulary")
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list, or a 1-D tensor). Ids past the vocabulary (the embedding's padding) are
        dropped."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        """An incremental decoder for streaming generated tokens: see `StreamDecoder`."""
        return StreamDecoder(self, skip_special_tokens)

    # ----- chat format ---------------------------------------------------------------------------------------------
    def check_chat(self, messages: Sequence[dict]) -> list[tuple[str, str, str | None]]:
        """(role, content, tools) per message of a conversation [{"role", "content"}, ...], checked against this
        vocabulary's chat format: TokenizerError when the vocabulary has no chat tokens, ValueError naming the
        message for a role the format lacks, empty content or tools it cannot render (see `check_messages`)."""
        needed = {f"<|{role}|>": tid for role, tid in self.role_ids.items()} | {END_TOKEN: self.end_id}
        missing = [token for token, tid in needed.items() if tid is None]
        if missing:
            raise TokenizerError(f"{self.source}: no {', '.join(missing)} token in the vocabulary: not a Phi chat "
                                 "format")
        turns = check_messages(messages, self.roles)
        out = []
        for i, ((role, content), msg) in enumerate(zip(turns, messages)):
            tools = msg.get("tools")
            if tools is not None and not self.chat_format.tools:
                raise ValueError(f"message {i} ({role}) has \"tools\", which {self.chat_format.name}'s chat format "
                                 "cannot render (Phi-4-mini's can)")
            out.append((role, content, tools))
        return out

    def render_message(self, role: str, content: str, tools: str | None = None) -> str:
        """One message as text in this checkpoint's chat format, e.g. Phi-3's "<|user|>\\n{content}<|end|>\\n";
        unchecked (see `check_chat`). A conversation's text is its messages' texts, then the eos token or the
        generation prompt; its ids are the concatenation of each message's `encode` (see the module docstring)."""
        return self.chat_format.render(role, content, tools)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text in this checkpoint's chat format (what transformers renders from its
        chat_template; see chat_format.py)."""
        text = "".join(self.render_message(*turn) for turn in self.check_chat(messages))
        return text + (self.chat_format.generation_prompt if add_generation_prompt else self.eos_token)

    def _encode_turns(self, messages) -> list[tuple[str, list[int]]]:
        # (role, ids) per message; ids[0] is the role token, ids[-1] the closing <|end|> (Phi-3: its "\n" absorbed)
        out = []
        for i, (role, content, tools) in enumerate(self.check_chat(messages)):
            ids = self.backend.encode(self.render_message(role, content, tools), add_special_tokens=False).ids
            if ids[0] != self.role_ids[role] or ids[-1] != self.end_id:
                raise TokenizerError(f"{self.source}: message {i} does not encode as <|{role}|> ... <|end|> "
                                     f"(the vocabulary's added tokens do not fit the {self.chat_format.name} "
                                     "chat format)")
            out.append((role, ids))
        return out

    def _tail(self, add_generation_prompt: bool) -> list[int]:
        return self.encode(self.chat_format.generation_prompt if add_generation_prompt else self.eos_token)

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[int]:
        """Token ids of the conversation, equal to transformers' `apply_chat_template(messages, tokenize=True)` with
        the checkpoint's template and to `encode(apply_chat_template(messages))`. No BOS (see the module
        docstring)."""
        ids = [t for _, turn in self._encode_turns(messages) for t in turn]
        return ids + self._tail(add_generation_prompt)

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"


# ----- streaming ----------------------------------------------------------------------------------------------------

class StreamDecoder:
    """Turns generated token ids into text as they arrive. `push(id)` returns the new text (possibly ""), `flush()`
    what is left at the end; the pieces concatenate to `tokenizer.decode(all ids)`.

    A character split over byte-fallback tokens (<0xE2><0x82><0xAC> is "€") is held back until its last byte has
    arrived: decoding an incomplete byte sequence gives U+FFFD, so text ending in U+FFFD is not emitted yet. Each
    step decodes a short window (the tokens since the previous emission plus the ones before it, so SentencePiece's
    leading-space handling sees the same context as a full decode) and emits the difference. Invalid byte
    sequences (a model emitting a lone continuation byte) come out as U+FFFD, possibly not as many as a full decode
    gives.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self._ids: list[int] = []  # the window: ids from the start of the previously emitted chunk
        self._read = 0  # ids[:_read] were decoded and emitted already

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _step(self, final: bool) -> str:
        before = self._decode(self._ids[:self._read])
        text = self._decode(self._ids)
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        # the window now starts at the chunk just emitted
        self._ids, self._read = self._ids[self._read:], len(self._ids) - self._read
        return text[len(before):]

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        return self._step(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character comes out as U+FFFD)."""
        return self._step(final=True)


__all__ = ["Tokenizer", "StreamDecoder", "TokenizerError", "check_messages", "PHI3_CHAT_TEMPLATE", "PHI4_CHAT_TEMPLATE",
           "PHI3_ADDED_TOKENS", "ROLES", "IGNORE"]
