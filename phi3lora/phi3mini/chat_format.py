"""The chat formats of the Phi family, and which one a checkpoint uses.

Phi-3 / Phi-3.5 / Phi-3-medium:  "<|role|>\\n{content}<|end|>\\n" per message, "<|assistant|>\\n" to prompt a reply.
Phi-4-mini:                      "<|role|>{content}<|end|>" per message (no newlines), "<|assistant|>" to prompt a
                                 reply; a system message with "tools" renders "<|system|>{content}<|tool|>{tools}
                                 <|/tool|><|end|>"; any role renders as <|role|> (so a "tool" role works where
                                 the vocabulary has a <|tool|> token).
Both close a training example with the eos token. Each is the Jinja chat_template of the model's
tokenizer_config.json, rendered here in Python (no Jinja): `for_checkpoint` picks the format from the template
text, or, when there is none or it is not one of the known ones, from the special tokens (<|tool|> and <|/tool|>
in the vocabulary: Phi-4-mini's).

Every message starts at its role token and ends at <|end|>, both added tokens, which is where the `tokenizers`
library splits a string before encoding: encoding message by message gives the ids of the whole rendered string,
and the position of every message's tokens (training labels come from those).
"""
from __future__ import annotations

from dataclasses import dataclass

END_TOKEN = "<|end|>"

# Phi-3's added tokens and their ids (tokenizer.json "added_tokens"); all but <|endoftext|> are rstrip.
PHI3_ADDED_TOKENS = {
    "<|endoftext|>": 32000, "<|assistant|>": 32001, "<|placeholder1|>": 32002, "<|placeholder2|>": 32003,
    "<|placeholder3|>": 32004, "<|placeholder4|>": 32005, "<|system|>": 32006, "<|end|>": 32007,
    "<|placeholder5|>": 32008, "<|placeholder6|>": 32009, "<|user|>": 32010,
}
EOS_TOKEN = "<|endoftext|>"
BASE_ROLES = ("system", "user", "assistant")

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
# microsoft/Phi-4-mini-instruct tokenizer_config.json "chat_template", as published.
PHI4_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' "
    "+ '<|end|>' }}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)


@dataclass(frozen=True)
class ChatFormat:
    name: str  # "phi3" | "phi4"
    newline: str  # after the role token and after <|end|>: "\n" (Phi-3) or "" (Phi-4)
    tools: bool  # a system message may carry "tools" (a string, usually JSON)
    templates: tuple[str, ...]  # the chat_template texts that render this format

    def roles(self, has_token) -> tuple[str, ...]:
        """The roles a conversation may use; has_token(text) says whether the vocabulary has that added token.
        Phi-4's template renders any role as <|role|>: "tool" is offered where <|tool|> is a token."""
        if self.name == "phi4" and has_token("<|tool|>"):
            return BASE_ROLES + ("tool",)
        return BASE_ROLES

    def render(self, role: str, content: str, tools: str | None = None) -> str:
        """One message as text, from its role token through its closing <|end|> (and Phi-3's newline)."""
        nl = self.newline
        if tools is not None:
            if not self.tools or role != "system":
                raise ValueError(f"{'only a system message' if self.tools else 'no message'} can carry tools in "
                                 f"{self.name}'s chat format")
            return f"<|{role}|>{content}<|tool|>{tools}<|/tool|>{END_TOKEN}"
        return f"<|{role}|>{nl}{content}{END_TOKEN}{nl}"

    @property
    def generation_prompt(self) -> str:
        return f"<|assistant|>{self.newline}"

    def matches(self, template: str) -> bool:
        # the Hub's JSON spells Phi-3's '\n' as a real newline where the constant has Jinja's backslash-n escape;
        # Jinja renders both the same. Whitespace around the template is not rendered either.
        t = template.strip().replace("\n", "\\n")
        return any(t == known.replace("\n", "\\n") for known in self.templates)


PHI3 = ChatFormat("phi3", "\n", False, (
    PHI3_CHAT_TEMPLATE,
    # Phi-3.5-mini / the 128k update: empty system messages are skipped (refused here anyway)
    PHI3_CHAT_TEMPLATE.replace("message['role'] == 'system' %}",
                               "message['role'] == 'system' and message['content'] %}"),
))
PHI4 = ChatFormat("phi4", "", True, (PHI4_CHAT_TEMPLATE,))
FORMATS = (PHI3, PHI4)


def for_checkpoint(template: str | None, has_token) -> tuple[ChatFormat, bool]:
    """(the chat format, whether the template is one we know) for a tokenizer's chat_template text (None when it
    has none) and its vocabulary (has_token(text) -> bool)."""
    if isinstance(template, str):
        for fmt in FORMATS:
            if fmt.matches(template):
                return fmt, True
    fmt = PHI4 if has_token("<|tool|>") and has_token("<|/tool|>") else PHI3
    return fmt, template is None


__all__ = ["ChatFormat", "PHI3", "PHI4", "FORMATS", "for_checkpoint", "PHI3_CHAT_TEMPLATE", "PHI4_CHAT_TEMPLATE",
           "END_TOKEN", "BASE_ROLES"]
