"""Chat data for fine-tuning: the loss mask comes from the template's own rendering, for three templates
(megalm's default, ChatML with special tokens, and a plain-text one whose response header tokenizes differently in
context than alone), checked against spans built independently for a thousand generated conversations; a
hand-computed loss; every dropped record counted; the memory-mapped format read back."""
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megalm.data.chat import BadRecord, ChatRenderer, messages_of
from megalm.data.chat_dataset import IGNORE, ChatDataset, inputs_and_targets
from megalm.data.chat_preprocess import preprocess_chat
from megalm.data.errors import DataError
from megalm.data.tokenizer import SpecialTokens, Tokenizer, load_tokenizer

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
PLAIN = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '\n### Response:' + m['content'] + eos_token }}"
         "{% else %}{{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '\n### Response:' }}"
         "{% endif %}")


def by_hand(template: str, messages, eos: str) -> tuple[str, list[tuple[int, int]]]:
    """Each template written out in Python: the text and the assistant spans, built piece by piece."""
    text, spans = "", []
    for m in messages:
        if template == "default":
            head, tail = f"<|{m['role']}|>\n", (eos if m["role"] == "assistant" else "") + "\n"
        elif template == "chatml":
            head, tail = f"<|im_start|>{m['role']}\n", "<|im_end|>\n"
        else:
            head, tail = ("\n### Response:", eos) if m["role"] == "assistant" else ("", "")
        if m["role"] == "assistant":
            start = len(text) + len(head)
            text += head + m["content"] + tail
            spans.append((start, len(text)))
        else:
            text += head + m["content"] + tail
    return text, spans


WORDS = ["two", "plus", "three", " is", "five", "def", "(x)", "return", "\n", "Q:", "A:", "###", "é", "  "]


def conversations(n: int, seed: int = 0):
    rng = random.Random(seed)
    words = WORDS
    for _ in range(n):
        msgs = [{"role": "system", "content": "".join(rng.choices(words, k=rng.randint(1, 4)))}] \
            if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 6)))})
            msgs.append({"role": "assistant", "content": "".join(rng.choices(words, k=rng.randint(1, 6))) + "."})
        yield msgs


@pytest.fixture(scope="module")
def tokenizers_by_template(tiny_corpus):
    base = load_tokenizer(f"{tiny_corpus}.tokenizer.json")
    chatml = Tokenizer.from_str(base.to_str())
    chatml._tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    chatml = Tokenizer(chatml._tok, SpecialTokens("<|im_end|>", chat_template=CHATML))
    # SentencePiece-style (Metaspace): "### Response:" alone gets a word-start marker it lacks after a newline,
    # the case that breaks masks found by searching the ids for the response header (TRL's known failure)
    from tokenizers import SentencePieceBPETokenizer

    pieces = SentencePieceBPETokenizer()
    text = " ".join(WORDS) + " what is two plus three\n### Response: five. é (x)"
    pieces.train_from_iterator([text] * 20, vocab_size=200, special_tokens=["</s>"], show_progress=False)
    plain = Tokenizer(pieces._tokenizer, SpecialTokens("</s>"))
    return {"default": (base, None), "chatml": (chatml, None), "plain": (plain, PLAIN)}


def test_the_plain_template_header_tokenizes_differently_in_context(tokenizers_by_template):
    tok, _ = tokenizers_by_template["plain"]
    alone = tok.encode("### Response:")
    in_context = tok.encode("what is two\n### Response:")
    assert alone[0] not in in_context                 # so searching the ids for the header would miss it


@pytest.mark.parametrize("name", ["default", "chatml", "plain"])
def test_masked_tokens_are_the_assistant_spans_for_a_thousand_conversations(tokenizers_by_template, name):
    tok, template = tokenizers_by_template[name]
    renderer = ChatRenderer(tok, template)
    checked = 0
    for msgs in conversations(1000, seed=hash(name) % 1000):
        text, spans = renderer.assistant_spans(msgs)
        expected_text, expected_spans = by_hand(name, msgs, tok.special.eod)
        assert (text, spans) == (expected_text, expected_spans)
        ids, mask = renderer.encode(msgs)
        _, offsets = tok.encode_with_offsets(text)
        expected = [int(any(a <= s < b for a, b in expected_spans) and e > s) for s, e in offsets]
        assert mask == expected
        trained = tok.decode([i for i, m in zip(ids, mask) if m])
        assert all(m["content"].strip() in trained for m in msgs if m["role"] == "assistant")   # a leading
        # space can share a token with the header before it: that token starts outside the span, so is not trained
        checked += 1
    assert checked == 1000


