"""The task types' parts on their own: rows, labels, encoding, pooling, losses, batches, metrics, export.

Real parts throughout (the builtin:tiny model and tokenizer, the loader, the losses against their
textbook forms); the learning itself is shown in test_tasks_e2e.py.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.dataset import DatasetError, load_dataset
from lmforge.dataset.task_encode import TaskEncoder, TaskTooLong
from lmforge.dataset.tasks import encode_label, preprocess_task_row, resolve_labels


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------------------------------------- rows

def test_retrieval_rows_map_onto_the_canonical_row(tmp_path):
    path = _jsonl(tmp_path / "r.jsonl", [
        {"query": "q1", "response": "d1", "rejected_response": ["n1", "n2"]},
        {"messages": [{"role": "user", "content": "q2"}],
         "positive_messages": [[{"role": "assistant", "content": "d2"}]],
         "negative_messages": [[{"role": "assistant", "content": "n3"}]]},
        {"query": "q3", "response": "d3", "label": 0.25},
    ])
    ds, _ = load_dataset([path], task="embedding", shuffle=False)
    assert [m["content"] for m in ds[0]["messages"]] == ["q1", "d1"] and ds[0]["rejected_response"] == ["n1", "n2"]
    assert [m["content"] for m in ds[1]["messages"]] == ["q2", "d2"] and ds[1]["rejected_response"] == ["n3"]
    assert ds[2]["label"] == 0.25 and ds[2]["rejected_response"] is None


@pytest.mark.parametrize("row, field", [
    ({"query": "q"}, "response"),
    ({"query": "q", "response": "d", "rejected_response": ["ok", 3]}, "rejected_response[1]"),
    ({"query": "q", "response": "d", "rejected_response": [""]}, "rejected_response[0]"),
    ({"query": "q", "response": "d", "label": 2}, "label"),
    ({"messages": [{"role": "assistant", "content": "d"}]}, "messages"),
])
def test_bad_retrieval_rows_name_file_line_and_field(tmp_path, row, field):
    path = _jsonl(tmp_path / "bad.jsonl", [{"query": "q", "response": "d"}, row])
    with pytest.raises(DatasetError) as e:
        load_dataset([path], task="reranker")
    assert f"bad.jsonl:2: field {field!r}" in str(e.value)
    ds, _ = load_dataset([path], task="reranker", strict=False)  # --strict false skips and counts it
    assert len(ds) == 1


def test_classifier_rows_and_labels(tmp_path):
    row = preprocess_task_row({"query": "hello", "label": "greet"}, task="seq_cls")
    assert row["messages"][0]["content"] == "hello" and row["label"] == "greet"
    with pytest.raises(DatasetError, match="field 'label'"):
        preprocess_task_row({"text": "x"}, source="f.jsonl:3", task="seq_cls")
    spec = resolve_labels(["b", "a", "b"])
    assert spec == {"problem_type": "single_label", "num_labels": 2, "label_names": ["a", "b"]}
    assert encode_label("b", spec) == 1
    multi = resolve_labels([[0, 2], [1]])
    assert multi["problem_type"] == "multi_label" and encode_label([0, 2], multi) == [1.0, 0.0, 1.0]
    assert resolve_labels([0.5, 1.5])["problem_type"] == "regression"
    with pytest.raises(ValueError, match="outside 0..1"):
        encode_label(5, resolve_labels([0, 1]))
    with pytest.raises(DatasetError, match="too small"):
        resolve_labels([0, 1, 2], num_labels=2)


# ------------------------------------------------------------------------------------------ encoding

def test_encoder_inputs(tiny_tokenizer):
    from lmforge.template import get_template

    tpl = get_template(tiny_tokenizer)
    emb = TaskEncoder("embedding", tiny_tokenizer, tpl, decoder=True, max_length=64, query_prompt="Query: ")
    assert emb.text_ids("What is 1 + 2?", "query") == tiny_tokenizer("Query: What is 1 + 2?")["input_ids"]
    assert emb.text_ids("1 + 2 = 3") == tiny_tokenizer("1 + 2 = 3")["input_ids"]
    cross = TaskEncoder("reranker", tiny_tokenizer, tpl, decoder=True, max_length=None)  # a head reads no prompt
    assert cross.pair_ids("What is 1 + 2?", "1 + 2 = 3") == tiny_tokenizer(
        "<Query>: What is 1 + 2?\n<Document>: 1 + 2 = 3")["input_ids"]
    rr = TaskEncoder("generative_reranker", tiny_tokenizer, tpl, decoder=True, max_length=None)
    text = tiny_tokenizer.decode(rr.pair_ids("What is 1 + 2?", "1 + 2 = 3"))
    assert "<Query>: What is 1 + 2?\n<Document>: 1 + 2 = 3" in text and text.endswith("<|im_start|>assistant\n")
    # too long: the document is cut, the query and the prompt's end stay
    rr.max_length = len(rr.pair_ids("q", "short")) + 5
    cut = tiny_tokenizer.decode(rr.pair_ids("q", "a long document " * 30))
    assert len(rr.pair_ids("q", "a long document " * 30)) <= rr.max_length and cut.endswith("assistant\n")
    rr.truncation_strategy = "raise"
    with pytest.raises(TaskTooLong):
        rr.pair_ids("q", "a long document " * 30)
    rr.truncation_strategy = "delete"
    assert rr.encode({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x " * 99}],
                      "rejected_response": None}) is None


# ------------------------------------------------------------------------------- pooling and scores

def test_pooling_and_generative_scores_do_not_depend_on_padding(tiny_model_tokenizer):
    from lmforge.model.tasks import pad_sequences, pool, task_forward

    model, tok = tiny_model_tokenizer
    model.eval()
    seqs = [tok("What is 12 + 30?")["input_ids"], tok("Hi")["input_ids"], tok("7 - 3 = 4 and more text")["input_ids"]]
    with torch.no_grad():
        for mode in ("last", "mean", "cls"):
            for side in ("right", "left"):
                batch = pad_sequences(seqs, tok.pad_token_id, side)
                hidden = model.model(**batch).last_hidden_state if side == "right" else None
                if hidden is None:  # left padding needs its positions counted from the first real token
                    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
                    hidden = model.model(**batch, position_ids=pos).last_hidden_state
                got = pool(hidden, batch["attention_mask"], mode)
                for i, s in enumerate(seqs):
                    one = model.model(input_ids=torch.tensor([s])).last_hidden_state
                    want = {"last": one[0, -1], "mean": one[0].mean(0), "cls": one[0, 0]}[mode]
                    torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-4)
        yes_no = (5, 9)
        scores = task_forward(model, pad_sequences(seqs, tok.pad_token_id, "left"), "generative_reranker",
                              yes_no=yes_no)
        for i, s in enumerate(seqs):
            logits = model(input_ids=torch.tensor([s])).logits[0, -1]
            assert abs(float(scores[i]) - float(logits[5] - logits[9])) < 1e-4
        with pytest.raises(ValueError, match="left-padded"):
            task_forward(model, pad_sequences(seqs, tok.pad_token_id, "right"), "generative_reranker", yes_no=yes_no)


# ------------------------------------------------------------------------------------------- losses

def test_losses_match_their_definitions():
    from lmforge.trainers.tasks.losses import (contrastive, cosine_similarity, group_matrix, infonce, listwise_reranker,
                                               loss_for, pointwise_reranker)

    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    d = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    positive = torch.tensor([0, 1, 2])
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3] = False  # document 3 repeats row 0's positive: not a negative of row 0
    loss, acc = infonce(q, d, positive, mask, temperature=0.1)
    logits = (q @ d.T) / 0.1
    want = sum(-(logits[i, positive[i]] - torch.logsumexp(logits[i][mask[i]], 0)) for i in range(3)) / 3
    assert abs(float(loss) - float(want)) < 1e-5 and acc.shape == (3,)
    own = torch.zeros(3, 5, dtype=torch.bool)
    own[[0, 1, 2], [0, 1, 2]] = True
    own[0, 4] = True  # row 0's hard negative
    label = torch.tensor([float("nan"), 0.5, float("nan")])
    cos = q @ d.T
    targets = torch.tensor([1.0, 0.0, 0.5, 1.0])  # (0,0) (0,4) (1,1) (2,2) in mask order
    picked = cos[own]
    loss, _ = cosine_similarity(q, d, positive, mask, own=own, label=label)
    assert abs(float(loss) - float(((picked - targets) ** 2).mean())) < 1e-6
    loss, _ = contrastive(q, d, positive, mask, own=own, label=label, margin=0.5)
    dist = 1 - picked
    want = 0.5 * (targets * dist ** 2 + (1 - targets) * torch.clamp(0.5 - dist, min=0) ** 2).mean()
    assert abs(float(loss) - float(want)) < 1e-6

    scores = torch.tensor([2.0, 1.0, 0.5, -1.0, 3.0, 0.0])
    sizes = torch.tensor([3, 1, 2])
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    loss, acc = listwise_reranker(scores, labels, sizes)
    want = (-F.log_softmax(scores[:3], 0)[0] - F.log_softmax(scores[4:], 0)[0]) / 2  # the group of one is skipped
    assert abs(float(loss) - float(want)) < 1e-6 and acc.tolist() == [1.0, 1.0, 1.0]
    assert group_matrix(scores, sizes)[1, 1] == float("-inf")
    loss, _ = pointwise_reranker(scores, labels, sizes)
    assert abs(float(loss) - float(F.binary_cross_entropy_with_logits(scores, labels))) < 1e-6
    assert loss_for("generative_reranker", None) is listwise_reranker
    with pytest.raises(ValueError, match="does not apply to --task_type embedding; choose one of"):
        loss_for("embedding", "listwise_reranker")


def test_collator_batches(tiny_tokenizer):
    from lmforge.trainers.tasks.collator import TaskCollator

    rows = [{"input_ids": [1, 2], "positive_ids": [3], "negative_ids": [[4, 4], [5]], "label": None},
            {"input_ids": [6], "positive_ids": [4, 4], "negative_ids": [], "label": 0.5}]
    b = TaskCollator("embedding", 0, num_negatives=1)(rows)
    assert b["input_ids"].tolist() == [[1, 2], [6, 0], [3, 0], [4, 4], [4, 4]]
    assert b["negative_counts"].tolist() == [1, 0]
    assert b["doc_hash"][1] == b["doc_hash"][2]  # row 1's positive is row 0's negative: the same document
    assert math.isnan(b["pair_label"][0]) and b["pair_label"][1] == 0.5
    r = TaskCollator("generative_reranker", 0)([{"input_ids": [1, 2, 3], "negative_ids": [[7]], "label": None}])
    assert r["input_ids"].tolist() == [[1, 2, 3], [0, 0, 7]]  # left-padded
    assert r["group_sizes"].tolist() == [2] and r["pair_labels"].tolist() == [1.0, 0.0]


# ------------------------------------------------------------------------------------------ metrics

def test_retrieval_and_classification_metrics():
    from lmforge.eval.metrics import get_eval_metric

    m = get_eval_metric("retrieval")
    s = m.score_row(["a", "b", "c"], "b", {})
    assert s["recall@1"] == 0.0 and s["recall@5"] == 1.0 and s["mrr@10"] == 0.5
    assert abs(s["ndcg@10"] - 1 / math.log2(3)) < 1e-9
    assert m.score_row(["a"], "z", {})["ndcg@10"] == 0.0
    c = get_eval_metric("classification")
    preds, refs = ["x", "x", "y", "y"], ["x", "y", "y", "y"]
    rows = [c.score_row(p, r, {}) for p, r in zip(preds, refs)]
    agg = c.aggregate(rows, preds, refs, [{}] * 4)
    # x: tp 1, fp 1, fn 0 -> F1 2/3; y: tp 2, fp 0, fn 1 -> F1 4/5
    assert agg["accuracy"] == 0.75 and abs(agg["macro_f1"] - (2 / 3 + 4 / 5) / 2) < 1e-9


# ------------------------------------------------------------------------------- several processes

def _gather_worker(rank: int, world: int, port: int, folder: str) -> None:
    import os

    import torch.distributed as dist

    from lmforge.utils.distributed import all_gather_with_grad, exit_process

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    docs, queries, sizes = _gather_data()
    start = sum(sizes[:rank])
    mine = docs[start:start + sizes[rank]].clone().requires_grad_()
    gathered, offset = all_gather_with_grad(mine)
    (queries[2 * rank:2 * rank + 2] @ gathered.T).logsumexp(-1).sum().backward()
    torch.save({"gathered": gathered.detach(), "offset": offset, "grad": mine.grad}, f"{folder}/{rank}.pt")
    dist.destroy_process_group()
    exit_process(0)  # torch 2.13 on CPU sometimes aborts in its teardown after the work (utils/distributed.py)


def _gather_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 4, generator=g), torch.randn(4, 4, generator=g), [3, 2]


def test_gather_with_grad_over_two_processes(tmp_path):
    """Ranks holding 3 and 2 documents see all 5; each rank's documents get the gradient of every rank's loss."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    docs, queries, sizes = _gather_data()
    docs.requires_grad_()
    sum((queries[2 * r:2 * r + 2] @ docs.T).logsumexp(-1).sum() for r in range(2)).backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        start = sum(sizes[:rank])
        assert got["offset"] == start and torch.equal(got["gathered"], docs.detach())
        torch.testing.assert_close(got["grad"], docs.grad[start:start + sizes[rank]])


