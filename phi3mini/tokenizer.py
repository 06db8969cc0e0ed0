"""Phi-3's tokenizer and chat format over the `tokenizers` library.

Phi-3-mini uses Llama 2's SentencePiece BPE (32000 pieces, byte fallback) plus eleven added tokens at 32000-32010.
Its tokenizer.json does SentencePiece's "▁" handling in the normalizer (prepend "▁", spaces become "▁"), with no
pre-tokenizer, so every stretch of text between two added tokens is normalized on its own: the text right after a
special token starts with "▁" (SentencePiece's "legacy" behaviour, the one tokenizer.json, transformers' fast
tokenizer and llama.cpp share). All added tokens but <|endoftext|> are rstrip tokens: the whitespace after them
("\\n" in the chat format) is absorbed into the token.

The chat format (PHI3_CHAT_TEMPLATE, the Jinja template of Phi-3-mini-4k-instruct's tokenizer_config.json) is
built in: "<|role|>\\n{content}<|end|>\\n" per message, then "<|assistant|>\\n" for a generation prompt or the eos
token to close a training example. No BOS: the current template has no bos_token, so transformers'
`apply_chat_template(..., tokenize=True)` adds none and neither does `encode_chat`. A chat_template found in
tokenizer_config.json is kept (and written back by save_pretrained) but not executed: this module renders the
format above in Python, so it needs no Jinja.

Conversations are encoded message by message. Every message starts and ends at an added token, which is also where
the `tokenizers` library splits the whole rendered string, so the concatenation equals the ids of the rendered
string (what transformers produces), and the position of every message's tokens is known exactly. Training labels
come from those positions, never from searching for a template string or from the pad id (Phi-3's pad is its eos).
As in transformers, special-token text inside a message's content ("<|end|>") is read as that special token.

Like Phi-3's own, the tokenizer is lossless except for U+2581 ("▁") in the text, which decodes as a space.

Deviation: `Tokenizer.tiny()` builds a small deterministic vocabulary in code (no download) with Phi-3's ids for
<unk>, <s>, </s>, the 256 byte tokens and the added tokens; its other ids are unused filler pieces.
"""
from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer as _Backend

from . import atomic

IGNORE = -100  # label of a token the loss must not see (torch's cross_entropy ignore_index)
ROLES = ("system", "user", "assistant")

