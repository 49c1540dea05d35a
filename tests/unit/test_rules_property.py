"""The rule book at world sizes up to 4096, property-based (Hypothesis, no processes): a layout is refused
before anything is allocated exactly when an independent statement of the rules says it is invalid, with one
line that is the same every time (every rank computes it from the same config)."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megalm.config import ConfigError, load_config
from megalm.config.rules import validate


def invalid_because(c: dict) -> list[str]:
    """The rules, stated again independently of megalm/config/rules.py: every reason the layout is invalid."""
    why = []
    tp, pp, v, heads, kv = c["tp"], c["pp"], c["v"], c["heads"], c["kv"]
    if c["hidden"] % heads or (c["hidden"] // heads) % 2:
        why.append("head dim")
    if heads % kv:
        why.append("gqa groups")
    if heads % tp:
        why.append("heads % tp")
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        why.append("kv heads vs tp")
    if c["ffn"] % tp or c["vocab"] % tp:
        why.append("ffn or vocab % tp")
    if c["layers"] % (pp * v):
        why.append("layers % (pp x v)")
    if v > 1 and pp == 1:
        why.append("virtual stages without pp")
    if c["sp"] and (tp == 1 or c["seq"] % tp):
        why.append("sequence parallel")
    if c["world"] % (tp * pp):
        why.append("world % (tp x pp)")
    else:
        dp = c["world"] // (tp * pp)
        if c["dp"] is not None and c["dp"] != dp:
            why.append("explicit dp")
        per_step = c["mbs"] * dp
        if c["gbs"] % per_step:
            why.append("global batch")
        elif v > 1 and (c["gbs"] // per_step) % pp:
            why.append("interleaved micro-batches")
    return why


def overrides(c: dict) -> list[str]:
    out = [f"parallel.tp={c['tp']}", f"parallel.pp={c['pp']}", f"parallel.virtual_stages={c['v']}",
           f"model.num_heads={c['heads']}", f"model.num_kv_heads={c['kv']}", f"model.hidden_size={c['hidden']}",
           f"model.ffn_hidden_size={c['ffn']}", f"model.vocab_size={c['vocab']}", f"model.num_layers={c['layers']}",
           "model.position=rope", f"parallel.sequence_parallel={str(c['sp']).lower()}", f"data.seq_len={c['seq']}",
           f"model.max_seq_len={c['seq']}", f"train.global_batch_size={c['gbs']}",
           f"train.micro_batch_size={c['mbs']}", "train.device=cpu"]
    return out + ([f"parallel.dp={c['dp']}"] if c["dp"] is not None else [])


@st.composite
def layouts(draw):
    tp = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 16]))
    pp = draw(st.sampled_from([1, 2, 3, 4, 8, 16]))
    dp = draw(st.integers(1, max(1, 4096 // (tp * pp))))
    world = tp * pp * dp if draw(st.booleans()) else draw(st.integers(1, 4096))
    heads = draw(st.sampled_from([1, 2, 4, 6, 8, 12, 16, 32, 64]))
    kv = draw(st.sampled_from([k for k in (1, 2, 4, 8, 16, heads) if k <= heads] + [3]))
    head_dim = draw(st.sampled_from([8, 16, 64, 7]))
    layers = draw(st.sampled_from([1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 80]))
    micro = draw(st.integers(1, 8))
    return {"tp": tp, "pp": pp, "v": draw(st.sampled_from([1, 1, 2, 3])), "heads": heads, "kv": kv,
            "hidden": heads * head_dim + draw(st.sampled_from([0, 0, 0, 1])),
            "ffn": draw(st.sampled_from([256, 384, 1000, 1536, 11008])),
            "vocab": draw(st.sampled_from([512, 1000, 32768])),
            "layers": layers, "sp": draw(st.booleans()), "seq": draw(st.sampled_from([64, 96, 100, 128])),
            "world": world, "dp": draw(st.sampled_from([None, None, dp, dp + 1])), "mbs": micro,
            "gbs": micro * dp * draw(st.sampled_from([1, 2, 3, 4, 8, 16])) + draw(st.sampled_from([0, 0, 0, 1]))}


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts())
def test_a_layout_is_refused_exactly_when_it_breaks_a_rule(c):
    why = invalid_because(c)
    cfg = load_config(None, overrides(c))
    messages = []
    for _ in range(2):
        try:
            validate(cfg, c["world"], cuda=False)
        except ConfigError as e:
            messages.append(str(e))
    if why:
        assert len(messages) == 2 and messages[0] == messages[1], (why, c)
        assert "\n" not in messages[0] and any(ch.isdigit() for ch in messages[0])   # one line with the values
    else:
        assert messages == [], (c, messages)
