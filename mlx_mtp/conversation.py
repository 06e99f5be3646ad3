"""A multi-turn conversation over one prompt cache: each turn feeds only what the cache lacks.

A conversation reaches the target as text in one of two ways (`Pair.chat`):
- "template": an instruction-tuned target's own chat template.
- "dialogue": a base model does not follow a chat template (it echoes the question), but it
  continues a plain-text dialogue well: a short preamble with example exchanges, then
  `User: ...` / `Assistant:` turns. The reply ends where the model starts the next turn or a
  blank line (`DIALOGUE_STOPS`); that text is never shown, and it leaves the cache.

The cache holds what was committed: the turns fed so far and the replies (with the EOS that
ended a templated one). A later turn feeds only the text after the last reply. That text is
found by rendering the conversation with a marker in place of the last reply, so it does not
matter how the template writes replies back (trimmed, thinking removed) or whether the reply
was cut short.
"""

from dataclasses import replace
from typing import Iterator, List, Optional, Sequence

from .api import GenerationResponse, make_prompt_cache, stream_generate
from .checkpoints.pair import Pair
from .checkpoints.registry import DIALOGUE
from .engine.stats import Stats
from .images import Image
from .request import GenerationRequest

MARKER = "MLX_MTP_LAST_REPLY"

# Chosen by measuring first replies to a dozen questions on the embedded Gemma 3 270M base
# (scripts/chat_questions.py; README, "Chatting with the 270M base model").
DIALOGUE_PREAMBLE = (
    "A conversation between a user and a helpful assistant. The assistant answers in one or two short sentences.\n"
    "\n"
    "User: What is the boiling point of water?\n"
    "Assistant: Water boils at 100 degrees Celsius at sea level.\n"
    "\n"
    "User: Who wrote Romeo and Juliet?\n"
    "Assistant: William Shakespeare wrote it."
)
USER, ASSISTANT = "User:", "Assistant:"
DIALOGUE_STOPS = ["\n" + USER, "\n\n"]  # the next turn, or a blank line before it


def apply_template(pair: Pair, messages: List[dict], options: Optional[dict] = None,
                   tools: Optional[List[dict]] = None) -> str:
    """The conversation as the target's chat template renders it, ready for the reply;
    `options`: the template's own variables (e.g. `enable_thinking`); `tools`: the functions
    the model may call (OpenAI's form), which the template declares."""
    tokenizer = pair.tokenizer
    if tokenizer is None or not tokenizer.has_chat_template:
        raise ValueError(f"{pair.name or 'this target'} has no chat template")
    if tools and not tokenizer.has_tool_calling:
        raise ValueError(f"the chat template of {pair.name or 'this target'} has no tool calling")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             **({"tools": tools} if tools else {}), **(options or {}))
    except Exception as e:  # jinja raises its own types, e.g. for an unsupported role
        raise ValueError(f"the chat template cannot render this conversation ({e})") from None


def render_dialogue(messages: List[dict]) -> str:
    """The conversation as a plain-text dialogue ending in `Assistant:`; a system message
    replaces the preamble's first line. Replies are written back exactly as generated (with
    their leading space), so a cached reply is a prefix of the next rendering."""
    preamble = DIALOGUE_PREAMBLE
    turns = []
    for m in messages:
        if m["role"] == "system":
            preamble = m["content"].strip() + preamble[preamble.index("\n") :]
        elif m["role"] == "user":
            turns.append(f"\n\n{USER} {m['content'].strip()}\n{ASSISTANT}")
        elif m["role"] == "assistant":
            turns.append(m["content"])
        else:
            raise ValueError(f"the dialogue has no role {m['role']!r} (system, user, assistant)")
    return preamble + "".join(turns)


def render(pair: Pair, messages: List[dict], options: Optional[dict] = None, tools: Optional[List[dict]] = None) -> str:
    """The conversation as this pair's target is asked to continue it (`options`: the chat
    template's variables, `tools`: the functions it may call; a plain dialogue has neither)."""
    if pair.chat == DIALOGUE:
        if tools:
            raise ValueError(f"{pair.name or 'this target'} is a base model: it has no chat template with tool calling")
        return render_dialogue(messages)
    return apply_template(pair, messages, options, tools)