# microsoft/Phi-3-mini-4k-instruct tokenizer_config.json "chat_template" (the July 2024 update, with system
# messages; the April 2024 file began with {{ bos_token }} and had no system role). Phi-3.5-mini's template only
# adds `and message['content']` to the system test, which renders the same for the non-empty contents accepted here.
PHI3_CHAT_TEMPLATE = (  # as the file spells it: backslash-n escapes inside the Jinja strings, no newlines
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Templates that render this module's format for the messages it accepts (Phi-3.5-mini / the 128k update skip empty
# system messages, which are refused here anyway). Compared with newlines written as backslash-n: the Hub's
# tokenizer_config.json spells '<|user|>\n' with a JSON escape, so the parsed template holds real newlines where
# PHI3_CHAT_TEMPLATE has Jinja's backslash-n escapes; Jinja renders both the same.
_PHI3_TEMPLATES = (PHI3_CHAT_TEMPLATE,
                   PHI3_CHAT_TEMPLATE.replace("message['role'] == 'system' %}", "message['role'] == 'system' and "
                                              "message['content'] %}"))

# Phi-3's added tokens and their ids (tokenizer.json "added_tokens"); all but <|endoftext|> are rstrip.
PHI3_ADDED_TOKENS = {
    "<|endoftext|>": 32000, "<|assistant|>": 32001, "<|placeholder1|>": 32002, "<|placeholder2|>": 32003,
    "<|placeholder3|>": 32004, "<|placeholder4|>": 32005, "<|system|>": 32006, "<|end|>": 32007,
    "<|placeholder5|>": 32008, "<|placeholder6|>": 32009, "<|user|>": 32010,
}
END_TOKEN = "<|end|>"
EOS_TOKEN = "<|endoftext|>"


def check_messages(messages) -> list[tuple[str, str]]:
    """A conversation [{"role", "content"}, ...] -> [(role, content), ...]; ValueError naming the bad message.
    Roles are system, user and assistant; content a string with something besides whitespace (whitespace alone
    would vanish into the newline after <|role|>: an empty turn). The renderer and the dataset reader share it."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"message {i} must be an object with \"role\" and \"content\", got {msg!r:.80}")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise ValueError(f"message {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}) content must be a string, got {type(content).__name__}")
        if not content.strip():
            raise ValueError(f"message {i} ({role}) has empty content")
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
        self.config = dict(config or {})
        self.source = source
        self.chat_template = self.config.get("chat_template") or PHI3_CHAT_TEMPLATE
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
        # the chat format's tokens; None when this is not a Phi-3-style vocabulary (chat methods then refuse)
        self.role_ids = {role: backend.token_to_id(f"<|{role}|>") for role in ROLES}
        self.end_id = backend.token_to_id(END_TOKEN)
        stops = [self.end_id, backend.token_to_id(EOS_TOKEN), self.eos_id]
        self.stop_ids = tuple(dict.fromkeys(i for i in stops if i is not None))

    # ----- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path) -> "Tokenizer":
        """Load from a folder holding tokenizer.json (or the path of a tokenizer.json itself), or a Hub id.
        tokenizer_config.json (special tokens, added tokens, chat template), chat_template.jinja and
        special_tokens_map.json are read when present."""
        path = Path(path).expanduser()
        if path.is_file():
            folder, tok_file = path.parent, path
        else:
            folder = path
            if not path.exists():
                text = str(path)
                if not text.startswith((".", "/", "~")) and text.count("/") == 1:  # a Hub id
                    from .weights import CheckpointError, resolve_checkpoint
                    try:
                        folder = resolve_checkpoint(text)
                    except CheckpointError as e:
                        raise TokenizerError(str(e)) from None
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
        template = config.get("chat_template")
        if template and (not isinstance(template, str) or template.replace("\n", "\\n") not in _PHI3_TEMPLATES):
            warnings.warn(f"{folder}: its chat_template is not Phi-3's; this tokenizer renders and trains on Phi-3's "
                          "chat format (<|role|>\\n...<|end|>\\n) and only keeps the file's template for saving",
                          stacklevel=2)
        map_file = folder / "special_tokens_map.json"
        if map_file.is_file():  # like transformers: its named tokens take precedence over tokenizer_config.json
            for key, value in _read_json(map_file).items():
                if key in ("bos_token", "eos_token", "unk_token", "pad_token") and _token_content(value):
                    config[key] = _token_content(value)
        return cls(backend, config, source=str(folder))

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
        """A small Phi-3-style tokenizer built in code (no download, deterministic): see `tiny_tokenizer_json`."""
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
        """Number of tokens, added tokens included (32011 for Phi-3; the model's embedding is padded to 32064)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

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
    def _check_chat(self, messages) -> list[tuple[str, str]]:
        needed = {f"<|{role}|>": tid for role, tid in self.role_ids.items()} | {END_TOKEN: self.end_id}
        missing = [token for token, tid in needed.items() if tid is None]
        if missing:
            raise TokenizerError(f"{self.source}: no {', '.join(missing)} token in the vocabulary: not Phi-3's chat "
                                 "format")
        return check_messages(messages)

    @staticmethod
    def _render_message(role: str, content: str) -> str:
        return f"<|{role}|>\n{content}{END_TOKEN}\n"

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text in Phi-3's chat format (what transformers renders from PHI3_CHAT_TEMPLATE)."""
        turns = self._check_chat(messages)
        text = "".join(self._render_message(role, content) for role, content in turns)
        return text + ("<|assistant|>\n" if add_generation_prompt else self.eos_token)

    def _encode_turns(self, messages) -> list[tuple[str, list[int]]]:
        # (role, ids) per message; ids[0] is the role token, ids[-1] the closing <|end|> (its "\n" absorbed)
        out = []
        for i, (role, content) in enumerate(self._check_chat(messages)):
            ids = self.backend.encode(self._render_message(role, content), add_special_tokens=False).ids
            if ids[0] != self.role_ids[role] or ids[-1] != self.end_id:
                raise TokenizerError(f"{self.source}: message {i} does not encode as <|{role}|> ... <|end|> "
                                     "(the vocabulary's added tokens are not Phi-3's)")
            out.append((role, ids))
        return out

    def _tail(self, add_generation_prompt: bool) -> list[int]:
        return [self.role_ids["assistant"]] if add_generation_prompt else self.encode(self.eos_token)

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[int]:
        """Token ids of the conversation, equal to transformers' `apply_chat_template(messages, tokenize=True)` with
        Phi-3's template and to `encode(apply_chat_template(messages))`. No BOS (see the module docstring)."""
        ids = [t for _, turn in self._encode_turns(messages) for t in turn]
        return ids + self._tail(add_generation_prompt)

    def encode_for_training(self, messages: Sequence[dict], train_on: str = "assistant") -> tuple[list[int], list[int]]:
        """(input_ids, labels) of a conversation. input_ids == encode_chat(messages) (closed with the eos token).
        labels equal input_ids where the loss applies and -100 elsewhere: with train_on="assistant", each assistant
        reply's tokens and its closing <|end|> (never the role tokens, the other turns or the final eos); with
        train_on="all", every token. The prompt chat.py builds for a reply, encode_chat(messages[:k],
        add_generation_prompt=True), is exactly the prefix of input_ids before reply k's content."""
        if train_on not in ("assistant", "all"):
            raise ValueError(f"train_on must be 'assistant' or 'all', got {train_on!r}")
        ids, labels = [], []
        for role, turn in self._encode_turns(messages):
            ids += turn
            if train_on == "all":
                labels += turn
            elif role == "assistant":
                labels += [IGNORE] + turn[1:]  # the <|assistant|> token is prompt; the reply and its <|end|> train
            else:
                labels += [IGNORE] * len(turn)
        tail = self._tail(add_generation_prompt=False)
        ids += tail
        labels += tail if train_on == "all" else [IGNORE] * len(tail)
        return ids, labels

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


# ----- the built-in tiny tokenizer -------------------------------------------------------------------------------

# Words of the tiny vocabulary: each becomes a piece "▁word" (SentencePiece's word-start mark), its capitalized form
# too, and the lowercase ones also a piece without the mark (for words inside others, after "-" or "(").
_TINY_WORDS = """
the of and to in is it you that he was for on are with as his they be at one have this from or had by not word but
what some we can out other were all there when up use your how said an each she which do their time if will way about
many then them write would like so these her long make thing see him two has look more day could go come did number
sound no most people my over know water than call first who may down side been now find any new work part take get
place made live where after back little only round man year came show every good me give our under name very through
just form sentence great think say help low line differ turn cause much mean before move right boy old too same tell
does set three want air well also play small end put home read hand port large spell add even land here must big high
such follow act why ask men change went light kind off need house picture try us again animal point mother world near
build self earth father head stand own page should country found answer school grow study still learn plant cover food
sun four between state keep eye never last let thought city tree cross farm hard start might story saw far sea draw
left late run don't while press close night real life few north open seem together next white children begin got walk
example ease paper group always music those both mark often letter until mile river car feet care second book carry
took science eat room friend began idea fish mountain stop once base hear horse cut sure watch color face wood main
enough plain girl usual young ready above ever red list though feel talk bird soon body dog family direct pose leave
song measure door product black short numeral class wind question happen complete ship area half rock order fire south
problem piece told knew pass since top whole king space heard best hour better true during hundred five remember step
early hold west ground interest reach fast verb sing listen six table travel less morning ten simple several vowel
toward war lay against pattern slow center love person money serve appear road map rain rule govern pull cold notice
voice unit power town fine certain fly fall lead cry dark machine note wait plan figure star box noun field rest
correct able pound done beauty drive stood contain front teach week final gave green oh quick develop ocean warm free
minute strong special mind behind clear tail produce fact street inch multiply nothing course stay wheel full force
blue object decide surface deep moon island foot system busy test record boat common gold possible plane stead dry
wonder laugh thousand ago ran check game shape equate hot miss brought heat snow tire bring yes distant fill east
paint language among hello thanks please sorry yes okay sure
model train training data token tokens loss rank low adapter adaptation weight weights layer matrix tune tuning
learning rate step steps batch memory gradient chat reply replies message format file files code run script config
python torch kernel kernels checkpoint eval assistant user capital language small fast
LoRA Phi Microsoft PyTorch Python Triton GPU CPU JSON Hugging Face English French France Paris Italy Rome
"""
# Frequent English letter pairs and triples, as pieces inside words (after the word pieces, so they never cut one).
_TINY_SUBWORDS = """
th he in er an re on at en nd ti es or te of ed is it al ar st to nt ng se ha as ou io le ve co me de hi ri ro ic ne
ea ra ce li ch ll be ma si om ur ca el ta la ns di fo ho pe ec pr no ct us ac ot il tr ly nc et ut ss so rs un lo wa ge
ie wh ee wi em ad ol rt po we na ul ni ts mo ow pa im mi ai sh ir su id os iv ia am fi ci vi pl ig tu ev ld ry mp fe bl
ab gh ty op wo sa ay ex ke fr oo av ag if ap gr od bo sp rd do uc bu ei ov by rm ip ht sc ft ph ing ion ent tio for nde
has nce edt tis oft sth men ver ter ere ate all ess str ect con res est pro int com per ble ous ity ive ial ers ant ist
tion ment ness able ible ful less ism ize ise ify ity ous ical ally ed es 's n't 're 've 'll 'm 'd
"""


@functools.lru_cache(maxsize=1)
def tiny_tokenizer_json() -> str:
    """tokenizer.json text of the tiny tokenizer: Phi-3's layout (Llama 2's normalizer, decoder and byte-fallback
    BPE) and Phi-3's ids for <unk> 0, <s> 1, </s> 2, <0x00>..<0xFF> 3..258 and the added tokens 32000..32010.
    Pieces: "▁" and printable ASCII, then the merges that spell about a thousand common English words (as "▁word",
    "▁Word" and "word") and frequent letter groups; ids up to 31999 are filler pieces that no text encodes to.
    Other characters go through the byte tokens. Vocabulary size 32011, like Phi-3."""
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in ["▁"] + [chr(c) for c in range(0x21, 0x7F)]:
        vocab[ch] = len(vocab)
    merges: list[list[str]] = []

    rank: dict[tuple[str, str], int] = {}

    def spell(piece: str) -> None:
        # Run BPE with the merges so far, then join what is left left to right with new merges: every new merge
        # ranks after all existing ones, so the pieces spelled before still encode the same way.
        parts = list(piece)
        while len(parts) > 1:
            r, i = min((rank.get((a, b), len(rank)), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
            if r == len(rank):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        acc = parts[0]
        for part in parts[1:]:
            if acc + part not in vocab:
                rank[acc, part] = len(rank)
                merges.append([acc, part])
                vocab[acc + part] = len(vocab)
            acc += part

    # Merges that start at a "▁" come first: BPE applies the lowest-ranked merge first, so a listed word grows
    # from its "▁" to its end before any in-word merge can cut into it. Then "▁" + each letter and digit, then the
    # in-word pieces.
    words = _TINY_WORDS.split()
    for word in dict.fromkeys(words + [w[0].upper() + w[1:] for w in words]):
        spell("▁" + word)
    for ch in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789":
        spell("▁" + ch)
    for piece in dict.fromkeys([w for w in words if w.islower()] + _TINY_SUBWORDS.split()):
        spell(piece)
    n_pieces = min(PHI3_ADDED_TOKENS.values())
    while len(vocab) < n_pieces:
        vocab[f"<unused{len(vocab)}>"] = len(vocab)  # multi-character pieces with no merge: never produced
    special = [("<unk>", 0, False), ("<s>", 1, False), ("</s>", 2, True)]  # (content, id, rstrip), as in Phi-3
    added = [dict(id=i, content=c, single_word=False, lstrip=False, rstrip=r, normalized=False, special=c != "</s>")
             for c, i, r in special]
    for content, tid in PHI3_ADDED_TOKENS.items():
        vocab[content] = tid
        added.append(dict(id=tid, content=content, single_word=False, lstrip=False, rstrip=content != EOS_TOKEN,
                          normalized=False, special=True))
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    return json.dumps(spec, ensure_ascii=False)


def tiny_tokenizer_config() -> dict:
    """tokenizer_config.json of the tiny tokenizer (Phi-3's special tokens and chat template)."""
    return {"bos_token": "<s>", "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": "<unk>",
            "add_bos_token": False, "add_eos_token": False, "chat_template": PHI3_CHAT_TEMPLATE,
            "model_max_length": 4096}


__all__ = ["Tokenizer", "StreamDecoder", "TokenizerError", "check_messages", "PHI3_CHAT_TEMPLATE", "PHI3_ADDED_TOKENS", "ROLES",
           "IGNORE", "tiny_tokenizer_json", "tiny_tokenizer_config"]
