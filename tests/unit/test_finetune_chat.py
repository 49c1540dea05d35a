"""Fine-tuning on conversations end to end: the training loss is the mean over the assistant's tokens only
(checked against the model computed by hand on the same samples), evaluation scores the same tokens, and
fine-tuning at tp = 2 gives the losses of tp = 1."""
import json
import sys

import pytest
import torch
import torch.nn.functional as F

from megalm.config import load_config, resolve
from megalm.data.chat_dataset import IGNORE, ChatDataset, inputs_and_targets
from megalm.data.chat_preprocess import preprocess_chat
from megalm.runtime.spawn import run_distributed
from megalm.train.loop import train
from megalm.train.metrics import read_metrics
from tests.conftest import tiny_overrides


@pytest.fixture(scope="module")
def chat_data(tiny_corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    rows = []
    for a in range(12):
        for b in range(12):
            rows.append({"prompt": f"what is {a} plus {b}?", "response": f"{a + b}"})
            rows.append({"messages": [{"role": "system", "content": "Answer in words."},
                                      {"role": "user", "content": f"{a} times {b}"},
                                      {"role": "assistant", "content": f"it is {a * b}"}]})
    (folder / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    preprocess_chat([str(folder / "chat.jsonl")], f"{tiny_corpus}.tokenizer.json", str(folder / "sft"),
                    max_tokens=33, say=lambda line: None)
    return str(folder / "sft")


def chat_overrides(prefix, run_dir, **extra):
    return tiny_overrides(prefix, run_dir, **{"train.steps": 3, "model.vocab_size": 512, "data.split": "[80,10,10]",
                                              **extra})


def test_the_training_loss_covers_the_assistant_tokens_only(chat_data, tmp_path):
    cfg = load_config(None, chat_overrides(chat_data, tmp_path))
    train(cfg)
    logged = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]

    from megalm.parallel.parallelize import build_chunks
    from megalm.parallel.topology import build_topology

    resolved = resolve(cfg, 1)
    chunk = build_chunks(resolved, build_topology(), torch.device("cpu"))[0]
    data = ChatDataset(chat_data, "train", 32, split_weights=(80, 10, 10))
    first = torch.from_numpy(torch.stack([torch.from_numpy(data[i]) for i in range(4)]).numpy())
    by_hand = []
    for micro in (first[:2], first[2:]):
        inputs, targets, _ = inputs_and_targets(micro)
        assert (targets != IGNORE).sum() < targets.numel() / 2          # most positions are prompt or padding
        h = chunk(inputs)                                                # logits
        losses = F.cross_entropy(h.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
        by_hand.append(losses.item())
    assert logged[0] == pytest.approx(sum(by_hand) / 2, rel=1e-5)
    assert any("val_loss" in r for r in read_metrics(tmp_path))


def _train(rank, world, overrides):
    train(load_config(None, overrides))


@pytest.mark.slow
def test_chat_fine_tuning_at_tp2_equals_tp1(chat_data, tiny_corpus, tmp_path):
    pretrained = tmp_path / "pretrained"
    train(load_config(None, tiny_overrides(tiny_corpus, pretrained, **{"train.steps": 2})))
    curves = {}
    for tp in (1, 2):
        run_dir = tmp_path / f"tp{tp}"
        args = chat_overrides(chat_data, run_dir, **{"parallel.tp": tp, "checkpoint.load": pretrained,
                                                     "checkpoint.load_weights_only": "true"})
        if tp == 1:
            train(load_config(None, args))
        else:
            run_distributed(_train, 2, args)
        curves[tp] = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    torch.testing.assert_close(torch.tensor(curves[2]), torch.tensor(curves[1]), rtol=1e-5, atol=0)


def test_finetune_data_jsonl_prepares_with_the_checkpoints_tokenizer_once(chat_data, tiny_corpus, tmp_path,
                                                                          monkeypatch, capsys):
    from megalm.cli import main

    monkeypatch.chdir(tmp_path)
    pretrained = tmp_path / "pretrained"
    train(load_config(None, tiny_overrides(tiny_corpus, pretrained, **{"train.steps": 2})))
    rows = [{"prompt": f"{a} plus {b}", "response": str(a + b)} for a in range(10) for b in range(10)]
    (tmp_path / "sums.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    args = ["finetune", "--checkpoint", str(pretrained), "--data", "sums.jsonl", "--loss-on", "last"] + \
        [o for o in tiny_overrides(tiny_corpus, tmp_path / "ft", **{"train.steps": 2, "data.split": "[80,10,10]"})
         if not o.startswith(("data.prefix=", "train.run_dir="))]
    capsys.readouterr()
    assert main(args) in (0, None)
    out = capsys.readouterr().out
    assert "megalm preprocess chat: 100 kept" in out and "runs/chat-data/sums-" in out
    run_dirs = list((tmp_path / "runs").glob("finetune-*"))
    assert len(run_dirs) == 1 and [r["step"] for r in read_metrics(run_dirs[0]) if "loss" in r] == [1, 2]
    assert main(args + ["train.steps=3"]) in (0, None)                   # resumes; the prepared data reused
    out = capsys.readouterr().out
    assert "megalm preprocess chat" not in out and "resuming from" in out


def test_fine_tuning_teaches_a_task_the_untuned_model_cannot_do(tiny_corpus, tmp_path, monkeypatch, capsys):
    """Echo a short word (train on 220 words, score 40 held-out ones by exact match of greedy replies): the
    pretrained model scores none; 600 steps of full fine-tuning (7 s here) and 1,200 of LoRA (rank 16 on every
    projection, 18 s) each score at least 50% (asserted; measured figures in the README)."""
    import random
    import re

    from megalm.cli import main

    monkeypatch.chdir(tmp_path)
    rng = random.Random(0)
    words = sorted({"".join(rng.choices("abcdefghij", k=rng.randint(2, 3))) for _ in range(400)})
    rng.shuffle(words)
    for name, chosen, repeat in (("train", words[:-40], 3), ("test", words[-40:], 1)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps({"prompt": f"say {w}", "response": w})
                                                          for w in chosen * repeat))
    shape = [f"data.prefix={tiny_corpus}", "model.vocab_size=512", "data.seq_len=32", "model.max_seq_len=32",
             "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=4",
             "model.ffn_hidden_size=128", "model.init_std=0.125", "train.micro_batch_size=8",
             "train.global_batch_size=16", "optimizer.lr=3e-3", "train.eval_interval=0", "checkpoint.interval=0",
             "logging.plot=false", "logging.tensorboard=false", "train.log_interval=1000", "train.eval_samples=8"]
    # init_std 1/sqrt(hidden): a frozen embedding of GPT-2's 0.02 would cap LoRA's logits near +-1 at hidden 64
    assert main(["train", "--config", "tiny", *shape, "train.steps=200", "train.run_dir=pre"]) in (0, None)
    finetune = ["finetune", "--checkpoint", "pre", "--data", "train.jsonl", "--config", "tiny", *shape,
                "lr.warmup_steps=20", "data.split=[90,5,5]"]
    assert main([*finetune, "train.steps=600", "train.run_dir=tuned"]) in (0, None)
    assert main([*finetune, "train.steps=1200", "lora.rank=16", "lora.alpha=32", "train.run_dir=lora"]) in (0, None)
    capsys.readouterr()

    def accuracy(checkpoint: str) -> float:
        assert main(["eval", "--checkpoint", checkpoint, "--exact-match", "test.jsonl", "--max-new-tokens", "8"]) == 0
        line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("exact match on"))
        print(checkpoint, line, file=sys.__stderr__)           # beside pytest's capture: the figures
        right, total = line.split(": ")[1].split(" = ")[0].split("/")
        assert int(total) == 40
        return int(right) / 40
    assert accuracy("pre") <= 0.05
    assert accuracy("tuned") >= 0.5
    assert accuracy("lora") >= 0.5
    assert main(["generate", "--checkpoint", "tuned", "--chat", "--prompt", "say abc", "--temperature", "0",
                 "--max-new-tokens", "8"]) == 0
    reply = capsys.readouterr().out.strip()               # only the reply: no template, no end-of-turn token
    assert re.fullmatch("[a-j]{1,8}", reply), reply