# ------------------------------------------------------------------------------- LoRA checkpoints

def _lora_run(tmp_path, **kwargs) -> str:
    from lmforge import TrainArguments, sft_main

    args = dict(model="builtin:tiny", train_type="lora", lora_rank=4, learning_rate=1e-2, max_steps=2,
                per_device_train_batch_size=4, gradient_accumulation_steps=1, output_dir=str(tmp_path),
                add_version=False, report_to=["none"], plot=False, save_steps=100)
    return sft_main(TrainArguments(**{**args, **kwargs}))["last_checkpoint"]


def test_lora_embedding_checkpoint_serves_and_exports(tmp_path):
    """A LoRA embedding checkpoint (peft FEATURE_EXTRACTION on the bare body; Matryoshka dimensions in the loss)
    loads merged in the engine, and its sentence-transformers export (merged again, prompts kept) gives the
    same vectors."""
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    from lmforge.infer.pooling import PoolingEngine
    from lmforge.pipelines.export import export_main
    from lmforge.arguments import ExportArguments

    ckpt = _lora_run(tmp_path / "run", task_type="embedding", dataset=["builtin:arith-retrieval#8"],
                     query_prompt="Query: ", pooling="mean", matryoshka_dims=[16])
    logged = [json.loads(x) for x in (tmp_path / "run" / "logging.jsonl").read_text().splitlines()]
    assert any("accuracy" in x for x in logged)
    assert (tmp_path / "run" / "checkpoint-2" / "adapter_config.json").is_file()
    engine = PoolingEngine(ckpt_dir=ckpt)
    base = PoolingEngine("builtin:tiny", task_type="embedding", pooling="mean")
    texts = ["What is 1 + 2?", "1 + 2 = 1 + 2 = 3"]
    trained, _ = engine.embed(texts, input_type="query")
    assert engine.pooling == "mean" and not torch.allclose(trained, base.embed(texts, input_type="query")[0])
    out = export_main(ExportArguments(ckpt_dir=ckpt, output_dir=str(tmp_path / "st")))["output_dir"]
    st = torch.tensor(SentenceTransformer(out, device="cpu").encode(texts, prompt_name="query"))
    assert bool((F.cosine_similarity(st, trained, dim=-1) >= 0.9999).all())


