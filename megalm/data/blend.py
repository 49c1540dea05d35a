"""Several datasets drawn in fixed proportions (``data.blend``), deterministically and resumably.

Sample i of the blended stream comes from source d(i), chosen by Balinski and Young's quota method (1975), where
c_d(i) counts the samples of source d among the first i: among the sources that one more sample would not lift
above their upper quota (c_d(i) < w_d * (i + 1)), the one with the largest w_d / (c_d(i) + 1), ties to the
earlier source. It keeps floor(w_d * n) <= c_d(n) <= ceil(w_d * n) for every n, so after any number of samples
every source has its share within one sample; Megatron's greedy largest-deficit rule can stray a little beyond
one. It is sample c_d(i) of that source's own shuffled infinite stream (``TokenDataset[k]``: a small source repeats in
epochs). The assignment depends on nothing but the weights, so any index can be read in any layout, and resuming
from ``consumed_samples`` reads exactly what an uninterrupted run would.

Assignments are computed in blocks of ``BLOCK`` samples; only the counts at each block's start are kept (a few
integers per block), and a block's sources are recomputed from them when needed.
"""
from __future__ import annotations

import functools

import numpy as np

from megalm.config.rules import blend_sources
from megalm.data.errors import DataError
from megalm.data.tokenizer import first_tokenizer_mismatch

BLOCK = 4096


class BlendedDataset:
    """The blend of ``sources`` (each a ``TokenDataset`` of one split) with ``weights`` summing to 1."""

    def __init__(self, sources: list, weights: list[float], names: list[str]):
        if not len(sources) == len(weights) == len(names) or not sources:
            raise DataError("a blend needs as many weights and names as sources, at least one")
        self.sources, self.weights, self.names = sources, [float(w) for w in weights], names
        self.split, self.seq_len = sources[0].split, sources[0].seq_len
        self.num_samples = sum(len(s) for s in sources)
        self._starts = [np.zeros(len(sources), dtype=np.int64)]      # counts at the start of each block

    def __len__(self) -> int:
        return self.num_samples

    def _block_start(self, block: int) -> np.ndarray:
        while len(self._starts) <= block:
            b = len(self._starts) - 1
            ids = self._block(b)
            self._starts.append(self._starts[b] + np.bincount(ids, minlength=len(self.sources)))
        return self._starts[block]

    @functools.lru_cache(maxsize=8)
    def _block(self, block: int) -> np.ndarray:
        """The source of each sample of the block (int16)."""
        counts = [int(c) for c in self._block_start(block)]
        weights, first = self.weights, block * BLOCK
        out = np.empty(BLOCK, dtype=np.int16)
        for j in range(BLOCK):
            n = first + j + 1
            best, best_priority = -1, -1.0
            for d, (w, c) in enumerate(zip(weights, counts)):
                if c < w * n + 1e-9 and w / (c + 1) > best_priority:
                    best, best_priority = d, w / (c + 1)
            counts[best] += 1
            out[j] = best
        return out

    def locate(self, i: int) -> tuple[int, int]:
        """(source, index in that source's stream) of blended sample i."""
        block, j = divmod(int(i), BLOCK)
        ids = self._block(block)
        d = int(ids[j])
        return d, int(self._block_start(block)[d]) + int(np.count_nonzero(ids[:j] == d))

    def counts(self, n: int) -> np.ndarray:
        """Samples of each source among the first n."""
        block, j = divmod(int(n), BLOCK)
        start = self._block_start(block).copy()
        if j:
            start += np.bincount(self._block(block)[:j], minlength=len(self.sources))
        return start

    def __getitem__(self, i: int) -> np.ndarray:
        """Blended sample i of the shuffled stream."""
        d, k = self.locate(i)
        return self.sources[d][k]

    def sample(self, k: int) -> np.ndarray:
        """Blended sample k without shuffling (evaluation): the sources' own unshuffled samples, in epochs."""
        d, j = self.locate(k)
        return self.sources[d].sample(j % len(self.sources[d]))

    def state(self, consumed: int) -> list[dict]:
        """What a checkpoint records: each source's prefix, weight and samples consumed."""
        return [{"prefix": name, "weight": w, "consumed": int(c)}
                for name, w, c in zip(self.names, self.weights, self.counts(consumed))]

    def epochs_warning(self, samples: int) -> list[str]:
        """One line per source that ``samples`` draws would read more than once."""
        lines = []
        for name, source, count in zip(self.names, self.sources, self.counts(samples)):
            if count > len(source):
                lines.append(f"data.blend: {name} gives {count} of the run's {samples} {self.split} samples but "
                             f"holds {len(source)}: it is read {count / len(source):.2f} times (in epochs, each "
                             f"reshuffled)")
        return lines


