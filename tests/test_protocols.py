"""The eSASRec protocol next to TIGER's: SASRec's sampled softmax, seen-item filtering in every model's list, and the
test fit that trains with the validation item for the epochs the validation fit chose."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genrec.core.bundle import Bundle
from genrec.core.config import SASRecConfig
from genrec.core.data import eval_split, load_dataset, seen_items, train_sequences
from genrec.evaluation import evaluate, popularity_topk, sasrec_topk
from genrec.models.sasrec import SASRec

from conftest import run_cli


def test_sampled_softmax_is_the_target_against_uniform_negatives():
    model = SASRec(SASRecConfig(d_model=16, n_heads=1, n_layers=1, dropout=0.0, max_history=6, loss="sampled",
                                negatives=5), n_items=40).eval()
    windows = torch.tensor([[-1, -1, 3, 7, 9, 2, 11], [4, 8, 15, 16, 23, 42 % 40, 1]])
    torch.manual_seed(3)
    loss = model(windows)["loss"]
    # By hand, position by position: the hidden state against its target and its sequence's 5 uniform draws.
    inputs, targets = windows[:, :-1], windows[:, 1:]
    h = model.encode(inputs)
    torch.manual_seed(3)
    neg = torch.randint(0, 40, (2, 5))
    e, terms = model.item_emb.weight, []
    for b in range(2):
        for t in range(inputs.shape[1]):
            if inputs[b, t] >= 0 and targets[b, t] >= 0:
                logits = torch.cat([e[targets[b, t]][None], e[neg[b]]]) @ h[b, t]  # (1 + K,)
                terms.append(-torch.log_softmax(logits, 0)[0])
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-6)
    model.train()
    model(windows)["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_filtering_keeps_seen_items_out_of_every_list(demo_bundle, demo_data, tmp_path):
    ds = load_dataset(demo_data)
    seen = seen_items(ds, "test")
    results = evaluate(Bundle.load(demo_bundle), ds, "test", predictions=tmp_path / "p.jsonl", filter_seen=True,
                       log=lambda *a: None)
    assert results["filter_seen"] and results["invalid_rate"] == 0.0
    ids = Bundle.load(demo_bundle).catalog.ids
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert all(not set(r["topk"]) & set(ids[s].tolist()) for r, s in zip(rows, seen))
    plain = evaluate(Bundle.load(demo_bundle), ds, "test", log=lambda *a: None)
    assert results["recall@10"] >= plain["recall@10"]  # 5-core-like data: a seen item is never the target

    n = len(ids)
    counts = np.random.default_rng(0).integers(0, 50, n)
    top = popularity_topk(counts, len(seen), 10, seen)
    order = np.argsort(-counts, kind="stable")
    for row, s in zip(top[:300], seen):  # against the obvious per-user loop
        assert row.tolist() == [i for i in order if i not in set(s.tolist())][:10]
    sas = SASRec(SASRecConfig(d_model=16, n_heads=1, n_layers=1), n).eval()
    split = eval_split(ds, "test", sas.cfg.max_history)
    got = sasrec_topk(sas, split.histories, 10, batch_size=64, seen=seen)
    assert all(not set(row.tolist()) & set(s.tolist()) for row, s in zip(got, seen))


def test_test_fit_trains_with_the_validation_item_for_the_chosen_epochs(tmp_path, tiny_bundle, tiny_data):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    common = ["--bundle", bundle, "--data", tiny_data, "--batch-size", "64"]
    early = run_cli("train", "sasrec", *common, "--fit", "test", check=False)
    assert early.returncode == 2 and "--fit valid" in early.stderr  # nothing chose the epochs yet
    run_cli("train", "sasrec", *common, "--max-epochs", "4", "--eval-every", "1", "--run-dir", tmp_path / "v")
    chosen = Bundle.load(bundle).manifest["training"]["sasrec"]
    run_cli("train", "sasrec", *common, "--max-epochs", "4", "--eval-every", "1", "--fit", "test", "--run-dir",
            tmp_path / "t")
    fitted = Bundle.load(bundle).manifest["training"]["sasrec"]
    assert fitted["fit"] == "test" and fitted["epochs"] == chosen["best_epoch"] >= 1
    assert fitted["valid_fit"]["best_step"] == chosen["best_step"]
    ds = load_dataset(tiny_data)
    longer = sum(len(s) - 1 for s in train_sequences(ds, "test")) - sum(len(s) - 1 for s in train_sequences(ds))
    assert longer == sum(len(s) >= 3 for s in ds.sequences)  # one more target per evaluated user: the valid item
    assert not any("ndcg@10" in json.loads(x) for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines())

    run_cli("train", "sft", *common, "--max-epochs", "2", "--eval-every", "1", "--run-dir", tmp_path / "sv")
    run_cli("train", "sft", *common, "--max-epochs", "2", "--eval-every", "1", "--fit", "test", "--run-dir",
            tmp_path / "st")
    refused = run_cli("eval", "--bundle", bundle, "--data", tiny_data, "--split", "valid", check=False)
    assert refused.returncode == 2 and "--split test" in refused.stderr
    run_cli("eval", "--bundle", bundle, "--data", tiny_data, "--split", "test", "--filter-seen", "--json",
            tmp_path / "r.json")
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["fit"] == "test" and out["fit_sasrec"] == "test" and out["filter_seen"]
    assert out["invalid_rate"] == 0.0 and "sasrec" in out["baselines"]


@pytest.mark.parametrize("fit", ["train", "", "validation"])
def test_train_sequences_names_its_fits(tiny_data, fit):
    with pytest.raises(ValueError, match="'valid' or 'test'"):
        train_sequences(load_dataset(tiny_data), fit)