def test_loss_on_the_last_turn_only(tokenizers_by_template):
    tok, _ = tokenizers_by_template["default"]
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "one"},
            {"role": "user", "content": "b"}, {"role": "assistant", "content": "two"}]
    ids, mask = ChatRenderer(tok).encode(msgs, loss_on="last")
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "two" + tok.special.eod + "\n"


def test_the_loss_is_the_mean_over_assistant_tokens_by_hand():
    batch = torch.tensor([[[5, 6, 7, 8, 0], [0, 0, 1, 1, 0]]])           # tokens; mask on 7 and 8 (padded)
    inputs, targets, _ = inputs_and_targets(batch)
    assert inputs.tolist() == [[5, 6, 7, 8]] and targets.tolist() == [[IGNORE, 7, 8, IGNORE]]
    logits = torch.randn(1, 4, 10)
    loss = F.cross_entropy(logits.view(-1, 10), targets.view(-1), ignore_index=IGNORE)
    log_p = logits.log_softmax(-1)
    assert loss.item() == pytest.approx(-(log_p[0, 1, 7] + log_p[0, 2, 8]).item() / 2, rel=1e-6)


@pytest.mark.parametrize("record,why", [
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role 'robot'"),
    ({"prompt": "q"}, "neither messages nor prompt/response"),
    ({"prompt": "q", "response": "  "}, "empty assistant response"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant message"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "a"}]}, "system message after the first"),
    ([1, 2], "not a JSON object"),
])
def test_malformed_records_are_named(record, why):
    with pytest.raises(BadRecord, match=why):
        messages_of(record)


def test_preprocess_counts_every_drop_and_the_dataset_reads_back(tokenizers_by_template, tmp_path, tiny_corpus):
    rows = [{"prompt": "what is two plus three", "response": "five"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]},
            {"prompt": "x", "response": ""},                                            # empty response
            {"prompt": "inject", "response": "<|endoftext|> sneaky"},                   # special token text
            {"prompt": "word " * 200, "response": "long"}]                              # too long
    source = tmp_path / "chat.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    counts = preprocess_chat([str(source)], f"{tiny_corpus}.tokenizer.json", str(tmp_path / "sft"),
                             max_tokens=64, say=lambda line: None)
    assert counts.kept == 2 and sum(counts.dropped.values()) == 4, counts.dropped
    assert any("special token text" in why for why in counts.dropped)
    assert any("longer than --max-tokens 64" in why for why in counts.dropped)
    report = json.loads((tmp_path / "sft.report.json").read_text())
    assert report["kept"] == 2 and report["template"] == "megalm's default chat template"
    data = ChatDataset(str(tmp_path / "sft"), "train", 63, split_weights=(1, 0, 0))
    sample = data.sample(0)
    assert sample.shape == (2, 64) and set(np.unique(sample[1])) <= {0, 1} and sample[1].sum() > 0
    tok = load_tokenizer(f"{tiny_corpus}.tokenizer.json")
    answers = {tok.decode(data.sample(k)[0][data.sample(k)[1] == 1]) for k in range(len(data))}
    assert answers == {"five" + tok.special.eod + "\n", "hello there" + tok.special.eod + "\n"}
    with pytest.raises(DataError, match="longer than data.seq_len"):
        ChatDataset(str(tmp_path / "sft"), "train", 8, split_weights=(1, 0, 0))


def test_a_template_that_is_not_prefix_stable_is_refused(tokenizers_by_template):
    tok, _ = tokenizers_by_template["default"]
    unstable = "{{ messages | length }}:{% for m in messages %}{{ m['content'] }}{% endfor %}"   # the count changes
    with pytest.raises(DataError, match="renders a conversation's beginning differently"):
        ChatRenderer(tok, unstable).encode([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])


def test_a_template_that_needs_tokens_the_tokenizer_lacks_is_refused(tokenizers_by_template):
    base, _ = tokenizers_by_template["default"]                    # no <|im_start|> or <|im_end|> in it
    with pytest.raises(DataError, match=r"<\|im_end\|>, <\|im_start\|>, which the tokenizer has no token for"):
        ChatRenderer(base, CHATML)
    chatml, _ = tokenizers_by_template["chatml"]
    ChatRenderer(chatml)                                            # its own template: every marker is a token