def test_lora_classifier_checkpoint_keeps_its_labels_and_head(tmp_path):
    from lmforge.arguments import ExportArguments
    from lmforge.infer.pooling import PoolingEngine
    from lmforge.pipelines.export import export_main

    ckpt = _lora_run(tmp_path / "run", task_type="seq_cls", dataset=["builtin:intents#8"])
    args = json.loads((tmp_path / "run" / "args.json").read_text())
    assert args["num_labels"] == 4 and args["label_names"] == ["identity", "math", "time", "weather"]
    engine = PoolingEngine(ckpt_dir=ckpt)
    probs, _ = engine.classify(["What is 1 + 2?", "Who are you?"])
    assert engine.label_names == args["label_names"] and probs.shape == (2, 4)
    merged = export_main(ExportArguments(ckpt_dir=ckpt, merge_lora=True, output_dir=str(tmp_path / "merged")))
    again = PoolingEngine(ckpt_dir=merged["output_dir"])
    torch.testing.assert_close(again.classify(["What is 1 + 2?", "Who are you?"])[0], probs, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="this checkpoint is a seq_cls model"):
        export_main(ExportArguments(ckpt_dir=ckpt, quant_method="gguf"))


def test_commands_read_the_task_of_a_checkpoint(tmp_path):
    """deploy/eval/export take the task from args.json (``--task_type`` overrides); infer and rlhf refuse clearly."""
    from lmforge.arguments import InferArguments, RlhfArguments
    from lmforge.infer.pooling import checkpoint_task
    from lmforge.pipelines.infer import infer_main
    from lmforge.pipelines.sft import prepare_training

    ckpt = tmp_path / "run" / "checkpoint-5"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    (tmp_path / "run" / "args.json").write_text(json.dumps({"model": "builtin:tiny", "task_type": "embedding"}))
    assert checkpoint_task(None, str(ckpt)) == "embedding"
    assert checkpoint_task("reranker", str(ckpt)) == "reranker" and checkpoint_task("causal_lm", str(ckpt)) is None
    assert checkpoint_task(None, None) is None
    with pytest.raises(ValueError, match="serve it with lmforge deploy"):
        infer_main(InferArguments(ckpt_dir=str(ckpt)))
    with pytest.raises(ValueError, match="trains with lmforge sft, not lmforge rlhf"):
        prepare_training(RlhfArguments(rlhf_type="dpo", model="builtin:tiny", task_type="embedding",
                                       dataset=["builtin:arith-retrieval#4"]))
