"""``megalm eval --exact-match FILE.jsonl``: task accuracy of a fine-tuned model on questions with short answers.

Each record is a conversation (``megalm.data.chat``: prompt/response, or messages) whose last message is the
assistant's expected answer. The conversation before it is rendered with the chat template and its generation
prompt, the model replies greedily (until its end-of-turn token or ``max_new_tokens``), and the reply counts as
correct when the answer extracted from it equals the expected answer, both stripped of surrounding whitespace.
The extractor is the whole reply by default, or the first group (else the whole match) of ``--answer-regex``.
"""
from __future__ import annotations

import re

from megalm.data.chat import BadRecord, ChatRenderer, messages_of, read_jsonl
from megalm.data.errors import DataError


def extractor(pattern: str | None):
    if pattern is None:
        return lambda text: text.strip()
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise DataError(f"--answer-regex {pattern!r} is not a regular expression: {e}") from None

    def extract(text: str) -> str:
        found = compiled.search(text)
        if found is None:
            return ""
        return (found.group(1) if compiled.groups else found.group(0)).strip()
    return extract


def questions(path: str) -> tuple[list[tuple[list[dict], str]], dict]:
    """(conversation before the answer, expected answer) per usable record, and the count of each drop."""
    kept, dropped = [], {}
    for _, record in read_jsonl(path):
        try:
            if isinstance(record, BadRecord):
                raise record
            messages = messages_of(record)
            if messages[-1]["role"] != "assistant":
                raise BadRecord("the last message is not the assistant's answer")
        except BadRecord as why:
            dropped[str(why)] = dropped.get(str(why), 0) + 1
            continue
        kept.append((messages[:-1], messages[-1]["content"].strip()))
    if not kept:
        raise DataError(f"--exact-match {path}: no usable question ({dropped})")
    return kept, dropped


def exact_match(engine, topo, tokenizer, items, max_new_tokens: int, max_len: int, extract) -> dict:
    """Greedy replies to every question (collective over the model's ranks); the accuracy and a few examples."""
    from megalm.generate import generate_ids, reply_text

    renderer = ChatRenderer(tokenizer)
    correct, examples = 0, []
    for prompt, expected in items:
        ids, _ = tokenizer.encode_with_offsets(renderer.render(prompt, add_generation_prompt=True))
        out = generate_ids(engine, topo, ids, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, seed=0,
                           valid_vocab=tokenizer.vocab_size, stop_id=tokenizer.eod_id, max_len=max_len)
        reply = reply_text(tokenizer, out[len(ids):])
        hit = extract(reply) == expected
        correct += hit
        if len(examples) < 5:
            examples.append({"question": prompt[-1]["content"], "expected": expected, "reply": reply, "correct": hit})
    return {"correct": correct, "total": len(items), "accuracy": correct / len(items), "examples": examples}