def test_packed_chat_training_loss_is_the_packed_models_by_hand(chat_data, tmp_path):
    """data.pack: several conversations per sample; the logged loss equals the model run by hand on the packed
    samples with their segments (and fewer samples than conversations)."""
    cfg = load_config(None, chat_overrides(chat_data, tmp_path, **{"data.pack": "true", "data.seq_len": 96,
                                                                    "model.max_seq_len": 96}))
    train(cfg)
    logged = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]

    from megalm.parallel.parallelize import build_chunks
    from megalm.parallel.topology import build_topology

    chunk = build_chunks(resolve(cfg, 1), build_topology(), torch.device("cpu"))[0]
    data = ChatDataset(chat_data, "train", 96, split_weights=(80, 10, 10), pack=True)
    alone = ChatDataset(chat_data, "train", 96, split_weights=(80, 10, 10))
    assert len(data) < len(alone) / 1.5                               # conversations share samples
    first = torch.stack([torch.from_numpy(data[i]) for i in range(4)])
    assert first.shape == (4, 3, 97) and int(first[:, 2].max()) >= 2
    by_hand = []
    for micro in (first[:2], first[2:]):
        inputs, targets, segments = inputs_and_targets(micro)
        logits = chunk(inputs, segments=segments)
        by_hand.append(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE).item())
    assert logged[0] == pytest.approx(sum(by_hand) / 2, rel=1e-5)
    # The log's FLOPs count each conversation's own attention, not the padded sequence's
    from megalm.flops import attention_span_of, flops_per_token

    record = next(r for r in read_metrics(tmp_path) if r.get("step") == 1 and "tflops_per_device" in r)
    per_token = record["tflops_per_device"] * 1e12 / record["tokens_per_s"]
    expected = flops_per_token(resolve(cfg, 1).model, 96, attention_span=attention_span_of(first[:, 2, :-1]))
    assert per_token == pytest.approx(expected.model, rel=1e-6)
    assert per_token < flops_per_token(resolve(cfg, 1).model, 96).model


def test_pretraining_with_document_mask_trains(tiny_corpus, tmp_path):
    train(load_config(None, tiny_overrides(tiny_corpus, tmp_path, **{"train.steps": 3, "data.document_mask": "true"})))
    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    assert len(losses) == 3 and all(0 < x < 10 for x in losses)
