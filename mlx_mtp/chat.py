"""A multi-turn conversation over one prompt cache: each turn feeds only what the cache lacks.

The cache holds exactly what was committed: the templated turns fed so far and the replies as
generated (with the EOS that ended them, or cut short). A later turn feeds only the template's
text after the last reply. That text is found by rendering the conversation with a marker in
place of the last reply, so it does not matter how the template writes replies back (trimmed,
thinking removed) or whether the reply was cut short.
"""

from typing import Iterator, List, Optional

from .generate import GenerationResponse, Pair, Stats, make_prompt_cache, stream_generate

MARKER = "MLX_MTP_LAST_REPLY"


def apply_template(pair: Pair, messages: List[dict]) -> str:
    """The conversation as the target's chat template renders it, ready for the reply."""
    tokenizer = pair.tokenizer
    if tokenizer is None or not tokenizer.has_chat_template:
        raise ValueError(f"{pair.name or 'this target'} has no chat template")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja raises its own types, e.g. for an unsupported role
        raise ValueError(f"the chat template cannot render this conversation ({e})") from None


class Conversation:
    def __init__(self, pair: Pair, system: Optional[str] = None):
        self.pair = pair
        self.system = system
        self.replies: List[Stats] = []  # stats of every reply since the conversation began
        self.reset()

    def reset(self):
        """Forget the conversation (the system prompt stays)."""
        self.messages: List[dict] = []
        self._restart()

    def set_system(self, text: Optional[str]):
        """A new system prompt; the conversation so far is read again on the next turn."""
        self.system = text or None
        self._restart()

    def _restart(self):
        self.cache = make_prompt_cache(self.pair)
        self.eos = ""  # text of the EOS that ended the last reply (in the cache, not in the reply)

    def _new_text(self, messages: List[dict]) -> str:
        system = [{"role": "system", "content": self.system}] if self.system else []
        if not self.cache.tokens:
            return apply_template(self.pair, system + messages)
        marked = messages[:-2] + [{"role": "assistant", "content": MARKER}, messages[-1]]
        text = apply_template(self.pair, system + marked)
        new = text[text.index(MARKER) + len(MARKER) :]
        if self.eos and new.startswith(self.eos):
            new = new[len(self.eos) :]  # the reply ended with the template's own end of turn
        return new

    def reply(self, user: str, **kwargs) -> Iterator[GenerationResponse]:
        """Stream the reply to `user`; same keyword arguments as `stream_generate`.

        Closing the generator early (after any chunk) keeps the reply so far, in the
        conversation and in the cache. If the turn fails before its first chunk (e.g. it does
        not fit in the context), nothing changes.
        """
        messages = self.messages + [{"role": "user", "content": user}]
        new = self._new_text(messages)
        text, last = [], None
        try:
            for last in stream_generate(self.pair, new, prompt_cache=self.cache, **kwargs):
                text.append(last.text)
                yield last
        finally:
            if last is not None:  # the prompt and at least one token were committed
                self.messages = messages + [{"role": "assistant", "content": "".join(text)}]
                self.eos = self.pair.tokenizer.decode(last.tokens[-1:]) if last.finish_reason == "stop" else ""
                self.replies.append(last.stats)