def check_resumed_blend(blend: BlendedDataset, saved: list | None, consumed: int) -> None:
    """A resumed run must read on with the blend it was saved with: same sources, same weights, same counts."""
    if consumed == 0:
        return
    if saved is None:
        raise DataError(f"the checkpoint was trained on one dataset, not data.blend {blend.names}: resume with its "
                        f"data.prefix, or start a new train.run_dir (or fine-tune from it)")
    mine = blend.state(consumed)

    def key(state):
        return [(s["prefix"], round(s["weight"], 12), s["consumed"]) for s in state]

    def shown(state):
        return ", ".join(f"{s['prefix']} {s['weight']:.4g}" for s in state)
    if key(saved) != key(mine):
        raise DataError(f"the checkpoint was trained on data.blend [{shown(saved)}], not this run's [{shown(mine)}]: "
                        f"resume with the same blend, or start a new train.run_dir (or fine-tune from the checkpoint)")


def same_tokenizer(prefixes: list[str]) -> None:
    """Every source was tokenized with the first one's tokenizer (the files are equal byte for byte)."""
    mismatch = first_tokenizer_mismatch(prefixes)
    if mismatch is not None:
        other, path = mismatch
        raise DataError(f"data.blend: {other} was tokenized with another tokenizer than {prefixes[0]} ({path} "
                        f"differs or is missing): preprocess every source with the same --tokenizer")


def tokenizer_prefix(data_cfg) -> str | None:
    """The dataset whose tokenizer a run uses: data.prefix, or the blend's first source."""
    if data_cfg.blend is not None:
        return blend_sources(data_cfg.blend)[0][0]
    return data_cfg.prefix


def _eod(prefix) -> int:
    from megalm.data.tokenizer import dataset_tokenizer

    tokenizer = dataset_tokenizer(prefix)
    if tokenizer is None:
        raise DataError(f"data.document_mask needs {prefix}'s tokenizer (PREFIX.tokenizer.json) to find where "
                        f"documents end; preprocess it again, or set data.document_mask=false")
    return tokenizer.eod_id


def open_split(data_cfg, split: str, vocab_size: int | None):
    """The split of data.prefix (a TokenDataset) or of data.blend (a BlendedDataset)."""
    from megalm.data.chat_dataset import ChatDataset
    from megalm.data.chat_preprocess import is_chat_dataset
    from megalm.data.dataset import TokenDataset

    def one(prefix):
        args = (prefix, split, data_cfg.seq_len, data_cfg.seed, vocab_size, tuple(data_cfg.split))
        if is_chat_dataset(prefix):                    # conversations: one per sample, or packed
            return ChatDataset(*args, pack=data_cfg.pack)
        return TokenDataset(*args, document_eod=_eod(prefix) if data_cfg.document_mask else None)
    if data_cfg.blend is None:
        return one(data_cfg.prefix)
    pairs = blend_sources(data_cfg.blend)
    prefixes = [p for p, _ in pairs]
    chats = [is_chat_dataset(p) for p in prefixes]
    if any(chats) and not all(chats):
        raise DataError(f"data.blend mixes chat datasets ({', '.join(p for p, c in zip(prefixes, chats) if c)}) "
                        f"with token datasets: blend one kind only")
    same_tokenizer(prefixes)
    return BlendedDataset([one(p) for p in prefixes], [w for _, w in pairs], prefixes)
