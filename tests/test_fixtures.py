"""The shared base model really learned the synthetic corpus (other stage tests rely on it)."""

import json
import math

from tiaoyu_cli.data.shards import open_tokens


def test_base_model_beats_unigram_baseline(base_ckpt, tokens_dir):
    import numpy as np

    info = json.loads((base_ckpt / "trainer.json").read_text())
    val_loss = info["eval"]["val_loss"]
    train, _ = open_tokens(tokens_dir)
    counts = np.zeros(train.vocab_size, dtype=np.int64)
    for arr in train.arrays():
        counts += np.bincount(np.asarray(arr), minlength=train.vocab_size)
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(p * np.log(p)).sum())
    assert math.isfinite(val_loss)
    assert val_loss < 0.6 * unigram_entropy, (val_loss, unigram_entropy)
