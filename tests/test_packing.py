"""Packing for SFT (`data.packing=true`): several conversations per window, positions restarting
at each and a block-diagonal causal mask, so that each is computed as alone; with it off, the
default path is untouched (tests/test_decoder.py: a checkpoint of an earlier version computes
the same, bitwise)."""

from __future__ import annotations

import re

import pytest
import torch

from bigmodel.nets.gpt import GPT
from tests.chat_fixtures import write_chat_model, write_chat_rows
from tests.conftest import logged, run_cli, run_dirs

NETS = {
    "gpt2": dict(),
    "llama": dict(positions="rotary", norm="rmsnorm", mlp="swiglu", n_kv_head=1, bias=False),
}


@pytest.mark.parametrize("family", NETS)
def test_a_packed_window_computes_each_sequence_as_alone(family):
    torch.manual_seed(0)
    net = GPT(vocab_size=50, n_layer=2, n_head=2, n_embd=16, block_size=32, **NETS[family]).eval()
    seqs = [torch.randint(0, 50, (1, n)) for n in (7, 11, 5)]
    pad = torch.zeros(1, 4, dtype=torch.long)
    x = torch.cat([*seqs, pad], 1)
    documents = torch.cat(
        [torch.full_like(s, d) for d, s in enumerate(seqs)] + [torch.full_like(pad, -1)], 1
    )
    with torch.no_grad():
        packed = net(torch.cat([x, x.flip(1)]), documents=torch.cat([documents, documents.flip(1)]))
        alone = torch.cat([net(s) for s in seqs], 1)
        alone_flipped = torch.cat([net(s.flip(1)) for s in reversed(seqs)], 1)
    n = alone.shape[1]
    assert (packed[0, :n] - alone[0]).abs().max() < 1e-5
    assert (packed[1, 4:] - alone_flipped[0]).abs().max() < 1e-5  # padding first, then three
    # without documents the same window is one sequence: the later ones see the earlier
    with torch.no_grad():
        assert (net(x)[0, 7:n] - alone[0, 7:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="neither a cache nor pad_mask"):
        net(x, pad_mask=torch.ones_like(x, dtype=torch.bool), documents=documents)


def test_sft_with_packing_scores_as_without_and_pads_less(tmp_path):
    """At lr 0, val/loss over the same conversations is the same packed or not (the mean over
    every assistant token of the split), from fewer, fuller windows."""
    folder = write_chat_model(tmp_path / "model")
    data = write_chat_rows(tmp_path / "chat.jsonl", n=40)
    losses = {}
    for packing in ("false", "true"):
        cwd = tmp_path / f"packing_{packing}"
        cwd.mkdir()
        proc = run_cli(
            "train.py",
            "experiment=sft",
            f"model.init_from={folder}",
            f"data.path={data}",
            f"data.packing={packing}",
            "data.splits=[0.5,0.5,0.0]",
            "data.batch_size=4",
            "optimizer.lr=0",
            "test=false",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "trainer.log_every_n_steps=1",
            "callbacks.throughput.window_size=2",
            cwd=cwd,
            env={"OMP_NUM_THREADS": "1"},
        )
        (run,) = run_dirs(cwd)
        losses[packing] = logged(run, "val/loss")[-1]
        said = re.findall(
            r"data.packing: 20 conversations in (\d+) windows", proc.stdout + proc.stderr
        )
        assert bool(said) == (packing == "true")
        if said:
            assert all(int(n) < 10 for n in said), said  # both splits: fewer, fuller windows
    assert abs(losses["true"] - losses["false"]) < 1e-5, losses
