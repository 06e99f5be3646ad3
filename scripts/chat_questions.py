"""First replies to a dozen questions through `mlx-mtp chat`'s framing, to judge it by reading.

For a base target (`chat = "dialogue"`) the framing is chat.DIALOGUE_PREAMBLE; `--preamble FILE`
tries another one (its text, example exchanges included, in place of the preamble). Prints
each question, its greedy reply, and how the reply ended: at the next turn ("turn"), or at
the token limit ("length", a reply that does not end by itself).

    python scripts/chat_questions.py [-m gemma-3-270m] [--preamble FILE] [-n 64]
"""

import argparse
from pathlib import Path

import mlx_mtp  # loads MKL before mlx where available
from mlx_mtp import conversation as chat

QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Who painted the Mona Lisa?",
    "What is the largest planet in our solar system?",
    "What language is spoken in Brazil?",
    "What is 12 plus 7?",
    "Name a fruit that is yellow.",
    "How do I boil an egg?",
    "Why is the sky blue?",
    "Can you recommend a good book?",
    "What should I pack for a beach holiday?",
    "Tell me a joke.",
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="gemma-3-270m")
    parser.add_argument("--preamble", type=Path, help="a file with another dialogue preamble")
    parser.add_argument("-n", "--max-tokens", type=int, default=64)
    args = parser.parse_args()
    if args.preamble and not args.preamble.is_file():
        parser.error(f"--preamble: no file {args.preamble}")
    if args.max_tokens < 1:
        parser.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.preamble:
        chat.DIALOGUE_PREAMBLE = args.preamble.read_text()
    try:
        pair = mlx_mtp.load(args.model)
    except ValueError as e:  # mlx_mtp.LoadError
        parser.exit(1, f"error: {e}\n")
    ended, lengths = [], []
    for question in QUESTIONS:
        conversation = chat.Conversation(pair)
        reply, last = "", None
        for last in conversation.reply(question, max_tokens=args.max_tokens):
            reply += last.text
        ended.append("turn" if last.finish_reason == "stop" else "length")
        lengths.append(last.stats.generation_tokens)
        print(f"Q: {question}\nA: {reply.strip()}\n   [{ended[-1]}, {lengths[-1]} tokens]\n")
    print(f"{ended.count('turn')} of {len(QUESTIONS)} replies ended at the next turn; "
          f"{sum(lengths) / len(lengths):.1f} tokens on average")


if __name__ == "__main__":
    main()
