"""Encoding chats for training: `ChatEncoder`, the one encoder the token store (store.py) and single conversations
(`ChatEncoder.encode`, what tests and small scripts use) both go through.

A conversation's ids are the concatenation of its messages' ids, each message rendered on its own by
`Tokenizer.render_message` and tokenized, then the eos token (`Tokenizer.encode(tokenizer.eos_token)`). Every message
starts and ends at an added token, where the `tokenizers` library also splits the whole rendered string, so the
concatenation equals the ids of `Tokenizer.apply_chat_template(messages)` (what transformers produces) and the
position of every message's tokens is known exactly. Labels come from those positions, never from searching for a
template string or from the pad id (Phi-3's pad is its eos):
- train_on="assistant": each assistant reply's tokens and its closing <|end|>; never its <|assistant|> token, the
  other turns or the final eos;
- train_on="all": every token.
Position 0 is never a target (nothing predicts it), so n_target counts labels[1:]. The prompt chat.py sends for
reply k, `Tokenizer.encode_chat(messages[:k], add_generation_prompt=True)`, is exactly the prefix of the ids before
that reply's content.

Unlike `Tokenizer.encode` (which reads special-token text as the token, as transformers does), special-token text
inside a message's content ("<|end|>", "<|user|>", ...) is refused with the message named: trained as structure, it
would teach the model to end or switch turns in the middle of a reply.

Longer than max_seq_len: cut after the last complete assistant reply (its <|end|> included) that fits, status
"truncated"; when not even the first reply fits, skipped as "too_long". A conversation without an assistant turn is
skipped as "no_assistant" (the store's reader drops those before encoding), one left without a trained token as
"no_target".

A chunk of conversations is tokenized in one `encode_batch_fast` call (Rust threads) and checked and cut on numpy
arrays; `encode` is that path on a chunk of one.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from .formats import DataError
from phi3lora.phi3mini.tokenizer import IGNORE


@dataclass
class Example:
    input_ids: list[int]  # (a numpy array when it comes from a TokenSet)
    labels: list[int]  # aligned with input_ids: -100 where no loss, else the token id itself
    source: str = ""  # file:line

    @property
    def n_target(self) -> int:
        # position 0 is never predicted (the model shifts: token t predicts labels[t + 1])
        return int((np.asarray(self.labels[1:]) != IGNORE).sum())

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class EncodedChunk:
    """The kept examples of a chunk of conversations, one after the other, and what happened to the others."""
    ids: np.ndarray  # int32 (T,)
    mask: np.ndarray  # uint8 (T,): 1 where the token is a target (labels = ids there, -100 elsewhere)
    kept: list[tuple[int, int, str]] = field(default_factory=list)  # (length, n_target, where) per kept example
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (reason, where): "too_long" or "no_target"
    truncated: int = 0  # kept examples cut after their last complete reply that fits

    def labels(self) -> np.ndarray:
        """int64 (T,): the ids where the mask is set, -100 elsewhere."""
        return np.where(self.mask != 0, self.ids, IGNORE).astype(np.int64)


class ChatEncoder:
    """Chats -> training ids and labels for one tokenizer and one setting of max_seq_len (None: no limit) and
    train_on ("assistant" or "all"); see the module docstring for the rules.

        enc = ChatEncoder(tokenizer, max_seq_len=2048)
        example, status = enc.encode(messages)  # status "ok" | "truncated", or (None, the reason it was skipped)
    """

    def __init__(self, tokenizer, max_seq_len: int | None = None, train_on: str = "assistant"):
        if train_on not in ("assistant", "all"):
            raise ValueError(f"train_on must be 'assistant' or 'all', got {train_on!r}")
        tokenizer.check_chat([{"role": "user", "content": "x"}])  # a vocabulary without Phi-3's chat tokens
        self.tok, self.max_seq_len, self.train_on = tokenizer, max_seq_len, train_on
        backend = tokenizer.backend
        if backend.pre_tokenizer is None and hasattr(backend.model, "_resize_cache"):
            # No pre-tokenizer (Phi-3's SentencePiece layout): BPE sees each message as one word, and its word
            # cache would keep up to 10,000 whole messages (measured: 16 bytes per token) for next to no hits.
            # A private copy without the cache; the user's tokenizer keeps its own.
            backend = type(backend).from_str(backend.to_str())
            backend.model._resize_cache(0)
        self.encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
        self.tail = np.asarray(tokenizer.encode(tokenizer.eos_token), dtype=np.int32)  # closes every example
        self.role_ids = dict(tokenizer.role_ids)
        # special tokens that must not come out of a message's content (they would be trained as structure)
        special = {tid: tok.content for tid, tok in backend.get_added_tokens_decoder().items()
                   if tok.special and tid != tokenizer.unk_id}
        self.special_lut = np.zeros(tokenizer.vocab_size + 1, dtype=bool)
        self.special_lut[list(special)] = True
        self.special_text = special

    # ----- one conversation -----------------------------------------------------------------------------------
    def encode(self, messages: list[dict], source: str = "") -> tuple[Example | None, str]:
        """One conversation -> (Example with list ids and labels, "ok" | "truncated"), or (None, reason) with reason
        "no_assistant", "too_long" or "no_target". ValueError naming the message for one the chat format cannot
        hold (an unknown role, empty content, ...); DataError for special-token text in a content."""
        self.tok.check_chat(messages)
        if not any(m["role"] == "assistant" for m in messages):
            return None, "no_assistant"
        errors: list[str] = []
        out = self.encode_chunk([(source or "the conversation", messages)], errors)
        if errors:
            raise DataError(errors[0])
        if out.skipped:
            return None, out.skipped[0][0]
        return Example(out.ids.tolist(), out.labels().tolist(), source), "truncated" if out.truncated else "ok"

    # ----- a chunk of conversations ---------------------------------------------------------------------------
    def encode_chunk(self, convs: list[tuple[str, list[dict]]], errors: list[str]) -> EncodedChunk:
        """Conversations [(where, messages)] (valid messages, as formats.record_to_messages gives them) -> the kept
        examples and the skipped ones. A conversation that cannot be encoded adds a "where: why" line to errors
        and is dropped."""
        convs, encs = self._encode(convs, errors)
        if not encs:
            return EncodedChunk(np.zeros(0, np.int32), np.zeros(0, np.uint8))
        lens = np.fromiter((len(e) for e in encs), dtype=np.int64, count=len(encs))
        flat = np.fromiter(itertools.chain.from_iterable(e.ids for e in encs), dtype=np.int32, count=int(lens.sum()))
        starts = np.cumsum(lens) - lens  # (messages,) where each message's ids start in flat
        lasts = starts + lens - 1  # (messages,) its closing <|end|>
        roles = [m["role"] for _, ms in convs for m in ms]
        want = np.fromiter((self.role_ids[r] for r in roles), dtype=np.int64, count=len(roles))
        if (lens < 2).any() or (flat[starts] != want).any() or (flat[lasts] != self.tok.end_id).any():
            raise DataError(f"{self.tok.source}: a message does not encode as <|role|> ... <|end|> (the vocabulary's "
                            "added tokens are not Phi-3's)")
        inner = self.special_lut[flat]
        inner[starts] = inner[lasts] = False
        n_msgs = np.fromiter((len(ms) for _, ms in convs), dtype=np.int64, count=len(convs))
        tool_errors = self._tools_errors(convs, inner, starts, lasts, errors)
        bad_convs = self._special_errors(np.flatnonzero(inner), flat, starts, n_msgs, convs, roles, errors)
        bad_convs |= tool_errors
        is_asst = np.fromiter((r == "assistant" for r in roles), dtype=bool, count=len(roles))
        mask = self._target_mask(flat, lens, starts, is_asst)
        return self._cut(flat, mask, starts, lasts, is_asst, n_msgs, convs, bad_convs)

    def _encode(self, convs, errors):
        """Tokenize every message of the chunk; conversations whose text the tokenizer refuses are dropped."""
        convs = self._fit_format(convs, errors)
        render = self.tok.render_message
        texts = [render(m["role"], m["content"], m.get("tools")) for _, ms in convs for m in ms]
        try:
            return convs, self.encode_batch(texts, add_special_tokens=False)
        except Exception as e:  # tokenizers raises TypeError/Exception without saying which string: find it
            good = []
            for where, ms in convs:
                bad = _unencodable(ms)
                if bad:
                    errors.append(f"{where}: {bad}")
                else:
                    good.append((where, ms))
            if len(good) == len(convs):
                raise DataError(f"{convs[0][0]} ... {convs[-1][0]}: the tokenizer failed on these records "
                                f"({type(e).__name__}: {e})") from None
            texts = [render(m["role"], m["content"], m.get("tools")) for _, ms in good for m in ms]
            return good, self.encode_batch(texts, add_special_tokens=False) if texts else []

    def _fit_format(self, convs, errors):
        """Drop (with a file:line error) conversations the chat format cannot render: a role it lacks (Phi-3 has no
        tool role) or tools where it has no tool section. Only unusual conversations pay for the full check."""
        good = []
        for where, ms in convs:
            if any(m["role"] not in self.role_ids or m.get("tools") is not None for m in ms):
                try:
                    self.tok.check_chat(ms)
                except ValueError as e:
                    errors.append(f"{where}: {e}")
                    continue
            good.append((where, ms))
        return good

    def _target_mask(self, flat, lens, starts, is_asst) -> np.ndarray:
        """uint8 (T,) over the chunk's message ids: 1 on the tokens the loss sees."""
        if self.train_on == "all":
            return np.ones(len(flat), dtype=np.uint8)
        mask = np.repeat(is_asst, lens).astype(np.uint8)
        mask[starts] = 0  # the <|assistant|> token is prompt; the reply and its <|end|> train
        return mask

    def _tools_errors(self, convs, inner, starts, lasts, errors) -> set[int]:
        """A system message with tools (Phi-4-mini) holds <|tool|> and <|/tool|> as structure: its tokens are left
        out of the id check (inner is cleared there) and its content and tools texts are checked as strings."""
        bad, msg = set(), 0
        for c, (where, ms) in enumerate(convs):
            for i, m in enumerate(ms):
                if m.get("tools") is not None:
                    inner[starts[msg] + 1:lasts[msg]] = False
                    for field_name in ("content", "tools"):
                        found = next((t for t in self.special_text.values() if t in m[field_name]), None)
                        if found and c not in bad:
                            bad.add(c)
                            errors.append(f"{where}: message {i} ({m['role']}) {field_name} contains the special "
                                          f"token {found!r}: it would be read as that token, not as text; remove or "
                                          "rewrite it")
                msg += 1
        return bad

    def _special_errors(self, positions, flat, starts, n_msgs, convs, roles, errors) -> set[int]:
        """file:line errors for special-token text inside a message's content -> the conversations to drop."""
        if not len(positions):
            return set()
        first_msg = np.cumsum(n_msgs) - n_msgs
        bad = set()
        for msg in np.unique(np.searchsorted(starts, positions, side="right") - 1):
            c = int(np.searchsorted(first_msg, msg, side="right") - 1)
            if c in bad:
                continue
            bad.add(c)
            pos = positions[np.searchsorted(starts, positions, side="right") - 1 == msg][0]
            text = self.special_text.get(int(flat[pos]), "?")
            errors.append(f"{convs[c][0]}: message {int(msg - first_msg[c])} ({roles[msg]}) contains the special "
                          f"token {text!r}: it would be read as that token, not as text; remove or rewrite it")
        return bad

    def _cut(self, flat, mask, starts, lasts, is_asst, n_msgs, convs, bad_convs) -> EncodedChunk:
        """Per conversation: append the tail, or cut after the last whole reply that fits; skip what cannot train."""
        pieces_ids, pieces_mask, skipped, kept, truncated_count = [], [], [], [], 0
        tail_mask = np.full(len(self.tail), self.train_on == "all", dtype=np.uint8)
        limit = self.max_seq_len
        m0 = 0
        for c, (where, _) in enumerate(convs):
            m1 = m0 + int(n_msgs[c])
            a, b = int(starts[m0]), int(lasts[m1 - 1]) + 1
            asst_ends = lasts[m0:m1][is_asst[m0:m1]] + 1 - a
            m0 = m1
            if c in bad_convs:
                continue
            length = b - a + len(self.tail)
            truncated = limit is not None and length > limit
            if not truncated:
                ids = (flat[a:b], self.tail)
                msk = (mask[a:b], tail_mask)
            else:
                fits = asst_ends[asst_ends <= limit]
                if not len(fits):
                    skipped.append(("too_long", where))
                    continue
                length = int(fits[-1])
                ids, msk = (flat[a:a + length],), (mask[a:a + length],)
            n_target = int(sum(int(m.sum()) for m in msk)) - int(msk[0][0])  # labels[1:]: position 0 never predicted
            if n_target == 0:
                skipped.append(("no_target", where))
                continue
            truncated_count += truncated
            pieces_ids += ids
            pieces_mask += msk
            kept.append((length, n_target, where))
        if not kept:
            return EncodedChunk(np.zeros(0, np.int32), np.zeros(0, np.uint8), [], skipped)
        return EncodedChunk(np.concatenate(pieces_ids), np.concatenate(pieces_mask), kept, skipped, truncated_count)


def _unencodable(messages: list[dict]) -> str | None:
    for i, m in enumerate(messages):
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as e:
            return (f"message {i} ({m['role']}) content is not valid Unicode ({e.reason}: "
                    f"{m['content'][e.start]!r} at character {e.start}); fix or drop that text")
    return None


__all__ = ["ChatEncoder", "EncodedChunk", "Example", "IGNORE"]
