"""``megalm generate``: sample text from a checkpoint with a KV cache, in any tp x pp layout.

The prompt goes through every virtual stage in pipeline order once, then one token at a time; the last stage
gathers the vocabulary-parallel logits, samples (same seed on every rank, so TP ranks agree) and broadcasts the
token to the other stages.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from megalm.checkpoint.format import CheckpointError
from megalm.config import ConfigError
from megalm.config.rules import check_sampling
from megalm.model.transformer import full_logits


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> int:
    """logits: (V,) fp32. temperature 0 means greedy."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if 0 < top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p       # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        probs /= probs.sum()
    return int(torch.multinomial(probs, 1, generator=gen))


def _run_stages(engine, topo, tokens, caches, start_pos: int, hidden: int):
    """One forward through all virtual stages; returns last-position logits on the last stage, else None."""
    chunks = engine.chunks
    v, pp = len(chunks), topo.pp
    B, T = tokens.shape
    h = None
    for vs in range(pp * v):
        owner, c = vs % pp, vs // pp
        if owner != topo.pp_rank:
            continue
        if vs == 0:
            x = tokens
        elif pp == 1:
            x = h
        else:
            x = torch.empty(B, T, hidden, device=tokens.device)
            dist.recv(x, src=topo.stage_rank((owner - 1) % pp))
        h = engine.forward(c, x, None, cache=caches[c], start_pos=start_pos)
        if vs == pp * v - 1:
            return full_logits(h[:, -1:].float(), topo.tensor_parallel)[0, -1]
        if pp > 1:
            dist.send(h.float().contiguous(), dst=topo.stage_rank((owner + 1) % pp))
    return None


@torch.no_grad()
def generate_ids(engine, topo, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8,
                 top_k: int = 50, top_p: float = 1.0, seed: int = 0, valid_vocab: int | None = None,
                 stop_id: int | None = None, max_len: int | None = None) -> list[int]:
    device = next(engine.chunks[0].parameters()).device
    hidden = engine.chunks[0].cfg.hidden_size
    gen = torch.Generator().manual_seed(seed)
    caches = [{} for _ in engine.chunks]
    ids, pos = list(prompt_ids), 0
    step_tokens = torch.tensor([ids], device=device)
    last_rank = topo.stage_rank(topo.pp - 1)
    for _ in range(max_new_tokens):
        if max_len and pos + step_tokens.shape[1] > max_len:
            break
        logits = _run_stages(engine, topo, step_tokens, caches, pos, hidden)
        token = torch.zeros(1, dtype=torch.long, device=device)
        if logits is not None:
            logits = logits.float().cpu()
            if valid_vocab is not None:
                logits[valid_vocab:] = float("-inf")                  # padding rows of the vocabulary
            token[0] = sample_next(logits, temperature, top_k, top_p, gen)
        if topo.pp_group is not None:
            dist.broadcast(token, src=last_rank, group=topo.pp_group)
        pos += step_tokens.shape[1]
        ids.append(int(token))
        if stop_id is not None and int(token) == stop_id:
            break
        step_tokens = token.view(1, 1)
    return ids


def main(argv=None) -> int:
    from megalm.inference import checkpoint_config, checkpoint_tokenizer, load_model
    from megalm.runtime import finish

    ap = argparse.ArgumentParser(prog="megalm generate", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="run directory or checkpoint folder")
    ap.add_argument("--prompt", default="def ", help="text to continue (default: %(default)r)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chat", action="store_true", help="the prompt is a user message: render it with the "
                    "checkpoint's chat template (or megalm's default) and print only the reply")
    ap.add_argument("--system", help="with --chat: a system message before the prompt")
    ap.add_argument("overrides", nargs="*", help="layout overrides, e.g. parallel.tp=2")
    args = ap.parse_args(argv)
    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    if args.system is not None and not args.chat:
        raise ConfigError("--system needs --chat (a system message only exists in a conversation)")
    cfg, reader = checkpoint_config(args.checkpoint, args.overrides + ["parallel.sequence_parallel=false"])
    tokenizer = checkpoint_tokenizer(reader)
    if tokenizer is None:
        raise CheckpointError(f"{reader.folder} carries no tokenizer.json; cannot turn the prompt into tokens")
    if args.chat:
        prompt_ids = chat_prompt_tokens(tokenizer, args.prompt, args.system, cfg.model.max_seq_len)
    else:
        prompt_ids = prompt_tokens(tokenizer, args.prompt, cfg.model.max_seq_len)
    rt, cfg, engine = load_model(cfg, reader)
    ids = generate_ids(engine, rt.topo, prompt_ids, args.max_new_tokens, args.temperature,
                       args.top_k, args.top_p, args.seed, tokenizer.vocab_size, tokenizer.eod_id, cfg.model.max_seq_len)
    if rt.is_logging_rank:
        print(reply_text(tokenizer, ids[len(prompt_ids):]) if args.chat else tokenizer.decode(ids), flush=True)
        new = len(ids) - len(prompt_ids)
        if new < args.max_new_tokens and ids[-1] != tokenizer.eod_id:
            print(f"generate: stopped after {new} new tokens at model.max_seq_len={cfg.model.max_seq_len} "
                  f"(prompt {len(prompt_ids)} tokens); use a shorter prompt for longer text", file=sys.stderr,
                  flush=True)
    finish(rt)
    return 0


def chat_prompt_tokens(tokenizer, prompt: str, system: str | None, max_len: int) -> list[int]:
    """A user message (after an optional system message) rendered with the chat template, ready for the reply."""
    from megalm.data.chat import ChatRenderer

    if not prompt.strip():
        raise ConfigError("--prompt is empty; give the user's message")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    ids, _ = tokenizer.encode_with_offsets(ChatRenderer(tokenizer).render(messages, add_generation_prompt=True))
    if len(ids) >= max_len:
        raise ConfigError(f"the rendered chat prompt is {len(ids)} tokens, but model.max_seq_len={max_len} leaves "
                          f"no room for a reply; shorten it to fewer than {max_len} tokens")
    return ids


def reply_text(tokenizer, new_ids: list[int]) -> str:
    """The reply: the generated tokens up to (not including) the end-of-turn token."""
    if tokenizer.eod_id in new_ids:
        new_ids = new_ids[:new_ids.index(tokenizer.eod_id)]
    return tokenizer.decode(new_ids)


def prompt_tokens(tokenizer, prompt: str, max_len: int) -> list[int]:
    """The prompt's ids; an empty prompt or one at or beyond the model's length is refused with its size."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ConfigError("--prompt is empty (no tokens); give some text to continue, e.g. --prompt 'def '")
    if len(ids) >= max_len:
        raise ConfigError(f"--prompt is {len(ids)} tokens, but model.max_seq_len={max_len} leaves no room to "
                          f"generate; shorten it to at most {max_len - 1} tokens")
    return ids