def stop_strings(pair: Pair) -> List[str]:
    """Text that ends a reply (and is not part of it)."""
    return list(DIALOGUE_STOPS) if pair.chat == DIALOGUE else []


class Conversation:
    def __init__(self, pair: Pair, system: Optional[str] = None):
        self.pair = pair
        self.system = system
        self.stops = stop_strings(pair)
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
        self.fed = ""  # the text the last turn fed
        self.eos = ""  # text of the EOS that ended the last reply (in the cache, not in the reply)
        self.unfed = ""  # end of the last reply's text that is not in the cache

    def _new_text(self, messages: List[dict]) -> str:
        system = [{"role": "system", "content": self.system}] if self.system else []
        if not self.cache.tokens:
            return render(self.pair, system + messages)
        marked = messages[:-2] + [{"role": "assistant", "content": MARKER}, messages[-1]]
        text = render(self.pair, system + marked)
        new = text[text.index(MARKER) + len(MARKER) :]
        if self.eos and new.startswith(self.eos):
            new = new[len(self.eos) :]  # the reply ended with the template's own end of turn
        return self.unfed + new

    def reply(self, user: str, request: Optional[GenerationRequest] = None, images: Sequence[Image] = (),
              **kwargs) -> Iterator[GenerationResponse]:
        """Stream the reply to `user` (about `images`, prepared: `prepare_images`); same
        keyword arguments as `stream_generate`.

        Closing the generator early (after any chunk) keeps the reply so far, in the
        conversation and in the cache. If the turn fails before its first chunk (e.g. it does
        not fit in the context), nothing changes.
        """
        content = [{"type": "image", "image": i} for i in images] + [{"type": "text", "text": user}] if images else user
        messages = self.messages + [{"role": "user", "content": content}]
        new = self._new_text(messages)
        # The images whose placeholders the new text holds: this turn's, or all of them when
        # the whole conversation is read again.
        kwargs["images"] = [part["image"] for m in (messages if not self.cache.tokens else messages[-1:])
                            if isinstance(m["content"], list) for part in m["content"] if part["type"] == "image"]
        self.fed = new  # (what this turn feeds, up to the reply: whether it opens a thought)
        shown, tokens, last = [], [], None
        # A base model's reply ends where it begins the next turn (a stop string).
        if request is not None:
            kwargs["request"] = replace(request, stop=request.stop + tuple(self.stops))
        elif self.stops:
            kwargs["stop"] = self.stops
        stream = stream_generate(self.pair, new, prompt_cache=self.cache, **kwargs)
        try:
            for last in stream:
                tokens += last.tokens
                shown.append(last.text)
                yield last
        finally:
            stream.close()  # the row ends and hands the cache back
            if last is not None:  # the prompt and at least one token were committed
                reply = "".join(shown)
                self.messages = messages + [{"role": "assistant", "content": reply}]
                self.replies.append(last.stats)
                if self.stops:
                    self._keep_reply(reply, tokens)
                else:
                    self.eos = self.pair.tokenizer.decode(last.tokens[-1:]) if last.finish_reason == "stop" else ""

    def _keep_reply(self, reply: str, tokens: List[int]):
        """Leave in the cache only the reply's tokens whose text is part of the shown reply
        (not the stop text, an EOS, or what was committed after them); the rest of the
        reply's text is fed with the next turn."""
        decode = self.pair.tokenizer.decode
        end = next((i for i, t in enumerate(tokens) if t in self.pair.eos_ids), len(tokens))
        # The longest such prefix (a shorter one may end inside a character and decode to
        # a replacement character that the reply does not have).
        kept = next(k for k in range(end, -1, -1) if reply.startswith(decode(tokens[:k])))
        if self.cache.rewind(len(self.cache.tokens) - (len(tokens) - kept)):
            self.unfed = reply[len(decode(tokens[:kept])) :]
        else:  # the cache cannot go back that far: read the whole conversation next turn
            self._restart()
